"""A :class:`Pipeline`: the ordered stages of a run and where each half runs.

:func:`finish_clients` runs the client halves in order on a batch of trained clients
(engines and the deployed agent call it with the recipes their instructions carry); the server
runs ``decode`` per update (server halves in reverse order) and ``finalize`` on the
aggregate (finalize halves in reverse order, each stage with its own server state kept in
:class:`~fedloom.strategies.base.ServerState` under ``stage.<index>.<name>.`` keys, tensors
and meta alike). ``broadcast`` is the optional stage that encodes the global model sent down.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.core.params import ParamSpec
from fedloom.core.types import Aggregate, ClientInstruction, ClientUpdate, ComponentSpec, Payload
from fedloom.pipeline.base import ClientBatch, Stage, StageContext, StageState
from fedloom.pipeline.registry import build_stage

log = logging.getLogger("fedloom.federation")

__all__ = ["Broadcast", "Pipeline", "client_stages", "finish_clients", "run_client_stages"]

_BUILT: dict[ComponentSpec, Stage] = {}


def client_stages(recipes: Sequence[ComponentSpec]) -> list[Stage]:
    """The stages an instruction's recipes name (built once per recipe and cached)."""
    out = []
    for r in recipes:
        st = _BUILT.get(r)
        if st is None:
            if len(_BUILT) >= 256:  # recipes that change every round (adaptive clipping) must not pile up
                _BUILT.clear()
            st = _BUILT[r] = build_stage(r)
        out.append(st)
    return out


def run_client_stages(batch: ClientBatch, recipes: Sequence[ComponentSpec], ctx: StageContext) -> list[ClientUpdate]:
    """Run the client halves named by ``recipes`` on ``batch``, in order; return the updates."""
    for st in client_stages(recipes):
        st.client(batch, ctx)
    return batch.finish()


def finish_clients(
    spec: ParamSpec,
    instructions: Sequence[ClientInstruction],
    updates: Sequence[ClientUpdate],
    states: Sequence[Mapping[str, torch.Tensor]],
    deltas: torch.Tensor | None = None,
) -> tuple[list[ClientUpdate], list[Mapping[str, torch.Tensor]]]:
    """Trained clients' updates after their instructions' client stages, and their new states.

    The one place every engine (k clients as one batch) and the deployed agent (k = 1) run
    the client halves. ``deltas`` (k, numel), if given, are the updates' deltas as one matrix
    (no copy). The instructions must share their stage recipes (engines group by them).
    """
    if not instructions:
        return [], []
    recipes = instructions[0].stages
    if any(ins.stages != recipes for ins in instructions):
        raise ValueError("finish_clients: instructions of one batch must share their stages")
    if not recipes:
        return list(updates), list(states)
    batch = ClientBatch.of(list(updates), [ins.seed for ins in instructions], list(states), deltas)
    dtype = batch.deltas.dtype if batch.deltas is not None else spec.dtype
    out = run_client_stages(batch, recipes, StageContext(spec, instructions[0].round, dtype))
    return out, list(batch.states)


@dataclass(frozen=True)
class Broadcast:
    """The global model as the clients receive it: the decoded vector and what travelled."""

    vector: torch.Tensor
    payload: Payload | None = None

    @property
    def nbytes(self) -> int:
        if self.payload is not None:
            return self.payload.nbytes
        return self.vector.numel() * self.vector.element_size()


@dataclass(frozen=True)
class Pipeline:
    """The run's stages in client order, and the optional broadcast stage."""

    stages: tuple[Stage, ...] = ()
    broadcast_stage: Stage | None = None
    _recipes: tuple[ComponentSpec, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        encoder: Stage | None = None
        for st in self.stages:
            if encoder is not None and st.runs_on_client:
                raise ConfigError(
                    f"stage {st.name!r} comes after {encoder.name!r}, which encodes the update: "
                    "an encoding stage must be the last client stage",
                    key="pipeline",
                )
            if getattr(st, "codec", None) is not None:
                encoder = st
        if self.broadcast_stage is not None and not getattr(self.broadcast_stage, "supports_broadcast", False):
            raise ConfigError(f"stage {self.broadcast_stage.name!r} cannot encode the broadcast model", key="broadcast.name")
        object.__setattr__(self, "_recipes", tuple(st.recipe() for st in self.stages if st.runs_on_client))

    @property
    def recipes(self) -> tuple[ComponentSpec, ...]:
        """The client halves as recipes, for the instructions."""
        return self._recipes

    def _key(self, i: int, st: Stage) -> str:
        return f"stage.{i}.{st.name}"

    def _state(self, i: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> StageState:
        key = self._key(i, self.stages[i])
        prefix = f"{key}."
        return StageState(
            tensors={k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
            meta=meta.get(key, {}),
        )

    @property
    def aggregates_empty(self) -> bool:
        """Whether a round without valid updates still runs finalize (a stage asks for it)."""
        return any(st.aggregates_empty for st in self.stages)

    def for_round(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Pipeline:
        """The pipeline as it runs this round: each stage's :meth:`~Stage.for_round` copy."""
        stages = tuple(st.for_round(self._state(i, tensors, meta)) for i, st in enumerate(self.stages))
        if all(a is b for a, b in zip(stages, self.stages, strict=True)):
            return self
        return Pipeline(stages, broadcast_stage=self.broadcast_stage)

    def admit(self, rnd: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        """Raise :class:`~fedloom.core.errors.BudgetExhausted` if a stage refuses round ``rnd``."""
        for i, st in enumerate(self.stages):
            st.admit(self._state(i, tensors, meta), rnd)

    # ------------------------------------------------------------------ server
    def decode(self, update: ClientUpdate, ctx: StageContext) -> ClientUpdate:
        """The server halves, in reverse order, on one update."""
        for st in reversed(self.stages):
            update = st.server(update, ctx)
        return update

    def check(self, update: ClientUpdate, ctx: StageContext, *, max_examples: int | None = None) -> ClientUpdate:
        """The update decoded by the server halves and validated for ``ctx``'s model, or InvalidUpdateError.

        A stage failing in any other way (a hostile payload) is an invalid update too: it never
        takes the server down. Stateless, so a worker can run it (per-worker partial sums).
        """
        try:
            update = self.decode(update, ctx)
        except InvalidUpdateError:
            raise
        except Exception as exc:  # noqa: BLE001 - a hostile payload must never take the server down
            log.exception("round %d: decoding the update from %r failed", ctx.round, update.client_id)
            raise InvalidUpdateError(f"decoding failed: {type(exc).__name__}: {exc}", client_id=update.client_id) from None
        update.validate(numel=ctx.spec.numel, dtype=ctx.dtype, max_examples=max_examples)
        return update

    def init_state(self, spec: ParamSpec) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The stages' initial server state as ServerState tensors and meta entries."""
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {}
        for i, st in enumerate(self.stages):
            s = st.init_state(spec)
            key = self._key(i, st)
            tensors.update({f"{key}.{k}": v for k, v in s.tensors.items()})
            if s.meta:
                meta[key] = dict(s.meta)
        return tensors, meta

    def finalize(
        self,
        aggregate: Aggregate,
        ctx: StageContext,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
    ) -> tuple[Aggregate, dict[str, torch.Tensor], dict[str, Any], dict[str, float]]:
        """The finalize halves, in reverse order; returns the new stage state and metrics."""
        new_tensors = dict(tensors)
        new_meta = dict(meta)
        metrics: dict[str, float] = {}
        for i in reversed(range(len(self.stages))):
            st = self.stages[i]
            key = self._key(i, st)
            prefix = f"{key}."
            state = self._state(i, tensors, meta)
            aggregate, state, m = st.finalize(aggregate, ctx, state)
            for k in [k for k in new_tensors if k.startswith(prefix)]:
                del new_tensors[k]
            new_tensors.update({f"{prefix}{k}": v for k, v in state.tensors.items()})
            if state.meta:
                new_meta[key] = dict(state.meta)
            else:
                new_meta.pop(key, None)
            metrics.update(m)
        return aggregate, new_tensors, new_meta, metrics

    # --------------------------------------------------------------- broadcast
    def broadcast(self, params: torch.Tensor, ctx: StageContext, seed: int) -> Broadcast:
        """The global model as sent: encoded by the broadcast stage (and decoded back), or dense."""
        st = self.broadcast_stage
        if st is None:
            return Broadcast(vector=params)
        payload = st.encode_model(params, ctx, seed)  # type: ignore[attr-defined]
        return Broadcast(vector=st.decode_model(payload, ctx), payload=payload)  # type: ignore[attr-defined]
