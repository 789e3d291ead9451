"""FedAvgM: federated averaging with server momentum.

Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification." arXiv:1909.06335, 2019.

FedAvg whose server optimizer is :class:`~fedloom.strategies.optimizers.Momentum`
(``v ← β · v + Δ; x ← x + η_g · v``, the math and sign convention are documented there).
``β = 0`` is FedAvg. The momentum ``v`` starts at zero and lives in
``ServerState.tensors["momentum"]``, so it is checkpointed with the state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedloom.strategies.fedavg import FedAvg
from fedloom.strategies.optimizers import Momentum, ServerOptimizer

__all__ = ["FedAvgM"]


@dataclass(frozen=True, kw_only=True)
class FedAvgM(FedAvg):
    """FedAvg with server momentum β (Hsu et al. 2019); ``server_momentum`` in [0, 1)."""

    name = "fedavgm"

    server_momentum: float = 0.9
    server_optimizer: ServerOptimizer = field(init=False, repr=False, metadata={"param": False})

    def _own_optimizer(self) -> ServerOptimizer:
        return Momentum(momentum=self.server_momentum)
