"""User-level central DP: DP-FedAvg (McMahan et al. 2018) with fixed or adaptive clipping.

The stage ``dp_central`` has three halves:

* **client** — each client's delta is clipped to L2 norm ≤ C on the trainable entries (one
  batched operation over a chunk's rows) and sent with weight 1; training metrics stay home
  (they are not noised). With adaptive clipping the client also sends the bit
  b_i = 1[‖Δ_i‖ ≤ C] as the one-element extra ``dp_clip_bit``.
* **server** — an update whose norm exceeds C (beyond float32 rounding, see
  :data:`~fedloom.privacy._common.CLIP_TOLERANCE`), that moves a non-trainable entry, carries
  a weight other than 1, or carries any other extra is rejected with the reason: the server
  never sums an unclipped update.
* **finalize** — Gaussian noise of standard deviation σ·C is added to the SUM of the clipped
  updates, which is divided by the **fixed** denominator q·N (q the Poisson sampling rate,
  N the clients the round sampled from): the unbiased estimator of McMahan et al. 2018 with
  uniform weights. Its sensitivity to adding or removing one client is C, whatever the
  cohort, so the accountant's Poisson-subsampled Gaussian (noise multiplier σ, rate q) is
  exactly the mechanism. The weights are uniform on purpose: example weights would need
  bounded, public per-client counts (their ``w_k = min(n_k / ŵ, 1)``), and a client's
  self-reported count is neither. A round whose Poisson cohort is empty (or whose clients all
  failed) still releases the noised zero sum, so that whether a round moves the model does
  not depend on who was sampled.

Adaptive quantile clipping (Andrew et al. 2021, "Differentially private learning with
adaptive clipping"): the server releases the noised fraction of unclipped updates
b̃ = (Σ_i (b_i − ½) + N(0, σ_b²)) / (q·N) + ½ and moves the clip norm geometrically,
C ← C · exp(−η_C (b̃ − γ)) toward the γ-quantile of the update norms. The count has
sensitivity ½, so the pair (update sum, count) is one Gaussian mechanism with noise
multiplier σ when the update's multiplier is σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−½) (their Theorem 1);
``noise_multiplier`` is that combined σ, and σ_b must exceed σ/2. The paper's defaults:
γ = 0.5, η_C = 0.2, σ_b = expected cohort / 20.

Every round adds one entry to the ledger in the stage's server state, and the round's
``dp_epsilon`` (at ``delta``) is reported; :meth:`CentralDP.admit` refuses a round that would
bring ε past ``max_epsilon``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from fedloom.core.errors import BudgetExhausted, ConfigError, StrategyError
from fedloom.core.seeding import derive_seed
from fedloom.core.types import Aggregate, ClientUpdate, ComponentSpec
from fedloom.pipeline.base import ClientBatch, Stage, StageContext, StageState
from fedloom.privacy import accountant as acct
from fedloom.privacy._common import (
    CLIP_TOLERANCE,
    check_noise_source,
    check_positive,
    clip_rows,
    gaussian,
    stripped,
    trainable_norm,
)

__all__ = ["CLIP_BIT", "CentralDP"]

CLIP_BIT = "dp_clip_bit"
"""The extra carrying adaptive clipping's bit b_i = 1[‖Δ_i‖ ≤ C] (shape (1,))."""


@dataclass(frozen=True)
class CentralDP(Stage):
    """DP-FedAvg's clip (client), check (server) and noise + fixed denominator (finalize); see the module doc."""

    name: ClassVar[str] = "dp_central"
    weighting: ClassVar[bool] = True
    aggregates_empty: ClassVar[bool] = True

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    sample_rate: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    max_epsilon: float | None = None
    target_quantile: float | None = None
    clip_lr: float = 0.2
    count_stddev: float | None = None
    noise: str = "seeded"
    noise_seed: int = 0

    def __post_init__(self) -> None:
        check_positive(self.clip_norm, "clip_norm")
        check_positive(self.noise_multiplier, "noise_multiplier")
        q = self.sample_rate
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not (0.0 < q <= 1.0):
            raise ConfigError(f"must be in (0, 1], got {q!r}", key="sample_rate")
        acct.check_delta(self.delta, key="delta")
        if self.accountant not in acct.ACCOUNTANTS:
            raise ConfigError(f"must be one of {', '.join(acct.ACCOUNTANTS)}, got {self.accountant!r}", key="accountant")
        if self.max_epsilon is not None:
            check_positive(self.max_epsilon, "max_epsilon")
        check_noise_source(self.noise, key="noise")
        if self.target_quantile is not None:
            tq = self.target_quantile
            if isinstance(tq, bool) or not isinstance(tq, (int, float)) or not (0.0 < tq < 1.0):
                raise ConfigError(f"must be in (0, 1), got {tq!r}", key="target_quantile")
            check_positive(self.clip_lr, "clip_lr")
            if self.count_stddev is None:
                raise ConfigError("adaptive clipping needs the count's noise standard deviation", key="count_stddev")
            check_positive(self.count_stddev, "count_stddev")
            if not 2.0 * self.count_stddev > self.noise_multiplier:
                raise ConfigError(
                    f"must exceed noise_multiplier / 2 = {self.noise_multiplier / 2:g} (the count's share of the "
                    f"privacy budget would leave none for the update), got {self.count_stddev:g}",
                    key="count_stddev",
                )

    # ----------------------------------------------------------------- options
    @property
    def adaptive(self) -> bool:
        return self.target_quantile is not None

    @property
    def update_noise_multiplier(self) -> float:
        """σ_Δ: the update's own noise multiplier (σ itself with fixed clipping)."""
        if not self.adaptive:
            return self.noise_multiplier
        assert self.count_stddev is not None
        return (self.noise_multiplier**-2 - (2.0 * self.count_stddev) ** -2) ** -0.5

    def recipe(self) -> ComponentSpec:
        """What the clients need: the round's clip norm and whether to send the bit; never the noise seed."""
        return ComponentSpec.of(
            self.name,
            clip_norm=self.clip_norm,
            noise_multiplier=self.noise_multiplier,
            target_quantile=self.target_quantile,
            count_stddev=self.count_stddev,
        )

    def init_state(self, spec: Any) -> StageState:
        meta: dict[str, Any] = {"ledger": []}
        if self.adaptive:
            meta["clip_norm"] = float(self.clip_norm)
        return StageState(meta=meta)

    def for_round(self, state: StageState) -> Stage:
        c = state.meta.get("clip_norm")
        if self.adaptive and c is not None and float(c) != self.clip_norm:
            return replace(self, clip_norm=float(c))
        return self

    def _ledger(self, state: StageState) -> acct.Ledger:
        try:
            return acct.ledger_from_json(state.meta.get("ledger", []))
        except ValueError as exc:
            raise StrategyError(f"stage {self.name!r}: the privacy ledger in the server state is corrupt: {exc}") from None

    def admit(self, state: StageState, rnd: int) -> None:
        if self.max_epsilon is None:
            return
        after = acct.add(self._ledger(state), self.noise_multiplier, self.sample_rate)
        eps = acct.epsilon(after, self.delta, self.accountant)  # type: ignore[arg-type]
        if eps > self.max_epsilon:
            now = acct.epsilon(self._ledger(state), self.delta, self.accountant)  # type: ignore[arg-type]
            raise BudgetExhausted(
                f"privacy budget: round {rnd} would bring ε from {now:.4g} to {eps:.4g} > max_epsilon "
                f"{self.max_epsilon:g} (δ = {self.delta:g}, {self.accountant})"
            )

    # ------------------------------------------------------------------ halves
    def client(self, batch: ClientBatch, ctx: StageContext) -> None:
        if batch.deltas is None:
            raise StrategyError(f"stage {self.name!r} must run before any encoding stage")
        clipped, norms = clip_rows(batch.deltas, ctx.trainable, self.clip_norm)
        batch.deltas = clipped
        batch.weights = [1.0] * len(batch)
        updates = [stripped(u) for u in batch.updates]
        if self.adaptive:
            bits = (norms <= self.clip_norm).tolist()
            updates = [
                replace(u, extras={**u.extras, CLIP_BIT: torch.tensor([float(b)], dtype=clipped.dtype)})
                for u, b in zip(updates, bits, strict=True)
            ]
        batch.updates = updates

    def server(self, update: ClientUpdate, ctx: StageContext) -> ClientUpdate:
        if update.weight is None or float(update.weight) != 1.0:
            raise self.reject(update, f"weight {update.weight!r} is not 1 (DP-FedAvg weights clients uniformly)")
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
        limit = self.clip_norm * (1.0 + CLIP_TOLERANCE)
        if norm > limit:
            raise self.reject(
                update, f"L2 norm {norm:.6g} exceeds the clip norm {self.clip_norm:.6g}: the server expects clipped updates"
            )
        allowed = {CLIP_BIT} if self.adaptive else set()
        unknown = sorted(set(update.extras) - allowed)
        if unknown:
            raise self.reject(update, f"carries extras {unknown}, which central DP does not clip")
        if self.adaptive:
            bit = update.extras.get(CLIP_BIT)
            if bit is None or bit.shape != (1,) or float(bit[0]) not in (0.0, 1.0):
                raise self.reject(update, f"adaptive clipping needs extras[{CLIP_BIT!r}] = [0] or [1]")
        if norm > self.clip_norm:  # within rounding: scale to exactly C so the sensitivity bound holds
            d = (d.to(torch.float64) * (self.clip_norm / norm)).to(d.dtype)
        return replace(update, delta=d, metrics={})

    def finalize(
        self, aggregate: Aggregate, ctx: StageContext, state: StageState
    ) -> tuple[Aggregate, StageState, dict[str, float]]:
        n = aggregate.num_available if aggregate.num_available is not None else aggregate.num_clients
        if not n:
            raise StrategyError(f"stage {self.name!r}: no client was available to sample from")
        denom = self.sample_rate * n
        mask = ctx.trainable.to(aggregate.delta.device)
        seed = derive_seed(self.noise_seed, "dp-central", ctx.round)
        std = self.update_noise_multiplier * self.clip_norm
        noise = gaussian((ctx.spec.numel,), std, source=self.noise, seed=seed, dtype=torch.float64)  # type: ignore[arg-type]
        total = aggregate.delta.to(torch.float64) + noise.to(aggregate.delta.device) * mask
        delta = (total / denom).to(ctx.dtype)
        meta = dict(state.meta)
        metrics: dict[str, float] = {}
        if self.adaptive:
            assert self.count_stddev is not None and self.target_quantile is not None
            k = aggregate.num_clients
            bits = float(aggregate.extras[CLIP_BIT].to(torch.float64).sum()) * k if k else 0.0  # mean x count
            count_noise = float(gaussian((1,), self.count_stddev, source=self.noise, seed=derive_seed(seed, "count"), dtype=torch.float64)[0])  # type: ignore[arg-type]
            unclipped = (round(bits) - k / 2.0 + count_noise) / denom + 0.5
            meta["clip_norm"] = self.clip_norm * math.exp(-self.clip_lr * (unclipped - self.target_quantile))
            metrics["dp_clip_norm"] = self.clip_norm
            metrics["dp_unclipped"] = unclipped
        ledger = acct.add(self._ledger(state), self.noise_multiplier, self.sample_rate)
        meta["ledger"] = [list(e) for e in ledger]
        metrics["dp_epsilon"] = acct.epsilon(ledger, self.delta, self.accountant)  # type: ignore[arg-type]
        extras = {k: v for k, v in aggregate.extras.items() if k != CLIP_BIT}
        return replace(aggregate, delta=delta, weight=None, extras=extras), StageState(state.tensors, meta), metrics
