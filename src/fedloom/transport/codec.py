"""The one codec between round messages and what travels: a kind, JSON metadata and named tensors.

The remote engine, the client agent and the server's service all go through these
functions, so the two ends cannot disagree on a field. The chunked format that carries the
result is :mod:`fedloom.transport.wire`; this module knows nothing of gRPC.

A training task (kind ``task``) from a :class:`~fedloom.core.types.ClientInstruction`::

    meta     round, client_id, seed, model_version, train (TrainConfig fields),
             transforms, stages, personal (lists of ComponentSpec.to_json()), [deadline_s],
             [broadcast: {codec, meta}]
    tensors  "params" (the dense global vector)  or  "broadcast/<name>" (an encoded broadcast
             Payload, whose codec and meta are in the metadata), and "payload/<key>" per
             instruction payload tensor

A training task of a secure round also carries the protocol message of its input stage:
``protocol: {protocol, stage, round, meta}`` in the metadata and its tensors as
``"protocol/<name>"``. A protocol stage on its own (kind ``protocol``, server to client;
``protocol_reply``, client to server) is the same object as metadata and its tensors
unprefixed; the client id of a reply is the sender's (its session), never the message's.

An update (kind ``update``) from a :class:`~fedloom.core.types.ClientUpdate`::

    meta     round, num_examples, num_steps, metrics, model_version, [weight],
             [payload: {codec, meta}]
    tensors  "delta"  or  "payload/<name>" (an encoded Payload), and "extras/<key>"

A partial aggregate (kind ``partial``, an edge's answer to a training task) from a
:class:`~fedloom.core.types.Partial`::

    meta     round, model_version, weight, client_ids, client_examples, metric_sums,
             metric_weights, extra_counts
    tensors  "delta_sum" (float64) and "extras/<key>" (the extras' sums)

The client id of an update is not in it: the server knows who sent it (its session and
certificate). Evaluation tasks carry ``params``; their results only metadata.

Decoding is strict. :func:`decode_update` refuses unknown tensor names, a missing or
doubled body, and wrongly typed metadata with :class:`~fedloom.core.errors.InvalidUpdateError`
naming the reason (the model-dependent checks — shape, dtype, finite values — are
:meth:`ClientUpdate.validate`'s). :func:`decode_instruction` refuses a malformed task with
:class:`TaskError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from fedloom.core.errors import ConfigError, FedloomError, InvalidUpdateError
from fedloom.core.keys import BROADCAST_PREFIX, DELTA, EXTRAS_PREFIX, PARAMS, PAYLOAD_PREFIX, PROTOCOL_PREFIX
from fedloom.core.types import (
    ClientInstruction,
    ClientUpdate,
    ComponentSpec,
    JSONScalar,
    Partial,
    Payload,
    PersonalEval,
    ProtocolMessage,
    TrainConfig,
)
from fedloom.transport.protocol import EVALUATE, TASK

__all__ = [
    "DecodedTask",
    "TaskError",
    "decode_eval_result",
    "decode_evaluation",
    "decode_failure",
    "decode_instruction",
    "decode_partial",
    "decode_personal",
    "decode_protocol",
    "decode_update",
    "encode_eval_result",
    "encode_evaluation",
    "encode_failure",
    "encode_instruction",
    "encode_partial",
    "encode_protocol",
    "encode_update",
    "instruction_meta",
    "instruction_tensors",
    "protocol_tensors",
]

MAX_FAILURE_REASON = 500

Meta = dict[str, Any]
Tensors = dict[str, torch.Tensor]


class TaskError(FedloomError, ValueError):
    """A task or evaluation from the server is malformed (the client reports it and goes on)."""


@dataclass(frozen=True)
class DecodedTask:
    """A decoded training task: the instruction and exactly one of the dense global vector and
    an encoded broadcast :class:`Payload`; ``deadline_s`` is the round's time limit, if sent."""

    instruction: ClientInstruction
    params: torch.Tensor | None
    broadcast: Payload | None
    deadline_s: float | None = None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_scalar(v: object) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _prefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> Tensors:
    return {prefix + k: v for k, v in tensors.items()}


def _unprefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> Tensors:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _payload_meta(payload: Payload) -> Meta:
    return {"codec": payload.codec, "meta": dict(payload.meta)}


def _read_payload_meta(value: object, what: str) -> tuple[str | None, str, dict[str, JSONScalar]]:
    """(problem or None, codec, meta) of a ``{codec, meta}`` object."""
    if not isinstance(value, dict):
        return f"{what} must be a JSON object with a codec, got {type(value).__name__}", "", {}
    codec, meta = value.get("codec"), value.get("meta", {})
    if not isinstance(codec, str) or not codec:
        return f"{what} codec must be a non-empty string, got {codec!r}", "", {}
    if not isinstance(meta, dict):
        return f"{what} meta must be a JSON object, got {type(meta).__name__}", "", {}
    for k, v in meta.items():
        if not _is_scalar(v):
            return f"{what} meta {k!r} must be a JSON scalar, got {type(v).__name__}", "", {}
    unknown = sorted(set(value) - {"codec", "meta"})
    if unknown:
        return f"{what} has unexpected fields {unknown[:5]}", "", {}
    return None, codec, meta


# --------------------------------------------------------------------------- instructions
def instruction_meta(
    ins: ClientInstruction, *, broadcast: Payload | None = None, deadline_s: float | None = None
) -> Meta:
    """The JSON part of a training task (the tensors are :func:`instruction_tensors`)."""
    train = asdict(ins.train)
    train["betas"] = list(train["betas"])
    meta: Meta = {
        "round": ins.round,
        "client_id": ins.client_id,
        "seed": ins.seed,
        "model_version": ins.model_version,
        "train": train,
        "transforms": [c.to_json() for c in ins.transforms],
        "stages": [c.to_json() for c in ins.stages],
        "personal": [c.to_json() for c in ins.personal],
    }
    if deadline_s is not None:
        meta["deadline_s"] = deadline_s
    if broadcast is not None:
        meta["broadcast"] = _payload_meta(broadcast)
    if ins.protocol is not None:
        meta["protocol"] = encode_protocol(ins.protocol)[0]
    return meta


def instruction_tensors(
    ins: ClientInstruction, *, params: torch.Tensor | None = None, broadcast: Payload | None = None
) -> Tensors:
    """The tensors of a training task: the global model (dense ``params`` or an encoded
    ``broadcast``, exactly one) and the instruction's payload."""
    if (params is None) == (broadcast is None):
        raise ValueError("a task carries exactly one of params and a broadcast payload")
    out = {PARAMS: params} if params is not None else _prefixed(BROADCAST_PREFIX, broadcast.tensors)  # type: ignore[union-attr]
    out.update(_prefixed(PAYLOAD_PREFIX, ins.payload))
    out.update(protocol_tensors(ins))
    return out


def protocol_tensors(ins: ClientInstruction) -> Tensors:
    """The tensors of the instruction's protocol message, as a task carries them last (none without one)."""
    return _prefixed(PROTOCOL_PREFIX, ins.protocol.tensors) if ins.protocol is not None else {}


def encode_instruction(
    ins: ClientInstruction,
    *,
    params: torch.Tensor | None = None,
    broadcast: Payload | None = None,
    deadline_s: float | None = None,
) -> tuple[str, Meta, Tensors]:
    """``(kind, meta, tensors)`` of the training task for ``ins`` (see the module docstring)."""
    meta = instruction_meta(ins, broadcast=broadcast, deadline_s=deadline_s)
    return TASK, meta, instruction_tensors(ins, params=params, broadcast=broadcast)


def _components(value: object, what: str) -> tuple[ComponentSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TaskError(f"task {what} must be a list, got {type(value).__name__}")
    try:
        return tuple(ComponentSpec.from_json(c) for c in value)
    except ConfigError as exc:
        raise TaskError(f"task {what}: {exc}") from None


def decode_instruction(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> DecodedTask:
    """The task :func:`encode_instruction` made; :class:`TaskError` if anything is malformed."""
    for key in ("round", "seed"):
        if not _is_int(meta.get(key)):
            raise TaskError(f"task {key} must be an integer, got {meta.get(key)!r}")
    client_id = meta.get("client_id")
    if not isinstance(client_id, str) or not client_id:
        raise TaskError(f"task client_id must be a non-empty string, got {client_id!r}")
    version = meta.get("model_version")
    if version is not None and not _is_int(version):
        raise TaskError(f"task model_version must be an integer, got {version!r}")
    deadline = meta.get("deadline_s")
    if deadline is not None and not _is_number(deadline):
        raise TaskError(f"task deadline_s must be a number, got {deadline!r}")
    train = meta.get("train")
    if not isinstance(train, dict):
        raise TaskError(f"task train must be a JSON object, got {type(train).__name__}")
    train = dict(train)
    if "betas" in train:
        if not isinstance(train["betas"], list):
            raise TaskError(f"task train.betas must be a list, got {train['betas']!r}")
        train["betas"] = tuple(train["betas"])
    try:
        train_config = TrainConfig(**train)
    except TypeError as exc:
        raise TaskError(f"task train: {exc}") from None
    except ConfigError as exc:
        raise TaskError(f"task train: {exc}") from None

    unknown = [k for k in tensors if k != PARAMS and not k.startswith((PAYLOAD_PREFIX, BROADCAST_PREFIX, PROTOCOL_PREFIX))]
    if unknown:
        raise TaskError(f"task has unexpected tensors {unknown[:5]}")
    payload = _unprefixed(PAYLOAD_PREFIX, tensors)
    encoded = _unprefixed(BROADCAST_PREFIX, tensors)
    if "" in payload or "" in encoded:
        raise TaskError("task has a tensor named only by its prefix")
    params = tensors.get(PARAMS)
    broadcast: Payload | None = None
    if "broadcast" in meta:
        problem, codec, bmeta = _read_payload_meta(meta["broadcast"], "task broadcast")
        if problem is not None:
            raise TaskError(problem)
        if params is not None:
            raise TaskError("task carries both params and a broadcast payload")
        broadcast = Payload(codec=codec, tensors=encoded, meta=bmeta)
    elif encoded:
        raise TaskError(f"task has broadcast tensors {sorted(encoded)[:5]} but no broadcast codec")
    elif params is None:
        raise TaskError("task without params")
    protocol: ProtocolMessage | None = None
    ptensors = _unprefixed(PROTOCOL_PREFIX, tensors)
    if "protocol" in meta:
        try:
            protocol = decode_protocol(meta["protocol"], ptensors, client_id=client_id)
        except InvalidUpdateError as exc:
            raise TaskError(f"task protocol: {exc.reason}") from None
    elif ptensors:
        raise TaskError(f"task has protocol tensors {sorted(ptensors)[:5]} but no protocol message")
    try:
        ins = ClientInstruction(
            round=meta["round"],
            client_id=client_id,
            train=train_config,
            seed=meta["seed"],
            payload=payload,
            transforms=_components(meta.get("transforms"), "transforms"),
            stages=_components(meta.get("stages"), "stages"),
            personal=_components(meta.get("personal"), "personal"),
            model_version=version,
            protocol=protocol,
        )
    except ConfigError as exc:
        raise TaskError(f"task: {exc}") from None
    return DecodedTask(ins, params, broadcast, None if deadline is None else float(deadline))


def encode_protocol(msg: ProtocolMessage) -> tuple[Meta, Tensors]:
    """``(meta, tensors)`` of a protocol message (kind ``protocol`` or ``protocol_reply``)."""
    return {"protocol": msg.protocol, "stage": msg.stage, "round": msg.round, "meta": dict(msg.meta)}, dict(msg.tensors)


def decode_protocol(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *, client_id: str) -> ProtocolMessage:
    """The :class:`ProtocolMessage` of :func:`encode_protocol`, to or from ``client_id``.

    Only its shape is checked here (InvalidUpdateError naming the field); whether it fits the
    protocol's stage is the state machine's to say.
    """

    def bad(reason: str) -> InvalidUpdateError:
        return InvalidUpdateError(f"protocol message: {reason}", client_id=client_id)

    if not isinstance(meta, Mapping):
        raise bad(f"must be a JSON object, got {type(meta).__name__}")
    unknown = sorted(set(meta) - {"protocol", "stage", "round", "meta", "session", "task_id"})
    if unknown:
        raise bad(f"unexpected fields {unknown[:5]}")
    for key in ("protocol", "stage"):
        if not isinstance(meta.get(key), str) or not meta.get(key):
            raise bad(f"{key} must be a non-empty string, got {meta.get(key)!r}")
    if not _is_int(meta.get("round")):
        raise bad(f"round must be an integer, got {meta.get('round')!r}")
    body = meta.get("meta", {})
    if not isinstance(body, dict):
        raise bad(f"meta must be a JSON object, got {type(body).__name__}")
    return ProtocolMessage(meta["protocol"], meta["stage"], meta["round"], client_id, meta=body, tensors=dict(tensors))


def encode_evaluation(client_id: str, params: torch.Tensor, personal: PersonalEval | None = None) -> tuple[str, Meta, Tensors]:
    """``(kind, meta, tensors)`` of a federated-evaluation task on the dense global vector
    (``personal``: the client evaluates its own, personalized model; ``meta["personal"]``)."""
    meta: Meta = {"client_id": client_id}
    if personal is not None:
        meta["personal"] = personal.to_json()
    return EVALUATE, meta, {PARAMS: params}


def decode_evaluation(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The global vector of an evaluation task; :class:`TaskError` if it has none."""
    params = tensors.get(PARAMS)
    if params is None:
        raise TaskError("task without params")
    unknown = [k for k in tensors if k != PARAMS]
    if unknown:
        raise TaskError(f"evaluation task has unexpected tensors {unknown[:5]}")
    return params


def decode_personal(meta: Mapping[str, Any]) -> PersonalEval | None:
    """The personalized-evaluation plan of an evaluation task (None: evaluate the global model)."""
    if meta.get("personal") is None:
        return None
    try:
        return PersonalEval.from_json(meta["personal"])
    except ConfigError as exc:
        raise TaskError(f"evaluation task personal: {exc}") from None


# --------------------------------------------------------------------------- updates
def encode_update(update: ClientUpdate) -> tuple[Meta, Tensors]:
    """``(meta, tensors)`` of an ``update`` message (see the module docstring)."""
    meta: Meta = {
        "round": update.round,
        "num_examples": update.num_examples,
        "num_steps": update.num_steps,
        "metrics": dict(update.metrics),
        "model_version": update.model_version,
    }
    if update.weight is not None:
        meta["weight"] = update.weight
    if update.payload is not None:
        meta["payload"] = _payload_meta(update.payload)
        tensors = _prefixed(PAYLOAD_PREFIX, update.payload.tensors)
    else:
        assert update.delta is not None  # a ClientUpdate has exactly one of them
        tensors = {DELTA: update.delta}
    tensors.update(_prefixed(EXTRAS_PREFIX, update.extras))
    return meta, tensors


def decode_update(
    meta: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    client_id: str,
    round: int | None = None,  # noqa: A002 - the field's name
) -> ClientUpdate:
    """The :class:`ClientUpdate` of an ``update`` message from ``client_id``.

    With ``round`` (the task's), the update must be for it. Raises
    :class:`~fedloom.core.errors.InvalidUpdateError` naming the first problem found.
    """

    def bad(reason: str) -> InvalidUpdateError:
        return InvalidUpdateError(reason, client_id=client_id)

    metrics = meta.get("metrics", {})
    if not isinstance(metrics, dict):
        raise bad("metrics must be a JSON object")
    if round is not None:
        if meta.get("round") != round:
            raise bad(f"update is for round {meta.get('round')!r}, not {round}")
    elif not _is_int(meta.get("round")):
        raise bad(f"round must be an integer, got {meta.get('round')!r}")
    rnd = round if round is not None else meta["round"]

    unknown = [k for k in tensors if k != DELTA and not k.startswith((EXTRAS_PREFIX, PAYLOAD_PREFIX))]
    if unknown:
        raise bad(f"unexpected tensors {unknown[:5]}")
    extras = _unprefixed(EXTRAS_PREFIX, tensors)
    encoded = _unprefixed(PAYLOAD_PREFIX, tensors)
    if "" in extras or "" in encoded:
        raise bad("a tensor is named only by its prefix")
    payload: Payload | None = None
    if "payload" in meta:
        problem, codec, pmeta = _read_payload_meta(meta["payload"], "payload")
        if problem is not None:
            raise bad(problem)
        if DELTA in tensors:
            raise bad("update carries both a delta and a payload")
        payload = Payload(codec=codec, tensors=encoded, meta=pmeta)
    elif encoded:
        raise bad(f"payload tensors {sorted(encoded)[:5]} without a payload codec")
    elif DELTA not in tensors:
        raise bad("update has no delta")

    steps = meta.get("num_steps", 0)
    if not _is_int(steps) or steps < 0:
        raise bad(f"num_steps must be an integer >= 0, got {steps!r}")
    n = meta.get("num_examples")
    if not _is_int(n) or n < 1:
        raise bad(f"num_examples must be an integer >= 1, got {n!r}")
    for k, m in metrics.items():  # as ClientUpdate.validate_header checks them
        if not isinstance(m, (int, float)) or not math.isfinite(float(m)):
            raise bad(f"metric {k!r} is not a finite number: {m!r}")
    weight = meta.get("weight")
    if weight is not None and not _is_number(weight):
        raise bad(f"weight must be a finite number >= 0, got {weight!r}")
    version = meta.get("model_version")
    if version is not None and (not _is_int(version) or version < 0):
        raise bad(f"model_version must be an integer >= 0, got {version!r}")
    return ClientUpdate(
        client_id=client_id,
        round=rnd,
        delta=None if payload is not None else tensors[DELTA],
        num_examples=n,
        num_steps=steps,
        metrics=metrics,
        extras=extras,
        payload=payload,
        weight=None if weight is None else float(weight),
        model_version=version,
    )


# --------------------------------------------------------------------------- partial aggregates
DELTA_SUM = "delta_sum"


def encode_partial(p: Partial) -> tuple[Meta, Tensors]:
    """``(meta, tensors)`` of a ``partial`` message (see the module docstring)."""
    meta: Meta = {
        "round": p.round,
        "model_version": p.model_version,
        "weight": p.weight,
        "client_ids": list(p.client_ids),
        "client_examples": list(p.client_examples),
        "metric_sums": dict(p.metric_sums),
        "metric_weights": dict(p.metric_weights),
        "extra_counts": dict(p.extra_counts),
    }
    tensors = {DELTA_SUM: p.delta_sum, **_prefixed(EXTRAS_PREFIX, p.extra_sums)}
    return meta, tensors


def decode_partial(
    meta: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    *,
    client_id: str,
    round: int | None = None,  # noqa: A002 - the field's name
) -> Partial:
    """The :class:`Partial` of a ``partial`` message from edge ``client_id`` (its source).

    Checks the metadata's types (:meth:`Partial.validate` checks the sums against the model);
    raises :class:`~fedloom.core.errors.InvalidUpdateError` naming the first problem.
    """

    def bad(reason: str) -> InvalidUpdateError:
        return InvalidUpdateError(f"partial: {reason}", client_id=client_id)

    rnd = meta.get("round")
    if not _is_int(rnd) or (round is not None and rnd != round):
        raise bad(f"is for round {rnd!r}, not {round}" if round is not None else f"round must be an integer, got {rnd!r}")
    version = meta.get("model_version")
    if not _is_int(version) or version < 0:
        raise bad(f"model_version must be an integer >= 0, got {version!r}")
    weight = meta.get("weight")
    if not _is_number(weight):
        raise bad(f"weight must be a finite number >= 0, got {weight!r}")
    ids, examples = meta.get("client_ids"), meta.get("client_examples")
    if not isinstance(ids, list) or not all(isinstance(c, str) for c in ids):
        raise bad("client_ids must be a list of strings")
    if not isinstance(examples, list) or not all(_is_int(n) for n in examples):
        raise bad("client_examples must be a list of integers")
    maps = {k: meta.get(k, {}) for k in ("metric_sums", "metric_weights", "extra_counts")}
    for k, v in maps.items():
        if not isinstance(v, dict):
            raise bad(f"{k} must be a JSON object")
    unknown = [k for k in tensors if k != DELTA_SUM and not k.startswith(EXTRAS_PREFIX)]
    if unknown:
        raise bad(f"unexpected tensors {unknown[:5]}")
    if DELTA_SUM not in tensors:
        raise bad("has no delta_sum")
    extras = _unprefixed(EXTRAS_PREFIX, tensors)
    if set(extras) != set(maps["extra_counts"]):
        raise bad("extras and extra_counts name different keys")
    return Partial(
        source=client_id,
        round=rnd,
        model_version=version,
        delta_sum=tensors[DELTA_SUM],
        weight=float(weight),
        client_ids=tuple(ids),
        client_examples=tuple(examples),
        metric_sums=maps["metric_sums"],
        metric_weights=maps["metric_weights"],
        extra_sums=extras,
        extra_counts=maps["extra_counts"],
    )


# --------------------------------------------------------------------------- evaluation results, failures
def encode_eval_result(num_examples: int, metrics: Mapping[str, float]) -> Meta:
    """The metadata of an ``eval_result`` message (it has no tensors)."""
    return {"num_examples": num_examples, "metrics": dict(metrics)}


def decode_eval_result(
    meta: Mapping[str, Any], *, client_id: str, max_examples: int | None = None
) -> tuple[int, dict[str, float]]:
    """``(num_examples, metrics)`` of an ``eval_result``; ``max_examples`` is the client's
    registered test-set size. Raises :class:`~fedloom.core.errors.InvalidUpdateError`."""

    def bad(reason: str) -> InvalidUpdateError:
        return InvalidUpdateError(reason, client_id=client_id)

    metrics = meta.get("metrics", {})
    if not isinstance(metrics, dict):
        raise bad("metrics must be a JSON object")
    n = meta.get("num_examples")
    if not _is_int(n) or n < 0:
        raise bad(f"num_examples must be an integer >= 0, got {n!r}")
    if max_examples is not None and n > max_examples:
        raise bad(f"num_examples {n} exceeds the registered {max_examples}")
    for k, v in metrics.items():
        if not _is_number(v) or not math.isfinite(float(v)):
            raise bad(f"metric {k!r} is not a finite number")
    return n, {str(k): float(v) for k, v in metrics.items()}


def encode_failure(reason: str) -> Meta:
    """The metadata of a ``failure`` message: why the client could not do its task."""
    return {"reason": reason}


def decode_failure(meta: Mapping[str, Any]) -> str:
    """The reason of a ``failure`` message, at most 500 characters."""
    return str(meta.get("reason", "unspecified"))[:MAX_FAILURE_REASON]
