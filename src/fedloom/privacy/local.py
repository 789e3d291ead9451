"""Local DP on updates: each client clips and noises its own update before it leaves.

The stage ``dp_local`` protects a client from everyone downstream, the server included: the
client clips its delta to L2 norm ≤ C on the trainable entries and adds N(0, (σ·C)²) to each
of them, then sends it with weight 1 and without its training metrics. Whatever the server
does with the noised update (average it, take a median) is post-processing. Neighbouring
inputs of this mechanism are any two updates of the clip ball, so its L2 sensitivity is 2C
and the accountant's noise multiplier is σ/2 (a Gaussian mechanism, no sampling
amplification: the server knows who was asked). ``dp_epsilon_round`` is the ε of one
release; a client's ε composes over the rounds it took part in, and ``dp_epsilon`` is the
largest over the clients (the server counts each client's rounds in its state).

The noise must come from the client itself: ``noise = "os"`` (what deployments use) seeds
each draw with OS entropy; ``"seeded"`` derives it from the round's client seed, which the
server chose, so it is for reproducible simulation only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from fedloom.core.errors import BudgetExhausted, ConfigError, StrategyError
from fedloom.core.seeding import derive_seed
from fedloom.core.types import Aggregate, ClientUpdate
from fedloom.pipeline.base import ClientBatch, Stage, StageContext, StageState
from fedloom.privacy import accountant as acct
from fedloom.privacy._common import check_noise_source, check_positive, clip_rows, gaussian, stripped, trainable_norm

__all__ = ["LocalDP"]


@dataclass(frozen=True)
class LocalDP(Stage):
    """Clip and noise on the client (Gaussian mechanism); a uniform mean on the server."""

    name: ClassVar[str] = "dp_local"
    weighting: ClassVar[bool] = True

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    max_epsilon: float | None = None
    noise: str = "seeded"

    def __post_init__(self) -> None:
        check_positive(self.clip_norm, "clip_norm")
        check_positive(self.noise_multiplier, "noise_multiplier")
        acct.check_delta(self.delta, key="delta")
        if self.accountant not in acct.ACCOUNTANTS:
            raise ConfigError(f"must be one of {', '.join(acct.ACCOUNTANTS)}, got {self.accountant!r}", key="accountant")
        if self.max_epsilon is not None:
            check_positive(self.max_epsilon, "max_epsilon")
        check_noise_source(self.noise, key="noise")

    def _epsilon(self, releases: int) -> float:
        ledger = acct.add((), self.noise_multiplier / 2.0, 1.0, releases)
        return acct.epsilon(ledger, self.delta, self.accountant)  # type: ignore[arg-type]

    @property
    def epsilon_per_round(self) -> float:
        """ε at ``delta`` of one noised update."""
        return self._epsilon(1)

    def init_state(self, spec: Any) -> StageState:
        return StageState(meta={"rounds": {}})

    def _rounds(self, state: StageState) -> dict[str, int]:
        rounds = state.meta.get("rounds", {})
        if not isinstance(rounds, dict) or not all(isinstance(v, int) and v >= 0 for v in rounds.values()):
            raise StrategyError(f"stage {self.name!r}: the participation counts in the server state are corrupt")
        return dict(rounds)

    def admit(self, state: StageState, rnd: int) -> None:
        if self.max_epsilon is None:
            return
        most = max(self._rounds(state).values(), default=0)
        eps = self._epsilon(most + 1)
        if eps > self.max_epsilon:
            raise BudgetExhausted(
                f"privacy budget: round {rnd} would bring a client's local ε to {eps:.4g} > max_epsilon "
                f"{self.max_epsilon:g} (δ = {self.delta:g}, {most} rounds so far)"
            )

    def client(self, batch: ClientBatch, ctx: StageContext) -> None:
        if batch.deltas is None:
            raise StrategyError(f"stage {self.name!r} must run before any encoding stage")
        clipped, _ = clip_rows(batch.deltas, ctx.trainable, self.clip_norm)
        mask = ctx.trainable.to(clipped.device)
        std = self.noise_multiplier * self.clip_norm
        for i, seed in enumerate(batch.seeds):
            noise = gaussian(
                (clipped.shape[1],), std, source=self.noise, seed=derive_seed(seed, "dp-local"), dtype=clipped.dtype  # type: ignore[arg-type]
            )
            clipped[i] += noise.to(clipped.device) * mask
        batch.deltas = clipped
        batch.weights = [1.0] * len(batch)
        batch.updates = [stripped(u) for u in batch.updates]

    def server(self, update: ClientUpdate, ctx: StageContext) -> ClientUpdate:
        if update.weight is None or float(update.weight) != 1.0:
            raise self.reject(update, f"weight {update.weight!r} is not 1 (local DP weights clients uniformly)")
        d = update.delta
        if d is None:
            raise self.reject(update, "expects a dense delta (was an encoding stage's payload left undecoded?)")
        if d.dim() != 1 or d.numel() != ctx.spec.numel or not d.dtype.is_floating_point:
            raise self.reject(update, f"delta has shape {tuple(d.shape)} and dtype {d.dtype}, expected ({ctx.spec.numel},) float")
        norm, outside = trainable_norm(d, ctx.trainable)
        if not (math.isfinite(norm) and math.isfinite(outside)):
            raise self.reject(update, "delta contains NaN or Inf")
        if outside != 0.0:
            raise self.reject(update, f"delta moves non-trainable entries (max |value| {outside:.3g})")
        if update.extras:
            raise self.reject(update, f"carries extras {sorted(update.extras)}, which local DP does not noise")
        return replace(update, metrics={})

    def finalize(
        self, aggregate: Aggregate, ctx: StageContext, state: StageState
    ) -> tuple[Aggregate, StageState, dict[str, float]]:
        if aggregate.weight is not None:  # a sum (robust aggregators hand over their final result)
            if not aggregate.weight > 0.0:
                raise StrategyError(f"stage {self.name!r}: total aggregation weight is {aggregate.weight!r}")
            aggregate = replace(aggregate, delta=(aggregate.delta.to(torch.float64) / aggregate.weight).to(ctx.dtype), weight=None)
        rounds = self._rounds(state)
        for cid in aggregate.client_ids:
            rounds[cid] = rounds.get(cid, 0) + 1
        metrics = {"dp_epsilon": self._epsilon(max(rounds.values(), default=0)), "dp_epsilon_round": self.epsilon_per_round}
        return aggregate, StageState(state.tensors, {**state.meta, "rounds": rounds}), metrics
