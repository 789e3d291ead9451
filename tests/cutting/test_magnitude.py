"""Magnitude pruning during training: the schedule, the masks by hand, the transform, the sparse codec, runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedloom.client.training import train_local
from fedloom.compress import Sparse
from fedloom.core.bits import pack
from fedloom.core.config import parse_config
from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.core.keys import PRUNE, PRUNE_MASK
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, ClientUpdate, ComponentSpec, Payload, TrainConfig
from fedloom.cutting.magnitude import MASK_STATE, MagnitudePruner, pack_mask, sparsity_at
from fedloom.data.base import Split
from fedloom.pipeline import ClientBatch, StageContext
from fedloom.run import build_run
from fedloom.strategies.base import ServerState


def test_zhu_gupta_schedule_by_hand() -> None:
    s = [sparsity_at(t, final=0.8, start=2, end=4, every=1) for t in range(1, 7)]
    # t=2: 0.8·(1 − 1³) = 0; t=3: 0.8·(1 − 0.5³) = 0.7; from t=4: 0.8
    assert s == pytest.approx([0.0, 0.0, 0.7, 0.8, 0.8, 0.8], abs=1e-15)
    # every=2: the target only changes on rounds start, start+2, ... (and at end)
    s = [sparsity_at(t, final=0.8, start=1, end=5, every=2) for t in range(1, 7)]
    assert s == pytest.approx([0.0, 0.0, 0.7, 0.7, 0.8, 0.8], abs=1e-15)
    assert sparsity_at(3, final=0.5, start=3, end=3, every=1) == 0.5


def _spec_state(weight: list[list[float]], bias: list[float], w2: list[list[float]] | None = None) -> tuple[ParamSpec, ServerState]:
    sd = {"w": torch.tensor(weight), "b": torch.tensor(bias)}
    if w2 is not None:
        sd["w2"] = torch.tensor(w2)
    spec = ParamSpec.from_state_dict(sd, trainable=set(sd))
    return spec, ServerState(round=1, params=spec.flatten(sd))


def test_global_mask_by_hand_biases_untouched() -> None:
    spec, state = _spec_state([[-3.0, 1.0, 0.5], [2.0, -0.1, 4.0]], [0.01, -0.02, 0.03])
    pruner = MagnitudePruner(sparsity=0.5, start=1, end=1)
    out, metrics = pruner.apply(state, spec, 1)
    w = spec.unflatten(out.params)
    # floor(0.5 · 6) = 3 smallest |w|: 0.1, 0.5, 1.0
    assert torch.equal(w["w"], torch.tensor([[-3.0, 0.0, 0.0], [2.0, 0.0, 4.0]]))
    assert torch.equal(w["b"], torch.tensor([0.01, -0.02, 0.03]))
    assert metrics == {"sparsity": 0.5}
    keep = out.tensors[MASK_STATE]
    assert keep.dtype == torch.bool and int((~keep).sum()) == 3


def test_layer_scope_prunes_each_tensor_to_the_target() -> None:
    spec, state = _spec_state([[10.0, 20.0], [30.0, 40.0]], [1.0], [[0.1, 0.2], [0.3, 0.4]])
    glob, _ = MagnitudePruner(sparsity=0.5).apply(state, spec, 1)
    layer, _ = MagnitudePruner(sparsity=0.5, scope="layer").apply(state, spec, 1)
    g, l = spec.unflatten(glob.params), spec.unflatten(layer.params)
    assert torch.equal(g["w"], torch.tensor([[10.0, 20.0], [30.0, 40.0]]))  # global: all 4 pruned from w2
    assert torch.equal(g["w2"], torch.zeros(2, 2))
    assert torch.equal(l["w"], torch.tensor([[0.0, 0.0], [30.0, 40.0]]))
    assert torch.equal(l["w2"], torch.tensor([[0.0, 0.0], [0.3, 0.4]]))


def test_a_pruned_weight_stays_pruned() -> None:
    spec, state = _spec_state([[1.0, 2.0, 3.0, 4.0]], [0.0])
    pruner = MagnitudePruner(sparsity=0.5, start=1, end=2)
    s1, m1 = pruner.apply(state, spec, 1)  # target 0 at the start round
    assert m1 == {"sparsity": 0.0}
    s2, m2 = pruner.apply(s1, spec, 2)
    assert torch.equal(spec.unflatten(s2.params)["w"], torch.tensor([[0.0, 0.0, 3.0, 4.0]]))
    # a client (or DP noise) revives the pruned weights and makes them large: the mask holds
    revived = s2.params.clone()
    revived[:2] = torch.tensor([100.0, 100.0])
    s3, m3 = pruner.apply(ServerState(round=3, params=revived, tensors=s2.tensors), spec, 3)
    assert torch.equal(spec.unflatten(s3.params)["w"], torch.tensor([[0.0, 0.0, 3.0, 4.0]]))
    assert m3 == {"sparsity": 0.5}


def test_options_are_checked_with_keys() -> None:
    with pytest.raises(ConfigError, match="pruning.sparsity"):
        MagnitudePruner(sparsity=1.0)
    with pytest.raises(ConfigError, match="pruning.end"):
        MagnitudePruner(sparsity=0.5, start=5, end=3)
    with pytest.raises(ConfigError, match="pruning.scope"):
        MagnitudePruner(sparsity=0.5, scope="channel")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pruning"):
        parse_config({"data": {"name": "hospital"}, "model": {"name": "mlp"}, "pruning": {"sparsity": 0.5, "speed": 2}})


@pytest.mark.parametrize("opt", [{"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.01}, {"optimizer": "adam"}])
def test_transform_keeps_pruned_weights_exactly_zero(opt: dict) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    spec = ParamSpec.from_module(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=g)
    data = Split(x, x.sum(1) + 0.1 * torch.randn(50, generator=g))
    state = ServerState(round=1, params=spec.module_vector(model))
    pruned, _ = MagnitudePruner(sparsity=0.6).apply(state, spec, 1)
    keep = pruned.tensors[MASK_STATE]
    ins = ClientInstruction(
        round=2, client_id="c", seed=3,
        train=TrainConfig(loss="mse", epochs=3, batch_size=10, lr=0.05, **opt),
        transforms=(ComponentSpec.of(PRUNE),), payload={PRUNE_MASK: pack_mask(keep)},
    )  # fmt: skip
    res = train_local(model, spec, pruned.params, data, ins)
    local = pruned.params + res.update.delta
    assert bool((local[~keep] == 0).all()) and bool((res.update.delta[~keep] == 0).all())
    assert int((res.update.delta[keep] != 0).sum()) > 0  # the kept weights trained
    # without the transform the same start revives them
    free = train_local(model, spec, pruned.params, data, ClientInstruction(round=2, client_id="c", seed=3, train=ins.train))
    assert int((free.update.delta[~keep] != 0).sum()) > 0


def test_transform_refuses_a_malformed_mask() -> None:
    model = nn.Linear(3, 1)
    spec = ParamSpec.from_module(model)
    data = Split(torch.zeros(4, 3), torch.zeros(4))
    bad = ClientInstruction(
        round=1, client_id="c", seed=0, train=TrainConfig(loss="mse"),
        transforms=(ComponentSpec.of(PRUNE),), payload={PRUNE_MASK: torch.zeros(7, dtype=torch.uint8)},
    )  # fmt: skip
    with pytest.raises(ConfigError, match="prune_mask"):
        train_local(model, spec, spec.module_vector(model), data, bad)


# ---------------------------------------------------------------- sparse codec
def _ctx(numel: int = 10, buffers: int = 0) -> StageContext:
    sd = {"w": torch.zeros(numel - buffers)}
    trainable = {"w"}
    if buffers:
        sd["n"] = torch.zeros(buffers)
    return StageContext(ParamSpec.from_state_dict(sd, trainable=trainable), round=1)


def _encode(vec: torch.Tensor, ctx: StageContext) -> ClientUpdate:
    u = ClientUpdate(client_id="c", round=1, delta=vec, num_examples=1)
    batch = ClientBatch.of([u], [0], [{}])
    Sparse().client(batch, ctx)
    return batch.finish()[0]


def test_sparse_codec_is_exact_and_sends_nonzeros_only() -> None:
    ctx = _ctx(12, buffers=2)
    vec = torch.tensor([0.0, 1.5, 0.0, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 3.25, 7.0, 0.0])
    enc = _encode(vec, ctx)
    assert enc.payload is not None
    t = enc.payload.tensors
    # 10 trainable entries: bits 1, 4, 9 set -> bytes 0b00010010 = 18, 0b00000010 = 2
    assert t["bitmap"].tolist() == [18, 2]
    assert t["values"].tolist() == [1.5, -2.0, 3.25]
    assert t["buffers"].tolist() == [7.0, 0.0]
    assert enc.payload.nbytes == 2 + 3 * 4 + 2 * 4
    dec = Sparse().server(enc, ctx)
    assert torch.equal(dec.delta, vec)


def _payload(bitmap: list[int], values: list[float], buffers: int = 0) -> ClientUpdate:
    tensors = {
        "bitmap": torch.tensor(bitmap, dtype=torch.uint8),
        "values": torch.tensor(values, dtype=torch.float32),
        "buffers": torch.zeros(buffers),
    }
    return ClientUpdate(client_id="evil", round=1, delta=None, payload=Payload("sparse", tensors, {}), num_examples=1)


@pytest.mark.parametrize(
    ("bitmap", "values", "reason"),
    [
        ([18, 2], [1.0, 2.0], "holds 2 entries but bitmap sets 3"),
        ([18, 2], [1.0, 2.0, 3.0, 4.0], "holds 4 entries but bitmap sets 3"),
        ([18, 6], [1.0, 2.0, 3.0, 4.0], "past the 10 trainable"),
        ([18, 2], [1.0, float("nan"), 3.0], "NaN or Inf"),
        ([18], [1.0], "bitmap"),
    ],
)
def test_sparse_codec_rejects_malformed_payloads(bitmap: list[int], values: list[float], reason: str) -> None:
    with pytest.raises(InvalidUpdateError, match=reason):
        Sparse().server(_payload(bitmap, values), _ctx(10))


def test_sparse_values_cannot_exceed_the_trainable_length() -> None:
    bitmap = pack(torch.ones(1, 10, dtype=torch.uint8), 1)[0].tolist()
    with pytest.raises(InvalidUpdateError, match="values"):
        Sparse().server(_payload(bitmap, [1.0] * 11), _ctx(10))


# ------------------------------------------------------------------------ runs
def _cfg(**extra: object) -> dict:
    return {
        "run": {"name": "pruned", "seed": 1, "rounds": 4, "engine": "sequential"},
        "data": {"name": "hospital"},
        "model": {"name": "mlp", "hidden": [16]},
        "strategy": {"name": "fedavg", "fraction": 1.0},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.01, "momentum": 0.9, "max_steps": 10},
        "pruning": {"sparsity": 0.75, "start": 1, "end": 3},
        **extra,
    }


def test_a_pruned_run_zeroes_the_pruned_weights_and_sends_fewer_bytes() -> None:
    r = build_run(parse_config(_cfg()))
    hist = r.federation.run(4)
    keep = r.federation.state.tensors[MASK_STATE]
    prunable = MagnitudePruner(sparsity=0.75).prunable(r.spec)
    assert bool((r.federation.state.params[~keep] == 0).all())
    assert [rec.metrics["sparsity"] for rec in hist] == pytest.approx(
        [math.floor(s * int(prunable.sum())) / int(prunable.sum()) for s in (0.0, 0.75 * (1 - 0.5**3), 0.75, 0.75)]
    )
    p = int(r.spec.trainable_mask().sum())
    kept = int(keep.sum())
    # the last round: 3 uplinks of bitmap + at most the kept values; the broadcast likewise, plus each mask
    assert hist[-1].bytes_up <= 3 * (math.ceil(p / 8) + 4 * kept)
    assert hist[-1].bytes_up < 0.4 * 3 * 4 * p
    assert hist[-1].bytes_down <= 3 * (math.ceil(p / 8) + 4 * kept + math.ceil(r.spec.numel / 8))


def test_pruning_resumes_from_a_checkpoint_with_its_mask(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = str(tmp_path / "s.db")
    full = build_run(parse_config(_cfg(run={**_cfg()["run"], "store": store, "name": "a"})))
    full.federation.run(4)
    part = build_run(parse_config(_cfg(run={**_cfg()["run"], "store": str(tmp_path / "t.db"), "name": "a"})))
    part.federation.run(2)
    resumed = build_run(parse_config(_cfg(run={**_cfg()["run"], "store": str(tmp_path / "t.db"), "name": "a"})))
    assert resumed.federation.resumed_from == 2
    assert torch.equal(resumed.federation.state.tensors[MASK_STATE], part.federation.state.tensors[MASK_STATE])
    resumed.federation.run(4)
    assert torch.equal(resumed.federation.state.params, full.federation.state.params)
