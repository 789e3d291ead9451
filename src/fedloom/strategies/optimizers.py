"""Server optimizers: how a strategy turns the round's aggregate Δ into the next global model.

A :class:`ServerOptimizer` is a small frozen value with no state of its own: ``init(params)``
gives its named state tensors (momentum, moments), which live in
``ServerState.tensors`` and are checkpointed with it; ``step(params, Δ, tensors, lr=η)``
returns the new params and the new tensors. A strategy *has* one
(``Strategy.server_optimizer``, plain :class:`SGD` by default) and steps with its
``server_lr`` as η, so any strategy composes with any server optimizer::

    FedProx(mu=0.01, server_lr=1e-2, server_optimizer=Adam(tau=1e-3))

Δ is the aggregated client delta ``local − global`` (it points downhill and is *added*).
Hyperparameters are checked when built; a bad value is a
:class:`~fedloom.core.errors.ConfigError` keyed by the strategy parameter that sets it
(``strategy.server_momentum``, ``strategy.beta_1``, ...).

* :class:`SGD` — ``x ← x + η · Δ`` (FedAvg, McMahan et al. 2017, with η = 1).
* :class:`Momentum` — server momentum (FedAvgM), Hsu, Qi, Brown. "Measuring the Effects of
  Non-Identical Data Distribution for Federated Visual Classification." arXiv:1909.06335,
  2019.
* :class:`Adagrad`, :class:`Adam`, :class:`Yogi` — adaptive server optimizers (FedAdagrad,
  FedAdam, FedYogi), Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan.
  "Adaptive Federated Optimization." ICLR 2021, Algorithm 2.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedloom.strategies._checks import check_real, set_fields

__all__ = ["SGD", "Adagrad", "Adam", "AdaptiveOptimizer", "Momentum", "ServerOptimizer", "Yogi"]


class ServerOptimizer(ABC):
    """The server update ``(x, Δ, tensors) → (x', tensors')`` with learning rate η.

    ``state_keys`` names the tensors ``init`` creates, each shaped like the params; the
    strategy checks that a state carries them before it calls ``step``.
    """

    state_keys: ClassVar[tuple[str, ...]] = ()

    def init(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """The initial state tensors (``state_keys``) for the global vector ``params``."""
        return {}

    @abstractmethod
    def step(
        self, params: torch.Tensor, delta: torch.Tensor, tensors: Mapping[str, torch.Tensor], *, lr: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The new params and state tensors after one round with aggregate ``delta``.

        Returns new tensors; ``params``, ``delta`` and ``tensors`` are not modified.
        """


@dataclass(frozen=True)
class SGD(ServerOptimizer):
    """``x ← x + η · Δ``: FedAvg's server step (McMahan et al. 2017; η = 1 in the paper)."""

    def step(
        self, params: torch.Tensor, delta: torch.Tensor, tensors: Mapping[str, torch.Tensor], *, lr: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return params + lr * delta.to(params.dtype), {}


@dataclass(frozen=True)
class Momentum(ServerOptimizer):
    """Server momentum β ∈ [0, 1) (FedAvgM, Hsu et al. 2019)::

        v ← β · v + Δ
        x ← x + η · v

    The paper writes ``v ← βv + Δw; w ← w − v`` with Δw the mean of ``global − local``;
    that is the same update with our sign convention and η = 1. ``β = 0`` is :class:`SGD`.
    ``v`` starts at zero and is the state tensor ``"momentum"``.
    """

    momentum: float = 0.9
    state_keys: ClassVar[tuple[str, ...]] = ("momentum",)

    def __post_init__(self) -> None:
        beta = check_real(self.momentum, key="server_momentum", low=0.0, high=1.0, high_open=True)
        set_fields(self, momentum=beta)

    def init(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"momentum": torch.zeros_like(params)}

    def step(
        self, params: torch.Tensor, delta: torch.Tensor, tensors: Mapping[str, torch.Tensor], *, lr: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        v = tensors["momentum"]
        v = self.momentum * v + delta.to(v.dtype)
        return params + lr * v.to(params.dtype), {"momentum": v}


@dataclass(frozen=True)
class AdaptiveOptimizer(ServerOptimizer):
    """Reddi et al. 2021, Algorithm 2; subclasses define only the second-moment update.

    Coordinate-wise, each round::

        m ← β1 · m + (1 − β1) · Δ
        v ← v + Δ²                                      (Adagrad)
        v ← β2 · v + (1 − β2) · Δ²                      (Adam)
        v ← v − (1 − β2) · Δ² · sign(v − Δ²)            (Yogi)
        x ← x + η · m / (√v + τ)

    τ (``tau``) is the adaptivity that bounds the step where v is small. As in the paper
    there is no bias correction. Initial state: m = 0 and v = τ² (Algorithm 2 only asks
    v₋₁ ≥ τ²; τ² is the smallest admissible value, so the first steps are as adaptive as τ
    allows). State tensors ``"m"`` and ``"v"``.

    Defaults: β1 = 0.9 and β2 = 0.99 (the values the paper uses in its experiments),
    τ = 1e-3; the strategies pair them with η = 1e-2. The paper tunes η and τ on log10
    grids per task and reports best values that differ by task; the defaults are a
    conservative point inside the ranges it explores, not a universal optimum.
    """

    beta_1: float = 0.9
    tau: float = 1e-3
    state_keys: ClassVar[tuple[str, ...]] = ("m", "v")

    def __post_init__(self) -> None:
        set_fields(
            self,
            beta_1=check_real(self.beta_1, key="beta_1", low=0.0, high=1.0, high_open=True),
            tau=check_real(self.tau, key="tau", low=0.0, low_open=True),
        )

    def init(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"m": torch.zeros_like(params), "v": torch.full_like(params, self.tau * self.tau)}

    def step(
        self, params: torch.Tensor, delta: torch.Tensor, tensors: Mapping[str, torch.Tensor], *, lr: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m, v = tensors["m"], tensors["v"]
        delta = delta.to(m.dtype)
        m = self.beta_1 * m + (1.0 - self.beta_1) * delta
        v = self.second_moment(v, delta * delta)
        step = m / (v.sqrt() + self.tau)
        return params + lr * step.to(params.dtype), {"m": m, "v": v}

    @abstractmethod
    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """The new second-moment estimate from the old one and Δ² (returns a new tensor)."""


@dataclass(frozen=True)
class Adagrad(AdaptiveOptimizer):
    """FedAdagrad's server optimizer: ``v ← v + Δ²`` (Reddi et al. 2021)."""

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v + delta_sq


@dataclass(frozen=True)
class Adam(AdaptiveOptimizer):
    """FedAdam's server optimizer: ``v ← β2 v + (1 − β2) Δ²`` (Reddi et al. 2021)."""

    beta_2: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        set_fields(self, beta_2=check_real(self.beta_2, key="beta_2", low=0.0, high=1.0, high_open=True))

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return self.beta_2 * v + (1.0 - self.beta_2) * delta_sq


@dataclass(frozen=True)
class Yogi(Adam):
    """FedYogi's server optimizer: ``v ← v − (1 − β2) Δ² sign(v − Δ²)`` (Reddi et al. 2021)."""

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        return v - (1.0 - self.beta_2) * delta_sq * torch.sign(v - delta_sq)
