"""Adaptive server optimizers as strategies: FedAdagrad, FedAdam, FedYogi.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan. "Adaptive Federated
Optimization." ICLR 2021, Algorithm 2 ("FedOpt" with an adaptive server optimizer).

Each is FedAvg whose server optimizer is :class:`~fedloom.strategies.optimizers.Adagrad`,
:class:`~fedloom.strategies.optimizers.Adam` or :class:`~fedloom.strategies.optimizers.Yogi`
(the math, initial state and defaults are documented there), built from the strategy's own
fields ``beta_1``, ``beta_2`` (not FedAdagrad) and ``tau``; η is ``server_lr``, 1e-2 by
default. Δ is the mean of the client deltas, example-weighted by default; ``weighted=False``
gives the paper's plain mean ``(1/|S|) Σ_i Δ_i``. The moments live in
``ServerState.tensors`` under ``"m"`` and ``"v"`` and are checkpointed with the state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from fedloom.strategies.fedavg import FedAvg
from fedloom.strategies.optimizers import Adagrad, Adam, AdaptiveOptimizer, ServerOptimizer, Yogi

__all__ = ["FedAdagrad", "FedAdam", "FedOpt", "FedYogi"]


@dataclass(frozen=True, kw_only=True)
class FedOpt(FedAvg, ABC):
    """Base of FedAdagrad, FedAdam and FedYogi: the fields they share (Reddi et al. 2021)."""

    name = "fedopt"

    server_lr: float = 1e-2
    beta_1: float = 0.9
    tau: float = 1e-3
    server_optimizer: ServerOptimizer = field(init=False, repr=False, metadata={"param": False})

    @abstractmethod
    def _own_optimizer(self) -> AdaptiveOptimizer:
        """The adaptive server optimizer of these fields."""


class FedAdagrad(FedOpt):
    """FedAdagrad: FedAvg with the :class:`~fedloom.strategies.optimizers.Adagrad` server optimizer."""

    name = "fedadagrad"

    def _own_optimizer(self) -> AdaptiveOptimizer:
        return Adagrad(beta_1=self.beta_1, tau=self.tau)


@dataclass(frozen=True, kw_only=True)
class FedAdam(FedOpt):
    """FedAdam: FedAvg with the :class:`~fedloom.strategies.optimizers.Adam` server optimizer."""

    name = "fedadam"

    beta_2: float = 0.99

    def _own_optimizer(self) -> AdaptiveOptimizer:
        return Adam(beta_1=self.beta_1, beta_2=self.beta_2, tau=self.tau)


class FedYogi(FedAdam):
    """FedYogi: FedAvg with the :class:`~fedloom.strategies.optimizers.Yogi` server optimizer."""

    name = "fedyogi"

    def _own_optimizer(self) -> AdaptiveOptimizer:
        return Yogi(beta_1=self.beta_1, beta_2=self.beta_2, tau=self.tau)
