"""Contribution weighting: client weights from the norms of their (estimated) gradients.

The project specification defines the aggregate as

    w = Σ_i (1/Δ_i) · w_i,   with   Δ_i = 1 / Σ_j ‖∇L_j(w)‖².

Read literally, 1/Δ_i = Σ_j ‖∇L_j(w)‖² is the *same* number for every client i (the sum
runs over all clients j), so it weights nobody differently, and the weights do not sum
to 1 (with K clients the model would be scaled by K · Σ_j ‖∇L_j‖²). Its evident intent is to weight each
client by its own share of the total squared gradient norm. This module implements that
intent, in two modes, with g_i client i's average gradient over the round:

* ``mode="norm"`` (the specification's intent)::

      p_i = ‖g_i‖² / Σ_j ‖g_j‖²

  Clients whose data still pull the model hard count more. It rewards large updates, so
  a client that scales its update up dominates; pair it with clipping against attacks.

* ``mode="inverse"``::

      p_i = (1/‖g_i‖²) / Σ_j (1/‖g_j‖²)

  Damps outliers: a client with an unusually large update counts less.

The server then does ``x ← x + η_g · Σ_i p_i Δ_i``. Example counts are not used.

g_i is estimated from the update: with plain SGD at learning rate η_l for K_i steps,
``local − global = −η_l Σ_k g_i,k``, so ``g_i = −Δ_i / (η_l · K_i)``, η_l being the
strategy's ``TrainConfig.lr`` and K_i the update's ``num_steps``; when ``num_steps`` is 0
(unknown) the delta itself stands in for g_i. The norm is taken over the whole flat
delta (trainable parameters and buffers alike). With other local optimizers (momentum,
Adam) the estimate is only proportional to the mean step, which is all the weighting uses
when clients take the same number of steps.

Streaming, O(model) memory: the weighting is a server-side pipeline stage
(:class:`ContributionWeighting`) that scales each decoded delta by its unnormalized weight
(``‖g_i‖²`` or ``1/‖g_i‖²``); the aggregator sums, and the stage's finalize divides by the
total. (Under secure aggregation the server never sees a single delta, so this rule cannot
be combined with it.)

Zero norms. ``norm`` mode: a zero update has weight 0 and changes nothing; if every update
is zero the aggregate is the zero vector. ``inverse`` mode: 1/‖g_i‖² is infinite for a
zero update (its limit would hand that client the whole weight and freeze the model, an
easy attack for a free rider), so such an update — or one so small that 1/‖g_i‖²
overflows — is rejected with :class:`~fedloom.core.errors.InvalidUpdateError` naming the
client; the round goes on with the others (the aggregator records nothing of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch

from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.core.types import Aggregate, ClientUpdate
from fedloom.pipeline import Stage, StageContext, StageState, WeightingStage
from fedloom.strategies.base import Aggregator, ServerState, Strategy, SumAggregator

__all__ = [
    "ContributionAggregator",
    "ContributionMode",
    "ContributionWeighted",
    "ContributionWeighting",
    "squared_gradient_norm",
]

ContributionMode = Literal["norm", "inverse"]
_MODES = ("norm", "inverse")


def squared_gradient_norm(update: ClientUpdate, lr: float) -> float:
    """‖g_i‖² with ``g_i = −Δ_i / (lr · num_steps)`` (``g_i = Δ_i`` when ``num_steps`` is 0), in float64."""
    norm = float(torch.linalg.vector_norm(update.delta, dtype=torch.float64))
    if update.num_steps > 0:
        norm /= lr * update.num_steps
    return norm * norm


@dataclass(frozen=True)
class ContributionWeighting(WeightingStage):
    """The weighting stage of contribution weighting; it runs on the server only.

    Its server half computes the client's weight from its decoded delta (``norm``: ‖g_i‖²,
    ``inverse``: 1/‖g_i‖², with the strategy's local learning rate ``lr``) and scales the
    delta by it; the finalize half divides the sum by the total, as every weighting does.
    """

    name: ClassVar[str] = "weight_contribution"
    runs_on_client: ClassVar[bool] = False
    mode: ContributionMode = "norm"
    lr: float = 0.01

    def weight_of(self, update: ClientUpdate) -> float:
        sq = squared_gradient_norm(update, self.lr)
        if self.mode == "norm":
            if not math.isfinite(sq):
                raise InvalidUpdateError("squared update norm overflows float64", client_id=update.client_id)
            return sq
        w = 1.0 / sq if sq > 0.0 else math.inf
        if not math.isfinite(w):
            raise InvalidUpdateError(
                "zero (or vanishingly small) update norm cannot be inverse-weighted", client_id=update.client_id
            )
        return w

    def server(self, update: ClientUpdate, ctx: StageContext) -> ClientUpdate:
        w = self.weight_of(update)
        assert update.delta is not None
        return replace(update, delta=update.delta * w, weight=w)

    def finalize(
        self, aggregate: Aggregate, ctx: StageContext, state: StageState
    ) -> tuple[Aggregate, StageState, dict[str, float]]:
        if aggregate.weight == 0.0:
            # norm mode, every update zero (or underflowing): the weighted mean is zero.
            return replace(aggregate, delta=torch.zeros_like(aggregate.delta, dtype=ctx.dtype), weight=None), state, {}
        return super().finalize(aggregate, ctx, state)


class ContributionAggregator(SumAggregator):
    """The streaming sum, recording each accepted client's contribution weight.

    ``weights`` maps each accepted client to its unnormalized weight;
    :meth:`normalized_weights` gives the p_i actually applied.
    """

    partial_refusal = "it records each client's contribution weight"

    def __init__(self) -> None:
        super().__init__()
        self.weights: dict[str, float] = {}

    def _add(self, update: ClientUpdate) -> None:
        super()._add(update)
        self.weights[update.client_id] = 1.0 if update.weight is None else float(update.weight)

    def normalized_weights(self) -> dict[str, float]:
        """p_i = weight_i / Σ_j weight_j for every accepted client."""
        total = sum(self.weights.values())
        if total == 0.0:
            return {cid: 0.0 for cid in self.weights}
        return {cid: w / total for cid, w in self.weights.items()}


@dataclass(frozen=True, kw_only=True)
class ContributionWeighted(Strategy):
    """FedAvg's server step with contribution weights from gradient norms; ``mode`` is ``"norm"`` or ``"inverse"``."""

    name = "contribution"

    mode: ContributionMode = "norm"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in _MODES:
            raise ConfigError(f"must be one of {_MODES}, got {self.mode!r}", key="strategy.mode")

    def stages(self) -> tuple[Stage, ...]:
        return (ContributionWeighting(mode=self.mode, lr=self.train.lr),)

    def aggregator(self, state: ServerState, rnd: int) -> Aggregator:
        return ContributionAggregator()
