"""FedAvg: example-weighted averaging of client deltas.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
Networks from Decentralized Data." AISTATS 2017.

The server update is ``x ← x + η_g · Σ_i (n_i / n) Δ_i`` (η_g = ``server_lr``, 1 in the
paper). ``weighted=False`` gives every client the same weight.
"""

from __future__ import annotations

from fedloom.core.errors import ConfigError
from fedloom.core.types import Aggregate, TrainConfig
from fedloom.strategies.base import Aggregator, ServerState, Strategy, WeightedMeanAggregator

__all__ = ["FedAvg"]


def _unit_weight(_update: object) -> float:
    return 1.0


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017)."""

    name = "fedavg"

    def __init__(
        self,
        *,
        train: TrainConfig | None = None,
        fraction: float = 0.1,
        min_clients: int = 1,
        seed: int = 0,
        server_lr: float = 1.0,
        weighted: bool = True,
    ) -> None:
        super().__init__(train=train, fraction=fraction, min_clients=min_clients, seed=seed, server_lr=server_lr)
        if not isinstance(weighted, bool):
            raise ConfigError(f"must be true or false, got {weighted!r}", key="strategy.weighted")
        self.weighted = weighted

    def aggregator(self, state: ServerState, rnd: int) -> Aggregator:
        return WeightedMeanAggregator(None if self.weighted else _unit_weight)

    def apply(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        return self._next(state, self.step(state.params, aggregate.delta))
