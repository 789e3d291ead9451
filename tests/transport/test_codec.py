"""The codec: instructions and updates survive the wire exactly; malformed metadata is refused by name."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from fedloom.core.errors import InvalidUpdateError
from fedloom.core.keys import CONTROL_DELTA, SERVER_CONTROL
from fedloom.core.types import ClientInstruction, ClientUpdate, ComponentSpec, Payload, TrainConfig
from fedloom.transport import codec
from fedloom.transport.codec import TaskError
from fedloom.transport.wire import decode, encode

MB = 1 << 20


def _wire(kind: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """Through the real chunked format and back, as between two processes."""
    msg = decode(encode(kind, meta, tensors, chunk_bytes=64), max_bytes=MB)
    return msg.kind, msg.meta, msg.tensors


def _tensors_equal(a: Any, b: Any) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _payload() -> Payload:
    g = torch.Generator().manual_seed(1)
    return Payload(
        codec="qsgd",
        tensors={
            "codes": torch.randint(0, 256, (37,), dtype=torch.uint8, generator=g),
            "index": torch.randint(-(2**31), 2**31 - 1, (5, 2), dtype=torch.int32, generator=g),
            "scale": torch.randn(3, generator=g).to(torch.float16),
            "norm": torch.randn(2, 2, generator=g).to(torch.bfloat16),
        },
        meta={"bits": 8, "stochastic": True, "bucket": 512, "ratio": 0.25, "note": "v1", "seed": None},
    )


def _instruction(**kw: Any) -> ClientInstruction:
    train = TrainConfig(
        epochs=2, batch_size=5, lr=0.05, optimizer="adam", betas=(0.8, 0.95), eps=1e-6, loss="mse",
        weight_decay=0.001, max_steps=7,
    )  # fmt: skip
    args: dict[str, Any] = {
        "round": 5,
        "client_id": "hospital-A",
        "train": train,
        "seed": 123456789,
        "payload": {SERVER_CONTROL: torch.randn(9, dtype=torch.float64), "mask": torch.tensor([True, False])},
        "transforms": (ComponentSpec.of("proximal", mu=0.01), ComponentSpec.of("scaffold")),
        "stages": (ComponentSpec.of("clip", norm=1.0), ComponentSpec.of("quantize", bits=8, stochastic=True, label=None)),
        "model_version": 3,
    }
    args.update(kw)
    return ClientInstruction(**args)


def _assert_same_instruction(got: ClientInstruction, want: ClientInstruction) -> None:
    assert (got.round, got.client_id, got.train, got.seed) == (want.round, want.client_id, want.train, want.seed)
    assert (got.transforms, got.stages, got.model_version) == (want.transforms, want.stages, want.model_version)
    _tensors_equal(got.payload, want.payload)


def _assert_same_update(got: ClientUpdate, want: ClientUpdate) -> None:
    assert (got.client_id, got.round, got.num_examples, got.num_steps) == (want.client_id, want.round, want.num_examples, want.num_steps)
    assert dict(got.metrics) == dict(want.metrics) and got.weight == want.weight and got.model_version == want.model_version
    _tensors_equal(got.extras, want.extras)
    if want.payload is None:
        assert got.payload is None and got.delta is not None and want.delta is not None
        _tensors_equal({"delta": got.delta}, {"delta": want.delta})
    else:
        assert got.delta is None and got.payload is not None
        assert got.payload.codec == want.payload.codec and dict(got.payload.meta) == dict(want.payload.meta)
        _tensors_equal(got.payload.tensors, want.payload.tensors)


# --------------------------------------------------------------------------- instructions
def test_instruction_with_dense_params_round_trips_exactly() -> None:
    ins = _instruction()
    params = torch.randn(9)
    kind, meta, tensors = _wire(*codec.encode_instruction(ins, params=params, deadline_s=30.0))
    assert kind == "task" and meta["deadline_s"] == 30.0
    task = codec.decode_instruction(meta, tensors)
    _assert_same_instruction(task.instruction, ins)
    assert task.broadcast is None and task.deadline_s == 30.0
    _tensors_equal({"p": task.params}, {"p": params})


def test_default_instruction_round_trips() -> None:
    ins = ClientInstruction(round=1, client_id="c", train=TrainConfig(), seed=0)
    task = codec.decode_instruction(*_wire(*codec.encode_instruction(ins, params=torch.zeros(3)))[1:])
    _assert_same_instruction(task.instruction, ins)
    assert task.instruction.model_version == 0 and task.deadline_s is None


def test_instruction_with_a_broadcast_payload_round_trips_exactly() -> None:
    ins = _instruction()
    bc = _payload()
    kind, meta, tensors = _wire(*codec.encode_instruction(ins, broadcast=bc))
    assert "params" not in tensors and {k for k in tensors if k.startswith("broadcast/")} == {f"broadcast/{k}" for k in bc.tensors}
    task = codec.decode_instruction(meta, tensors)
    _assert_same_instruction(task.instruction, ins)
    assert task.params is None and task.broadcast is not None
    assert task.broadcast.codec == "qsgd" and dict(task.broadcast.meta) == dict(bc.meta)
    _tensors_equal(task.broadcast.tensors, bc.tensors)


def test_a_task_carries_exactly_one_global_model() -> None:
    ins = _instruction()
    with pytest.raises(ValueError, match="exactly one"):
        codec.encode_instruction(ins)
    with pytest.raises(ValueError, match="exactly one"):
        codec.encode_instruction(ins, params=torch.zeros(9), broadcast=_payload())


def _task(**changes: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    _, meta, tensors = codec.encode_instruction(_instruction(), params=torch.zeros(9))
    for k, v in changes.items():
        if k.startswith("t:"):
            if v is None:
                tensors.pop(k[2:])
            else:
                tensors[k[2:]] = v
        elif v is None:
            meta.pop(k)
        else:
            meta[k] = v
    return meta, tensors


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"round": None}, "task round must be an integer, got None"),
        ({"seed": "7"}, "task seed must be an integer, got '7'"),
        ({"client_id": ""}, "task client_id must be a non-empty string"),
        ({"model_version": 2.5}, "task model_version must be an integer, got 2.5"),
        ({"deadline_s": "soon"}, "task deadline_s must be a number"),
        ({"train": [1]}, "task train must be a JSON object, got list"),
        ({"train": {"epochs": 1, "warp": 9}}, "task train: .*warp"),
        ({"train": {"lr": -1.0}}, "task train: client.lr: must be a finite number > 0"),
        ({"train": {"betas": 0.9}}, "task train.betas must be a list"),
        ({"transforms": {"name": "x"}}, "task transforms must be a list, got dict"),
        ({"stages": [{"options": {}}]}, "task stages: a component must be an object with a name"),
        ({"stages": [{"name": "clip", "options": {"norm": [1]}}]}, "task stages: option 'norm' of 'clip' must be a JSON scalar"),
        ({"t:params": None}, "task without params"),
        ({"t:extra": torch.zeros(1)}, r"task has unexpected tensors \['extra'\]"),
        ({"t:broadcast/q": torch.zeros(1)}, "broadcast tensors .* but no broadcast codec"),
        ({"broadcast": {"codec": "q", "meta": {}}}, "both params and a broadcast payload"),
        ({"t:params": None, "broadcast": {"codec": "", "meta": {}}}, "task broadcast codec must be a non-empty string"),
        ({"t:params": None, "broadcast": {"codec": "q", "meta": {"b": [8]}}}, "task broadcast meta 'b' must be a JSON scalar, got list"),
        ({"t:params": None, "broadcast": "q"}, "task broadcast must be a JSON object"),
        ({"t:payload/": torch.zeros(1)}, "named only by its prefix"),
    ],
)
def test_malformed_tasks_are_refused_by_name(changes: dict[str, Any], reason: str) -> None:
    meta, tensors = _task(**changes)
    with pytest.raises(TaskError, match=reason):
        codec.decode_instruction(meta, tensors)


def test_evaluation_round_trips_and_needs_params() -> None:
    params = torch.randn(4)
    kind, meta, tensors = _wire(*codec.encode_evaluation("c1", params))
    assert kind == "evaluate" and meta == {"client_id": "c1"}
    _tensors_equal({"p": codec.decode_evaluation(meta, tensors)}, {"p": params})
    with pytest.raises(TaskError, match="task without params"):
        codec.decode_evaluation(meta, {})
    with pytest.raises(TaskError, match="unexpected tensors"):
        codec.decode_evaluation(meta, {**tensors, "x": torch.zeros(1)})


# --------------------------------------------------------------------------- updates
def _dense_update(**kw: Any) -> ClientUpdate:
    g = torch.Generator().manual_seed(2)
    args: dict[str, Any] = {
        "client_id": "hospital-B",
        "round": 4,
        "delta": torch.randn(9, generator=g),
        "num_examples": 8000,
        "num_steps": 13,
        "metrics": {"train_loss": 0.125, "train_mae": 2.5},
        "extras": {CONTROL_DELTA: torch.randn(9, generator=g)},
        "weight": 0.375,
        "model_version": 2,
    }
    args.update(kw)
    return ClientUpdate(**args)


def _payload_update(**kw: Any) -> ClientUpdate:
    return _dense_update(delta=None, payload=_payload(), **kw)


@pytest.mark.parametrize(
    "update",
    [
        _dense_update(),
        _dense_update(weight=None, model_version=None, extras={}, metrics={}, num_steps=0),
        _dense_update(delta=torch.randn(6, dtype=torch.float64)),
        _payload_update(),
        _payload_update(weight=None, extras={}),
    ],
    ids=["dense", "dense-minimal", "dense-float64", "payload", "payload-minimal"],
)
def test_update_round_trips_exactly(update: ClientUpdate) -> None:
    meta, tensors = codec.encode_update(update)
    kind, meta, tensors = _wire("update", meta, tensors)
    got = codec.decode_update(meta, tensors, client_id=update.client_id, round=update.round)
    _assert_same_update(got, update)
    again = codec.decode_update(meta, tensors, client_id=update.client_id)  # the round from the metadata
    _assert_same_update(again, update)


def test_update_metadata_is_the_documented_layout() -> None:
    meta, tensors = codec.encode_update(_dense_update())
    assert set(meta) == {"round", "num_examples", "num_steps", "metrics", "model_version", "weight"}
    assert set(tensors) == {"delta", f"extras/{CONTROL_DELTA}"}
    meta, tensors = codec.encode_update(_payload_update())
    assert meta["payload"] == {"codec": "qsgd", "meta": dict(_payload().meta)}
    assert set(tensors) == {*(f"payload/{k}" for k in _payload().tensors), f"extras/{CONTROL_DELTA}"}


def test_an_update_of_the_earlier_layout_still_decodes() -> None:
    """Without model_version and weight (clients before they existed): the defaults apply."""
    meta = {"round": 1, "num_examples": 50, "num_steps": 5, "metrics": {"train_loss": 0.5}}
    update = codec.decode_update(meta, {"delta": torch.zeros(8)}, client_id="eve", round=1)
    assert update.model_version == 0 and update.weight is None and update.payload is None


def _meta_tensors(update: ClientUpdate | None = None, **changes: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta, tensors = codec.encode_update(update or _dense_update())
    for k, v in changes.items():
        if k.startswith("t:"):
            if v is None:
                tensors.pop(k[2:])
            else:
                tensors[k[2:]] = v
        elif v is None:
            meta.pop(k)
        else:
            meta[k] = v
    return meta, tensors


@pytest.mark.parametrize(
    ("update", "changes", "round_", "reason"),
    [
        (None, {"metrics": [1]}, 4, "metrics must be a JSON object"),
        (None, {"round": 3}, 4, "update is for round 3, not 4"),
        (None, {"round": "4"}, None, "round must be an integer, got '4'"),
        (None, {"t:weights": torch.zeros(1)}, 4, r"unexpected tensors \['weights'\]"),
        (None, {"t:delta": None}, 4, "update has no delta"),
        (None, {"t:extras/": torch.zeros(1)}, 4, "named only by its prefix"),
        (None, {"payload": {"codec": "q", "meta": {}}}, 4, "update carries both a delta and a payload"),
        (None, {"t:delta": None, "t:payload/codes": torch.zeros(1)}, 4, "payload tensors .* without a payload codec"),
        ("payload", {"payload": [1]}, 4, "payload must be a JSON object with a codec, got list"),
        ("payload", {"payload": {"codec": 8}}, 4, "payload codec must be a non-empty string, got 8"),
        ("payload", {"payload": {"codec": "q", "meta": "bits=8"}}, 4, "payload meta must be a JSON object, got str"),
        ("payload", {"payload": {"codec": "q", "meta": {"bits": [8]}}}, 4, "payload meta 'bits' must be a JSON scalar, got list"),
        ("payload", {"payload": {"codec": "q", "meta": {}, "x": 1}}, 4, r"payload has unexpected fields \['x'\]"),
        (None, {"num_steps": -1}, 4, "num_steps must be an integer >= 0, got -1"),
        (None, {"num_steps": 2.0}, 4, "num_steps must be an integer >= 0, got 2.0"),
        (None, {"num_examples": "10"}, 4, "num_examples must be an integer >= 1, got '10'"),
        (None, {"num_examples": True}, 4, "num_examples must be an integer >= 1, got True"),
        (None, {"num_examples": None}, 4, "num_examples must be an integer >= 1, got None"),
        (None, {"metrics": {"loss": "low"}}, 4, "metric 'loss' is not a finite number: 'low'"),
        (None, {"weight": "heavy"}, 4, "weight must be a finite number >= 0, got 'heavy'"),
        (None, {"weight": False}, 4, "weight must be a finite number >= 0, got False"),
        (None, {"model_version": -1}, 4, "model_version must be an integer >= 0, got -1"),
        (None, {"model_version": 1.5}, 4, "model_version must be an integer >= 0, got 1.5"),
    ],
)
def test_malformed_updates_are_rejected_with_a_reason(
    update: str | None, changes: dict[str, Any], round_: int | None, reason: str
) -> None:
    meta, tensors = _meta_tensors(_payload_update() if update == "payload" else None, **changes)
    with pytest.raises(InvalidUpdateError, match=reason) as info:
        codec.decode_update(meta, tensors, client_id="mallory", round=round_)
    assert info.value.client_id == "mallory" and re.search(reason, info.value.reason)


# --------------------------------------------------------------------------- evaluation results, failures
def test_eval_result_round_trips_and_is_checked() -> None:
    meta = codec.encode_eval_result(12, {"mae": 1.5, "loss": 2})
    assert codec.decode_eval_result(meta, client_id="c", max_examples=12) == (12, {"mae": 1.5, "loss": 2.0})
    assert codec.decode_eval_result(codec.encode_eval_result(0, {}), client_id="c") == (0, {})
    for bad, reason in [
        ({"num_examples": 13, "metrics": {}}, "num_examples 13 exceeds the registered 12"),
        ({"num_examples": -1, "metrics": {}}, "num_examples must be an integer >= 0, got -1"),
        ({"num_examples": 1, "metrics": {"mae": float("nan")}}, "metric 'mae' is not a finite number"),
        ({"num_examples": 1, "metrics": {"mae": True}}, "metric 'mae' is not a finite number"),
        ({"num_examples": 1, "metrics": 3}, "metrics must be a JSON object"),
    ]:
        with pytest.raises(InvalidUpdateError, match=reason):
            codec.decode_eval_result(bad, client_id="c", max_examples=12)


def test_failure_reason_round_trips_and_is_bounded() -> None:
    assert codec.decode_failure(codec.encode_failure("out of memory")) == "out of memory"
    assert codec.decode_failure({}) == "unspecified"
    assert len(codec.decode_failure(codec.encode_failure("x" * 2000))) == 500
