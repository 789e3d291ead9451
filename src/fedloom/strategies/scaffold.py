"""SCAFFOLD: stochastic controlled averaging (control variates against client drift).

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning." ICML 2020, Algorithm 1 with option II.

The server keeps a control variate c (``ServerState.tensors["control"]``, zeros at
init, one entry per element of the flat vector) and sends it to every sampled client in
the instruction payload under ``"server_control"``, with ``train.scaffold = True``.
Client i, holding its own c_i, runs K local steps ``y ← y − η_l (g_i(y) − c_i + c)`` from
``y = x`` and then (option II)::

    c_i⁺ = c_i − c + (x − y) / (K · η_l)
    Δy_i = y − x                      (the update's ``delta``)
    Δc_i = c_i⁺ − c_i                 (the update's ``extras["control_delta"]``)

The server, for the set S of clients that reported, does::

    x ← x + η_g · (1/|S|) Σ_{i∈S} Δy_i
    c ← c + (|S| / N) · (1/|S|) Σ_{i∈S} Δc_i        (= c + (1/N) Σ_{i∈S} Δc_i)

so that c stays the mean of all N clients' c_i. The paper averages Δy unweighted, which
is the default here; ``weighted=True`` weights Δy by example counts instead (the control
update stays unweighted either way, as the invariant c = mean_i c_i requires).

N, the total number of clients, is by default recorded in :meth:`Scaffold.select` as
the number of distinct available clients in the latest round, so the strategy follows an
elastic population (clients joining and leaving); pass ``num_clients`` to fix it instead.
``apply`` raises :class:`~fedloom.core.errors.StrategyError` when N is unknown (no
``select`` yet and no ``num_clients``) or smaller than the number of updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from fedloom.core.errors import InvalidUpdateError, StrategyError
from fedloom.core.keys import CONTROL_DELTA, SERVER_CONTROL
from fedloom.core.types import Aggregate, ClientInstruction, ClientUpdate, TrainConfig
from fedloom.strategies._checks import check_int, state_tensor
from fedloom.strategies.base import Aggregator, ServerState, WeightedMeanAggregator
from fedloom.strategies.fedavg import FedAvg, _unit_weight

__all__ = ["CONTROL_DELTA", "SERVER_CONTROL", "Scaffold", "ScaffoldAggregator"]


class ScaffoldAggregator(WeightedMeanAggregator):
    """Weighted mean of Δy that rejects updates lacking ``extras["control_delta"]``."""

    def _add(self, update: ClientUpdate) -> None:
        if CONTROL_DELTA not in update.extras:
            raise InvalidUpdateError(f"SCAFFOLD needs extras[{CONTROL_DELTA!r}]", client_id=update.client_id)
        super()._add(update)


class Scaffold(FedAvg):
    """SCAFFOLD, option II (Karimireddy et al. 2020).

    ``num_clients`` fixes N; when None (default) N is the number of clients available in
    the latest :meth:`select`. ``weighted`` (default False, as in the paper) weights Δy by
    example counts.
    """

    name = "scaffold"

    def __init__(
        self,
        *,
        train: TrainConfig | None = None,
        fraction: float = 0.1,
        min_clients: int = 1,
        seed: int = 0,
        server_lr: float = 1.0,
        weighted: bool = False,
        num_clients: int | None = None,
    ) -> None:
        super().__init__(
            train=train, fraction=fraction, min_clients=min_clients, seed=seed, server_lr=server_lr, weighted=weighted
        )
        self.num_clients = None if num_clients is None else check_int(num_clients, key="num_clients", low=1)
        self.num_available: int | None = None
        self._scaffold_train = replace(self.train, scaffold=True)

    @property
    def population(self) -> int | None:
        """N used by the next :meth:`apply`: ``num_clients`` if fixed, else the latest available count."""
        return self.num_clients if self.num_clients is not None else self.num_available

    def init(self, params: torch.Tensor) -> ServerState:
        state = super().init(params)
        return ServerState(params=state.params, round=state.round, tensors={"control": torch.zeros_like(state.params)})

    def select(self, rnd: int, available: Sequence[str]) -> list[str]:
        cohort = super().select(rnd, available)
        self.num_available = len(set(available))
        return cohort

    def client_config(self, state: ServerState, rnd: int, client_id: str) -> ClientInstruction:
        # The same tensor goes to every client (O(model) memory); clients must not mutate it.
        control = state_tensor(state.tensors, "control", state.params, strategy=type(self).__name__)
        instr = super().client_config(state, rnd, client_id)
        return replace(instr, train=self._scaffold_train, payload={SERVER_CONTROL: control})

    def aggregator(self, state: ServerState, rnd: int) -> Aggregator:
        return ScaffoldAggregator(None if self.weighted else _unit_weight)

    def apply(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        who = type(self).__name__
        c = state_tensor(state.tensors, "control", state.params, strategy=who)
        n_total = self.population
        if n_total is None:
            raise StrategyError(f"{who}: the number of clients N is unknown; call select() first or pass num_clients")
        if aggregate.num_clients > n_total:
            raise StrategyError(f"{who}: {aggregate.num_clients} updates but only N={n_total} clients")
        try:
            mean_dc = aggregate.extras[CONTROL_DELTA]
        except KeyError:
            raise StrategyError(f"{who}: the aggregate lacks extras[{CONTROL_DELTA!r}]") from None
        c = c + (aggregate.num_clients / n_total) * mean_dc.to(c.dtype)
        return self._next(state, self.step(state.params, aggregate.delta), control=c)
