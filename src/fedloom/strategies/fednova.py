"""FedNova: normalized averaging against objective inconsistency.

Wang, Liu, Liang, Joshi, Poor. "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization." NeurIPS 2020.

Clients with more data take more local steps τ_i (fixed epochs), so plain FedAvg drifts
toward the optimum of the clients that work most. FedNova divides each client's update by
its effective number of steps a_i = ‖a_i‖₁, the sum of the coefficients with which its local
solver combined the stochastic gradients it computed:

    plain SGD:                      a_i = τ_i
    SGD with (heavy-ball) momentum ρ: a_i = [τ_i − ρ(1 − ρ^τ_i)/(1 − ρ)] / (1 − ρ)

(torch's SGD with ``momentum = ρ``, no dampening; weight decay is part of the local
objective's gradient and does not change a_i). With p_i = n_i / n over the round's
clients, the server computes

    d     = Σ_i p_i Δ_i / a_i           (the normalized update)
    τ_eff = Σ_i p_i a_i
    x    ← x + η_g · τ_eff · d          (η_g = ``server_lr``, 1 in the paper)

the last line through the strategy's server optimizer (plain ``x ← x + η_g · Δ`` by default).
With equal τ_i (and so equal a_i) this is FedAvg exactly.

What travels. A client reports only the number of local steps it took
(``ClientUpdate.num_steps``, already in every update's header); nothing on the client
changes, so every engine and the deployed agent run FedNova as they run FedAvg. The server
derives a_i itself from τ_i and the ρ of the instruction it sent, so a client cannot claim an
effective step count other than the one its steps give. The weighting stage
(:class:`FedNovaWeighting`, server side, after the ideas of
:class:`~fedloom.strategies.contribution.ContributionWeighting`) checks τ_i — an integer
from 1 to the number of steps the instruction allows for the client's example count,
``epochs · ⌈n_i / batch_size⌉`` capped at ``max_steps`` (fewer is fine: a straggler's partial
work is what FedNova normalizes) — then scales Δ_i by w_i = n_i / a_i and records a_i as the
update's metric ``fednova_a``. The aggregator sums (streaming, O(model)); its
example-weighted mean of that metric is exactly τ_eff = Σ n_i a_i / n, and the stage's
finalize turns the sum into τ_eff · Σ_i (n_i / a_i) Δ_i / n and reports ``tau_eff`` as a round
metric. An update whose step count is missing (0), not an integer, not positive or above
the bound is rejected with the reason; the round goes on.

Limits. a_i is derived for SGD with or without heavy-ball momentum: Adam and Nesterov
momentum are refused when the strategy is built (key ``client.optimizer`` /
``client.nesterov``). The server must see each update to scale it, so FedNova does not run
under secure aggregation (:class:`FedNovaAggregator` is not the plain sum, which the secure
plan refuses with that reason), and a ``[[pipeline]]`` weighting stage cannot replace its
weighting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from fedloom.core.errors import ConfigError, InvalidUpdateError, StrategyError
from fedloom.core.types import Aggregate, ClientUpdate, TrainConfig
from fedloom.pipeline import Stage, StageContext, StageState, WeightingStage
from fedloom.strategies.base import Aggregator, ServerState, Strategy, SumAggregator

__all__ = ["EFFECTIVE_STEPS", "FedNova", "FedNovaAggregator", "FedNovaWeighting", "allowed_steps", "effective_steps"]

EFFECTIVE_STEPS = "fednova_a"
"""Metric key under which FedNova's weighting stage records a client's a_i (server side)."""


def effective_steps(tau: int, momentum: float = 0.0) -> float:
    """a = ‖a‖₁ for τ local SGD steps with heavy-ball momentum ρ = ``momentum`` (Wang et al. 2020).

    ``τ`` for plain SGD; ``[τ − ρ(1 − ρ^τ)/(1 − ρ)] / (1 − ρ)`` with momentum, in float64.
    """
    if momentum == 0.0:
        return float(tau)
    rho = float(momentum)
    return (tau - rho * (1.0 - rho**tau) / (1.0 - rho)) / (1.0 - rho)


def allowed_steps(num_examples: int, *, epochs: int, batch_size: int, max_steps: int | None) -> int:
    """The local steps an instruction allows a client of ``num_examples``: ``epochs · ⌈n / B⌉``, at most ``max_steps``."""
    steps = epochs * math.ceil(num_examples / batch_size)
    return steps if max_steps is None else min(steps, max_steps)


@dataclass(frozen=True)
class FedNovaWeighting(WeightingStage):
    """FedNova's weighting, on the server: w_i = n_i / a_i from the reported steps; finalize scales by τ_eff.

    Its fields are the local-training settings a_i and the step bound depend on (the
    strategy copies them from its :class:`~fedloom.core.types.TrainConfig`, :meth:`of`).
    """

    name: ClassVar[str] = "weight_fednova"
    runs_on_client: ClassVar[bool] = False
    momentum: float = 0.0
    epochs: int = 1
    batch_size: int = 10
    max_steps: int | None = None

    @classmethod
    def of(cls, train: TrainConfig) -> FedNovaWeighting:
        return cls(momentum=train.momentum, epochs=train.epochs, batch_size=train.batch_size, max_steps=train.max_steps)

    def steps_of(self, update: ClientUpdate) -> int:
        """The update's local step count τ_i, checked against the instruction's bound."""
        tau = update.num_steps
        if isinstance(tau, bool) or not isinstance(tau, int):
            raise self.reject(update, f"the local step count must be an integer, got {tau!r}")
        if tau < 1:
            raise self.reject(update, f"reports {tau} local steps (missing or not positive); FedNova normalizes by them")
        bound = allowed_steps(update.num_examples, epochs=self.epochs, batch_size=self.batch_size, max_steps=self.max_steps)
        if tau > bound:
            raise self.reject(
                update, f"reports {tau} local steps; the instruction allows at most {bound} for {update.num_examples} examples"
            )
        return tau

    def weight_of(self, update: ClientUpdate) -> float:
        return update.num_examples / effective_steps(self.steps_of(update), self.momentum)

    def server(self, update: ClientUpdate, ctx: StageContext) -> ClientUpdate:
        if update.delta is None:
            raise self.reject(update, "the update is not a dense delta")
        a = effective_steps(self.steps_of(update), self.momentum)
        w = update.num_examples / a
        return replace(update, delta=update.delta * w, weight=w, metrics={**update.metrics, EFFECTIVE_STEPS: a})

    def finalize(
        self, aggregate: Aggregate, ctx: StageContext, state: StageState
    ) -> tuple[Aggregate, StageState, dict[str, float]]:
        n = aggregate.num_examples
        tau_eff = aggregate.metrics.get(EFFECTIVE_STEPS)
        if tau_eff is None or not n > 0:
            raise StrategyError(f"stage {self.name!r}: the aggregate lacks the clients' effective step counts")
        delta = (aggregate.delta.to(torch.float64) * tau_eff / n).to(ctx.dtype)
        metrics = {k: v for k, v in aggregate.metrics.items() if k != EFFECTIVE_STEPS}
        return replace(aggregate, delta=delta, weight=None, metrics=metrics), state, {"tau_eff": tau_eff}


class FedNovaAggregator(SumAggregator):
    """The streaming sum of n_i Δ_i / a_i; refuses an update its weighting stage did not see.

    ``effective_steps`` maps each accepted client to its a_i. Being another type than the
    plain sum also tells the secure-aggregation plan that FedNova needs each update.
    """

    partial_refusal = "FedNova weighs each update by its own step count"

    def __init__(self) -> None:
        super().__init__()
        self.effective_steps: dict[str, float] = {}

    def _add(self, update: ClientUpdate) -> None:
        a = update.metrics.get(EFFECTIVE_STEPS)
        if a is None or update.weight is None:
            raise InvalidUpdateError(
                f"FedNova needs the update weighted by stage {FedNovaWeighting.name!r}", client_id=update.client_id
            )
        super()._add(update)
        self.effective_steps[update.client_id] = float(a)


@dataclass(frozen=True, kw_only=True)
class FedNova(Strategy):
    """FedNova (Wang et al. 2020): updates normalized by each client's effective local steps."""

    name = "fednova"
    synchronous_only = "its normalized averaging weighs one round's local step counts against each other"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.train.optimizer != "sgd":
            raise ConfigError(
                f"FedNova normalizes SGD updates (with or without momentum); got optimizer {self.train.optimizer!r}",
                key="client.optimizer",
            )
        if self.train.nesterov:
            raise ConfigError("FedNova's effective step count is derived for heavy-ball momentum, not Nesterov", key="client.nesterov")

    def stages(self) -> tuple[Stage, ...]:
        return (FedNovaWeighting.of(self.train),)

    def aggregator(self, state: ServerState, rnd: int) -> Aggregator:
        return FedNovaAggregator()
