"""Adaptive server optimizers: FedAdagrad, FedAdam, FedYogi.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive Federated
Optimization." ICLR 2021, Algorithm 2 ("FedOpt" with an adaptive server optimizer).

With Δ the mean of the client deltas ``local - global`` (example-weighted by default;
``weighted=False`` gives the paper's plain mean ``(1/|S|) Σ_i Δ_i``), each round the server
does, coordinate-wise::

    m ← β1 · m + (1 − β1) · Δ
    v ← v + Δ²                                      (FedAdagrad)
    v ← β2 · v + (1 − β2) · Δ²                      (FedAdam)
    v ← v − (1 − β2) · Δ² · sign(v − Δ²)            (FedYogi)
    x ← x + η · m / (√v + τ)

η is the server learning rate (``server_lr``), τ the adaptivity (``tau``) that bounds the
step where v is small. As in the paper there is no bias correction. Initial state: m = 0
and v = τ² (Algorithm 2 only asks v₋₁ ≥ τ²; τ² is the smallest admissible value, so the
first steps are as adaptive as τ allows). Both live in ``ServerState.tensors`` under
``"m"`` and ``"v"`` and are checkpointed with the state.

Defaults: β1 = 0.9 and β2 = 0.99 (the values the paper uses in its experiments),
τ = 1e-3 and η = 1e-2. The paper tunes η and τ on log10 grids per task and reports
best values that differ by task; the defaults are a conservative point inside the
ranges it explores, not a universal optimum — tune η per task.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from fedloom.core.types import Aggregate, TrainConfig
from fedloom.strategies._checks import check_real, state_tensor
from fedloom.strategies.base import ServerState
from fedloom.strategies.fedavg import FedAvg

__all__ = ["FedAdagrad", "FedAdam", "FedOpt", "FedYogi"]


class FedOpt(FedAvg):
    """Base of the adaptive server optimizers; subclasses define only the v-update."""

    name = "fedopt"

    def __init__(
        self,
        *,
        train: TrainConfig | None = None,
        fraction: float = 0.1,
        min_clients: int = 1,
        seed: int = 0,
        server_lr: float = 1e-2,
        weighted: bool = True,
        beta_1: float = 0.9,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(
            train=train, fraction=fraction, min_clients=min_clients, seed=seed, server_lr=server_lr, weighted=weighted
        )
        self.beta_1 = check_real(beta_1, key="beta_1", low=0.0, high=1.0, high_open=True)
        self.tau = check_real(tau, key="tau", low=0.0, low_open=True)

    def init(self, params: torch.Tensor) -> ServerState:
        state = super().init(params)
        p = state.params
        tensors = {"m": torch.zeros_like(p), "v": torch.full_like(p, self.tau * self.tau)}
        return ServerState(params=p, round=state.round, tensors=tensors)

    def apply(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        who = type(self).__name__
        m = state_tensor(state.tensors, "m", state.params, strategy=who)
        v = state_tensor(state.tensors, "v", state.params, strategy=who)
        delta = aggregate.delta.to(m.dtype)
        m = self.beta_1 * m + (1.0 - self.beta_1) * delta
        v = self.second_moment(v, delta * delta)
        step = m / (v.sqrt() + self.tau)
        return self._next(state, self.step(state.params, step), m=m, v=v)

    @abstractmethod
    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """The new second-moment estimate from the old one and Δ² (returns a new tensor)."""


class FedAdagrad(FedOpt):
    """FedAdagrad: ``v ← v + Δ²`` (Reddi et al. 2021)."""

    name = "fedadagrad"

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v + delta_sq


class FedAdam(FedOpt):
    """FedAdam: ``v ← β2 v + (1 − β2) Δ²`` (Reddi et al. 2021)."""

    name = "fedadam"

    def __init__(
        self,
        *,
        train: TrainConfig | None = None,
        fraction: float = 0.1,
        min_clients: int = 1,
        seed: int = 0,
        server_lr: float = 1e-2,
        weighted: bool = True,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(
            train=train,
            fraction=fraction,
            min_clients=min_clients,
            seed=seed,
            server_lr=server_lr,
            weighted=weighted,
            beta_1=beta_1,
            tau=tau,
        )
        self.beta_2 = check_real(beta_2, key="beta_2", low=0.0, high=1.0, high_open=True)

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta_2 * v + (1.0 - self.beta_2) * delta_sq


class FedYogi(FedAdam):
    """FedYogi: ``v ← v − (1 − β2) Δ² sign(v − Δ²)`` (Reddi et al. 2021)."""

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1.0 - self.beta_2) * delta_sq * torch.sign(v - delta_sq)
