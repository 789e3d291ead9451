"""The update pipeline's parts: :class:`Stage`, :class:`ClientBatch`, :class:`StageContext`.

A stage is a postprocessor of client updates with up to three halves (pfl-research's
postprocessors, DESIGN.md):

* ``client(batch, ctx)`` — on the client, after local training, in pipeline order. It works
  on a :class:`ClientBatch`: the deltas of k clients as the rows of ONE ``(k, numel)``
  matrix, so the vectorized engine applies a stage to a whole chunk in one operation and the
  sequential engine, the Ray workers and the deployed agent call it with k = 1. A stage may
  keep client state (an error-feedback residual) under its own keys in the batch's states.
* ``server(update, ctx)`` — on the server, per update, in reverse order, before aggregation:
  decode the stage's payload and check it; bad input raises
  :class:`~fedloom.core.errors.InvalidUpdateError` naming the stage, and the round goes on.
* ``finalize(aggregate, ctx, state)`` — on the server, once per round on the aggregate, in
  reverse order; may keep server state (tensors and JSON ``meta``) that is checkpointed with
  the :class:`~fedloom.strategies.base.ServerState`.

Stages are frozen dataclasses whose fields are their options, so a stage is also its recipe
(:meth:`Stage.recipe`, a :class:`~fedloom.core.types.ComponentSpec`) and travels to client
processes in the instruction. A stage whose options change between rounds (adaptive
clipping's clip norm) returns this round's copy of itself from :meth:`Stage.for_round`, built
from its server state; the round's instructions carry that copy's recipe. :meth:`Stage.admit`
may refuse to start a round (a privacy budget that the round would exceed).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from fedloom.core.errors import InvalidUpdateError
from fedloom.core.params import ParamSpec
from fedloom.core.types import Aggregate, ClientUpdate, ComponentSpec, Payload

__all__ = ["ClientBatch", "Stage", "StageContext", "StageState"]


@dataclass(frozen=True)
class StageContext:
    """What a stage sees besides the updates: the model's spec, the round, the vector dtype."""

    spec: ParamSpec
    round: int
    dtype: torch.dtype = torch.float32

    @property
    def trainable(self) -> torch.Tensor:
        """Boolean mask (numel,) of the trainable entries of the flat vector."""
        return _mask(self.spec)


@functools.lru_cache(maxsize=32)
def _mask(spec: ParamSpec) -> torch.Tensor:
    return spec.trainable_mask()


@dataclass(frozen=True)
class StageState:
    """A stage's server state: named tensors and JSON-serializable ``meta``."""

    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ClientBatch:
    """k clients' updates between local training and the wire.

    ``updates`` hold each client's header (id, round, examples, metrics, extras);
    ``deltas`` the dense deltas as rows (None once a stage encoded them into ``payloads``);
    ``weights`` the aggregation weight applied so far (None: none); ``states`` each client's
    whole client state (a stage reads and writes its own ``"<stage>.<key>"`` entries);
    ``seeds`` each client's seed for this round (stochastic stages derive theirs from it).
    """

    updates: list[ClientUpdate]
    deltas: torch.Tensor | None
    seeds: list[int]
    states: list[dict[str, torch.Tensor]]
    payloads: list[Payload] | None = None
    weights: list[float] | None = None

    @classmethod
    def of(
        cls,
        updates: list[ClientUpdate],
        seeds: list[int],
        states: list[Mapping[str, torch.Tensor]],
        deltas: torch.Tensor | None = None,
    ) -> ClientBatch:
        """A batch of dense updates; ``deltas`` (k, numel) may be given to avoid a copy."""
        if deltas is None:
            assert all(u.delta is not None for u in updates)
            deltas = torch.stack([u.delta for u in updates])  # type: ignore[misc]
        return cls(updates=list(updates), deltas=deltas, seeds=list(seeds), states=[dict(s) for s in states])

    def __len__(self) -> int:
        return len(self.updates)

    def finish(self) -> list[ClientUpdate]:
        """The batch as one :class:`ClientUpdate` per client (dense rows or payloads)."""
        out = []
        for i, u in enumerate(self.updates):
            weight = self.weights[i] if self.weights is not None else u.weight
            if self.payloads is not None:
                out.append(replace(u, delta=None, payload=self.payloads[i], weight=weight))
            else:
                assert self.deltas is not None
                out.append(replace(u, delta=self.deltas[i], payload=None, weight=weight))
        return out


class Stage:
    """Base of every pipeline stage; subclasses are frozen dataclasses (fields = options).

    ``name`` is the stage's registry name (:mod:`fedloom.pipeline.registry`); a stage that
    encodes updates sets ``codec`` (its payloads name it) and decodes them in ``server``.
    """

    name: ClassVar[str] = "stage"
    runs_on_client: ClassVar[bool] = True
    weighting: ClassVar[bool] = False
    """True for a stage that sets the aggregation weights: it replaces the strategy's weighting."""
    aggregates_empty: ClassVar[bool] = False
    """True if a round without any valid update must still run finalize (central DP noises an empty sum)."""

    # ------------------------------------------------------------------ halves
    def client(self, batch: ClientBatch, ctx: StageContext) -> None:
        """Transform the batch in place after local training (default: nothing)."""

    def server(self, update: ClientUpdate, ctx: StageContext) -> ClientUpdate:
        """Decode or check one update on the server (default: unchanged)."""
        return update

    def init_state(self, spec: ParamSpec) -> StageState:
        """The stage's initial server state (default: none)."""
        return StageState()

    def finalize(
        self, aggregate: Aggregate, ctx: StageContext, state: StageState
    ) -> tuple[Aggregate, StageState, dict[str, float]]:
        """Act on the round's aggregate (default: unchanged, no metrics)."""
        return aggregate, state, {}

    def for_round(self, state: StageState) -> Stage:
        """This stage as it runs this round, given its server state (default: itself)."""
        return self

    def admit(self, state: StageState, rnd: int) -> None:
        """Raise :class:`~fedloom.core.errors.BudgetExhausted` if round ``rnd`` must not run (default: admit)."""

    # ---------------------------------------------------------------- recipes
    def recipe(self) -> ComponentSpec:
        """This stage as a wire-ready recipe: its name and its dataclass fields."""
        opts = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else {}
        return ComponentSpec.of(self.name, **opts)

    def state_key(self, key: str) -> str:
        """The name of this stage's client-state entry ``key`` (``"<stage>.<key>"``)."""
        return f"{self.name}.{key}"

    def reject(self, update: ClientUpdate, reason: str) -> InvalidUpdateError:
        """An :class:`InvalidUpdateError` whose reason names this stage."""
        return InvalidUpdateError(f"stage {self.name!r}: {reason}", client_id=update.client_id)
