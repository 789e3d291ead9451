"""Distributed DP: each client adds its share of integer noise under secure aggregation.

Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
Learning", NeurIPS 2021 (and Kairouz, Liu, Steinke, ICML 2021, for the conditional
rounding). The stage ``dp_distributed`` runs only with ``[secure]`` (SecAgg, SecAgg+ or
CKKS): the client clips its delta to L2 norm ≤ C on the trainable entries and sends it
with weight 1 and without its training metrics; the secure protocol's encoding
(:class:`~fedloom.secure.encoding.SkellamPlan`) scales it to an integer grid, rounds it
conditionally (the integer vector's norm is at most Δ2) and adds Skellam noise of variance
(σ·Δ2)² / m for the m clients expected per round. The server only ever holds masked or
encrypted inputs and their sum, which carries the noise of every surviving client: Skellam
is closed under addition, so n survivors give one Skellam mechanism of variance n·(σ·Δ2)²/m.
Neither the server nor any client sees an individual update without the others' noise
and masks.

Accounting: each round releases that sum once. The neighbouring relation is zero-out (one
client's update replaced by a zero update; who took part and how many did are not hidden),
so the sensitivities are those of one rounded input (Δ2 and Δ1 ≤ min(Δ2², √d·Δ2)). The
ledger records the noise that was actually summed (fewer survivors: less noise, a larger
ε) and :func:`~fedloom.privacy.accountant.skellam_epsilon` composes it. No amplification
by sampling is claimed: the bound is for every client taking part in every round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from fedloom.core.errors import BudgetExhausted, StrategyError
from fedloom.core.types import Aggregate, ClientUpdate
from fedloom.pipeline.base import ClientBatch, Stage, StageContext, StageState
from fedloom.privacy import accountant as acct
from fedloom.privacy._common import check_noise_source, check_positive, clip_rows, stripped

__all__ = ["DistributedDP"]


@dataclass(frozen=True)
class DistributedDP(Stage):
    """Clip on the client; the secure protocol's encoding adds the noise; the accountant composes the sums."""

    name: ClassVar[str] = "dp_distributed"
    weighting: ClassVar[bool] = True

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    clients: int = 2
    delta: float = 1e-5
    max_epsilon: float | None = None
    noise: str = "seeded"
    modulus_bits: int = 32

    def __post_init__(self) -> None:
        check_positive(self.clip_norm, "clip_norm")
        check_positive(self.noise_multiplier, "noise_multiplier")
        acct.check_delta(self.delta, key="delta")
        if self.max_epsilon is not None:
            check_positive(self.max_epsilon, "max_epsilon")
        check_noise_source(self.noise, key="noise")
        if isinstance(self.clients, bool) or not isinstance(self.clients, int) or self.clients < 2:
            raise StrategyError(f"distributed DP needs at least 2 clients per round, got {self.clients!r}")

    def encoding(self, numel: int) -> Any:
        """The :class:`~fedloom.secure.encoding.SkellamPlan` the secure protocol carries (ConfigError if the ring is too small)."""
        from fedloom.secure.encoding import SkellamPlan  # the secure layer sits beside privacy; loaded when used

        return SkellamPlan.build(
            clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier, clients=self.clients, numel=numel,
            modulus_bits=self.modulus_bits, noise=self.noise,
        )  # fmt: skip

    def release(self, numel: int, survivors: int) -> acct.SkellamEntry:
        """The ledger entry of one round summed over ``survivors`` inputs: (variance, Δ1, Δ2, 1)."""
        plan = self.encoding(numel)
        l1, l2 = plan.sensitivity(numel)
        return (survivors * plan.variance, l1, l2, 1)

    def _ledger(self, state: StageState) -> acct.SkellamLedger:
        try:
            return acct.skellam_ledger_from_json(state.meta.get("ledger", []))
        except ValueError as exc:
            raise StrategyError(f"stage {self.name!r}: the privacy ledger in the server state is corrupt: {exc}") from None

    def epsilon(self, ledger: acct.SkellamLedger) -> float:
        return acct.skellam_epsilon(ledger, self.delta)

    def init_state(self, spec: Any) -> StageState:
        return StageState(meta={"ledger": [], "numel": int(spec.numel)})

    def admit(self, state: StageState, rnd: int) -> None:
        if self.max_epsilon is None:
            return
        numel = int(state.meta.get("numel", 0)) or 1
        v, l1, l2, _ = self.release(numel, self.clients)
        ledger = self._ledger(state)
        eps = self.epsilon(acct.skellam_add(ledger, v, l1, l2))
        if eps > self.max_epsilon:
            raise BudgetExhausted(
                f"privacy budget: round {rnd} would bring ε to {eps:.4g} > max_epsilon {self.max_epsilon:g} "
                f"(δ = {self.delta:g}, {sum(n for *_, n in ledger)} rounds so far)"
            )

    def client(self, batch: ClientBatch, ctx: StageContext) -> None:
        if batch.deltas is None:
            raise StrategyError(f"stage {self.name!r} must run before any encoding stage")
        clipped, _ = clip_rows(batch.deltas, ctx.trainable, self.clip_norm)
        batch.deltas = clipped
        batch.weights = [1.0] * len(batch)
        batch.updates = [stripped(u) for u in batch.updates]

    def server(self, update: ClientUpdate, ctx: StageContext) -> ClientUpdate:
        if update.weight is None or float(update.weight) != 1.0:
            raise self.reject(update, f"weight {update.weight!r} is not 1 (distributed DP weights clients uniformly)")
        if update.delta is not None:
            raise self.reject(update, "a plain update under distributed DP (it must arrive masked or encrypted)")
        return replace(update, metrics={})  # metrics are not noised: they never count

    def finalize(
        self, aggregate: Aggregate, ctx: StageContext, state: StageState
    ) -> tuple[Aggregate, StageState, dict[str, float]]:
        n = aggregate.num_clients
        total = aggregate.weight
        if total is None or not total > 0.0 or n < 1:
            raise StrategyError(f"stage {self.name!r}: total aggregation weight is {total!r}")
        delta = (aggregate.delta.to(torch.float64) / total).to(ctx.dtype)
        v, l1, l2, _ = self.release(ctx.spec.numel, n)
        ledger = acct.skellam_add(self._ledger(state), v, l1, l2)
        plan = self.encoding(ctx.spec.numel)
        metrics = {
            "dp_epsilon": self.epsilon(ledger),
            "dp_noise_std": math.sqrt(v) * plan.gamma / total,  # of each entry of the mean update
        }
        meta = {**state.meta, "ledger": [list(e) for e in ledger]}
        return replace(aggregate, delta=delta, weight=None), StageState(state.tensors, meta), metrics
