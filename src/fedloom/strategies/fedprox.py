"""FedProx: FedAvg whose clients minimize a proximal objective.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous
Networks." MLSys 2020.

In round t client k approximately minimizes

    h_k(w; w^t) = F_k(w) + (μ/2) · ‖w − w^t‖²

starting from the global model w^t; the server aggregates as FedAvg does
(``x ← x + η_g · Σ_i (n_i / n) Δ_i``). The proximal term keeps local models near the global
one under heterogeneous data and variable amounts of local work. The paper picks μ from
the small candidate set {0.001, 0.01, 0.1, 1}; the default here is 0.01.

This strategy only *configures* the clients: its instructions carry
the ``proximal`` gradient transform with ``mu = μ``, and local training (sequential or
vectorized, the same transform code) adds the term.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fedloom.core.keys import PROXIMAL
from fedloom.core.types import ClientInstruction, ComponentSpec
from fedloom.strategies._checks import check_real, set_fields
from fedloom.strategies.base import ServerState
from fedloom.strategies.fedavg import FedAvg

__all__ = ["FedProx"]


@dataclass(frozen=True, kw_only=True)
class FedProx(FedAvg):
    """FedAvg aggregation; clients train with the proximal term μ > 0 (Li et al. 2020)."""

    name = "fedprox"

    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        set_fields(self, mu=check_real(self.mu, key="mu", low=0.0, low_open=True))

    def client_config(self, state: ServerState, rnd: int, client_id: str) -> ClientInstruction:
        instr = super().client_config(state, rnd, client_id)
        return replace(instr, transforms=(*instr.transforms, ComponentSpec.of(PROXIMAL, mu=self.mu)))
