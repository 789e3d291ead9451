"""SCAFFOLD: stochastic controlled averaging (control variates against client drift).

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh. "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning." ICML 2020, Algorithm 1 with option II.

The server keeps a control variate c (``ServerState.tensors["control"]``, zeros at
init, one entry per element of the flat vector) and sends it to every sampled client in
the instruction payload under ``"server_control"``, with the ``scaffold`` gradient transform.
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
update stays unweighted either way, as the invariant c = mean_i c_i requires). The x-step
is the strategy's server optimizer's (plain ``x ← x + η_g · Δy`` by default, as in the paper).

N, the total number of clients, is by default the aggregate's ``num_available``: the round
loop sets it to the number of distinct clients available to the selection that produced
the aggregate, so the strategy follows an elastic population (clients joining and
leaving) without keeping anything on the object; pass ``num_clients`` to fix N instead.
``apply`` raises :class:`~fedloom.core.errors.StrategyError` when N is unknown (no
``num_clients`` and an aggregate without ``num_available``) or smaller than the number of
updates.

Local step size: c_i⁺ is the mean gradient along the client's local path, and the next visit
corrects by c − c_i, so a local run that overshoots (plain SGD on a client with one or two
labels at a large lr) leaves a large c_i that pushes the client's next run further the same
way; the paper tunes η_l per algorithm (η_g = 1). On the MNIST 2NN with label-skewed clients
SCAFFOLD at lr 0.1 swings (shards) or diverges (Dirichlet 0.1) where FedAvg does not, and is
stable at 0.02-0.05 (bench/results/strategies_cpu.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fedloom.core.errors import ConfigError, InvalidUpdateError, StrategyError
from fedloom.core.keys import CONTROL_DELTA, SCAFFOLD, SERVER_CONTROL
from fedloom.core.types import Aggregate, ClientInstruction, ClientUpdate, ComponentSpec
from fedloom.strategies._checks import check_int, population, set_fields, state_tensor
from fedloom.strategies.base import Aggregator, ServerState, SumAggregator
from fedloom.strategies.fedavg import FedAvg

__all__ = ["CONTROL_DELTA", "SERVER_CONTROL", "Scaffold", "ScaffoldAggregator"]


class ScaffoldAggregator(SumAggregator):
    """Sum of (weighted) Δy that rejects updates lacking ``extras["control_delta"]``."""

    def _add(self, update: ClientUpdate) -> None:
        if CONTROL_DELTA not in update.extras:
            raise InvalidUpdateError(f"SCAFFOLD needs extras[{CONTROL_DELTA!r}]", client_id=update.client_id)
        super()._add(update)


@dataclass(frozen=True, kw_only=True)
class Scaffold(FedAvg):
    """SCAFFOLD, option II (Karimireddy et al. 2020).

    ``num_clients`` fixes N; when None (default) N is the aggregate's ``num_available``
    (set by the round loop). ``weighted`` (default False, as in the paper) weights Δy by
    example counts.
    """

    name = "scaffold"
    update_extras = (CONTROL_DELTA,)
    synchronous_only = "its server control variate averages the control deltas of one round's cohort (|S|/N), which stale updates would mix across versions"

    weighted: bool = False
    num_clients: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_clients is not None:
            set_fields(self, num_clients=check_int(self.num_clients, key="num_clients", low=1))
        if self.train.optimizer != "sgd":  # c_i⁺ = c_i − c + (x − y_i)/(K·η) reads SGD steps as gradients
            raise ConfigError(
                f"SCAFFOLD's control variates assume SGD local steps (option II of the paper); got optimizer "
                f"{self.train.optimizer!r}",
                key="client.optimizer",
            )

    def init(self, params: torch.Tensor) -> ServerState:
        state = super().init(params)
        return replace(state, tensors={**state.tensors, "control": torch.zeros_like(state.params)})

    def client_config(self, state: ServerState, rnd: int, client_id: str) -> ClientInstruction:
        # The same tensor goes to every client (O(model) memory); clients must not mutate it.
        control = state_tensor(state.tensors, "control", state.params, strategy=type(self).__name__)
        instr = super().client_config(state, rnd, client_id)
        return replace(
            instr, transforms=(*instr.transforms, ComponentSpec(SCAFFOLD)), payload={SERVER_CONTROL: control}
        )

    def aggregator(self, state: ServerState, rnd: int) -> Aggregator:
        return ScaffoldAggregator()

    def apply(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        who = type(self).__name__
        c = state_tensor(state.tensors, "control", state.params, strategy=who)
        n_total = population(self.num_clients, aggregate.num_available, aggregate.num_clients, who=who)
        try:
            mean_dc = aggregate.extras[CONTROL_DELTA]
        except KeyError:
            raise StrategyError(f"{who}: the aggregate lacks extras[{CONTROL_DELTA!r}]") from None
        c = c + (aggregate.num_clients / n_total) * mean_dc.to(c.dtype)
        return self._step(state, aggregate.delta, control=c)
