"""FedAvgM: federated averaging with server momentum.

Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification." arXiv:1909.06335, 2019.

With Δ the (example-weighted) mean of the client deltas ``local - global`` (so Δ points
downhill and is *added*), each round the server does::

    v ← β · v + Δ
    x ← x + η_g · v

The paper writes ``v ← βv + Δw; w ← w − v`` with Δw the mean of ``global − local``; that
is the same update with our sign convention and η_g = 1. ``β = 0`` is FedAvg. The momentum
``v`` starts at zero and lives in ``ServerState.tensors["momentum"]``, so it is
checkpointed with the state.
"""

from __future__ import annotations

import torch

from fedloom.core.types import Aggregate, TrainConfig
from fedloom.strategies._checks import check_real, state_tensor
from fedloom.strategies.base import ServerState
from fedloom.strategies.fedavg import FedAvg

__all__ = ["FedAvgM"]


class FedAvgM(FedAvg):
    """FedAvg with server momentum β (Hsu et al. 2019); ``server_momentum`` in [0, 1)."""

    name = "fedavgm"

    def __init__(
        self,
        *,
        train: TrainConfig | None = None,
        fraction: float = 0.1,
        min_clients: int = 1,
        seed: int = 0,
        server_lr: float = 1.0,
        weighted: bool = True,
        server_momentum: float = 0.9,
    ) -> None:
        super().__init__(
            train=train, fraction=fraction, min_clients=min_clients, seed=seed, server_lr=server_lr, weighted=weighted
        )
        self.server_momentum = check_real(server_momentum, key="server_momentum", low=0.0, high=1.0, high_open=True)

    def init(self, params: torch.Tensor) -> ServerState:
        state = super().init(params)
        return ServerState(params=state.params, round=state.round, tensors={"momentum": torch.zeros_like(state.params)})

    def apply(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        v = state_tensor(state.tensors, "momentum", state.params, strategy=type(self).__name__)
        v = self.server_momentum * v + aggregate.delta.to(v.dtype)
        return self._next(state, self.step(state.params, v), momentum=v)
