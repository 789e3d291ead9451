"""Weighting as a stage: the aggregator computes a plain sum, this stage owns the weights.

The client half multiplies its delta by its weight and records the weight in the update,
so the server's sum is Σ w_i Δ_i and Σ w_i travels beside it (what SecAgg and DP need); the
finalize half divides the sum by the total weight. FedAvg (McMahan et al. 2017) weights by
the number of examples n_i (:class:`ExampleWeighting`), an unweighted mean uses w_i = 1
(:class:`UniformWeighting`). The server half checks that the weight a client claims is the
one the rule gives it (its example count, already bounded by the registered count, or 1), so
a client cannot buy influence by inflating its weight. ``ExampleWeighting(cap=K)`` weights by
min(n_i, K): a client that declares an inflated count (an authenticated client may register
any) then holds at most K of the round's weight (``[[pipeline]] name = "weight_examples"``,
``cap = K`` replaces the strategy's weighting).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from fedloom.core.errors import ConfigError, StrategyError
from fedloom.core.types import Aggregate, ClientUpdate
from fedloom.pipeline.base import ClientBatch, Stage, StageContext, StageState

__all__ = ["ExampleWeighting", "UniformWeighting", "WeightingStage"]


class WeightingStage(Stage):
    """Weight each client's delta client-side; divide the sum by the total weight at the end."""

    weighting: ClassVar[bool] = True

    def weight_of(self, update: ClientUpdate) -> float:
        raise NotImplementedError

    def client(self, batch: ClientBatch, ctx: StageContext) -> None:
        if batch.deltas is None:
            raise StrategyError(f"stage {self.name!r} must run before any encoding stage")
        w = [self.weight_of(u) for u in batch.updates]
        batch.deltas = batch.deltas * torch.tensor(w, dtype=batch.deltas.dtype, device=batch.deltas.device).unsqueeze(1)
        batch.weights = w

    def server(self, update: ClientUpdate, ctx: StageContext) -> ClientUpdate:
        want = self.weight_of(update)
        if update.weight is None:
            raise self.reject(update, "the update carries no weight")
        if float(update.weight) != want:
            raise self.reject(update, f"weight {update.weight!r} is not the rule's {want!r}")
        return update

    def finalize(
        self, aggregate: Aggregate, ctx: StageContext, state: StageState
    ) -> tuple[Aggregate, StageState, dict[str, float]]:
        total = aggregate.weight
        if total is None or not total > 0.0:
            raise StrategyError(f"stage {self.name!r}: total aggregation weight is {total!r}")
        delta = (aggregate.delta.to(torch.float64) / total).to(ctx.dtype)
        return replace(aggregate, delta=delta, weight=None), state, {}


@dataclass(frozen=True)
class ExampleWeighting(WeightingStage):
    """w_i = n_i, the client's number of training examples (FedAvg); min(n_i, ``cap``) with a cap."""

    name: ClassVar[str] = "weight_examples"

    cap: int | None = None

    def __post_init__(self) -> None:
        c = self.cap
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ConfigError(f"must be an integer >= 1, got {c!r}", key="cap")

    def weight_of(self, update: ClientUpdate) -> float:
        n = update.num_examples
        return float(n if self.cap is None else min(n, self.cap))


@dataclass(frozen=True)
class UniformWeighting(WeightingStage):
    """w_i = 1 (an unweighted mean, as SCAFFOLD's paper averages)."""

    name: ClassVar[str] = "weight_uniform"

    def weight_of(self, update: ClientUpdate) -> float:
        return 1.0
