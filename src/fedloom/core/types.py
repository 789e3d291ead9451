"""The messages of a round: what the server sends a client, and what comes back.

* :class:`TrainConfig` — typed local-training hyperparameters (validated on creation).
* :class:`ClientInstruction` — one client's orders for one round: config, seed, payload.
* :class:`ClientUpdate` — a client's answer: flat delta, example count, metrics, extras.
* :class:`Aggregate` — an aggregator's result, consumed by ``Strategy.apply``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import torch

from fedloom.core.errors import ConfigError, InvalidUpdateError

__all__ = ["Aggregate", "ClientInstruction", "ClientUpdate", "LossName", "OptimizerName", "TrainConfig"]

OptimizerName = Literal["sgd", "adam"]
LossName = Literal["cross_entropy", "bce", "mse", "l1", "huber"]
_OPTIMIZERS = ("sgd", "adam")
_LOSSES = ("cross_entropy", "bce", "mse", "l1", "huber")

_EMPTY: Mapping[str, torch.Tensor] = MappingProxyType({})


def _frozen_map(m: Mapping | None) -> Mapping:
    return MappingProxyType(dict(m)) if m else _EMPTY


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyperparameters, sent by the server each round.

    ``proximal_mu`` > 0 adds FedProx's term (mu/2)·||w - w_global||² (Li et al. 2020).
    ``scaffold`` turns on SCAFFOLD's control-variate correction (Karimireddy et al. 2020);
    the server control variate travels in the instruction's payload.
    ``max_steps`` caps the number of local optimizer steps (None: full epochs).
    """

    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.01
    optimizer: OptimizerName = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    loss: LossName = "cross_entropy"
    proximal_mu: float = 0.0
    scaffold: bool = False
    max_steps: int | None = None

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(msg, key=f"client.{key}")

        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise bad("epochs", f"must be an integer >= 1, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise bad("batch_size", f"must be an integer >= 1, got {self.batch_size!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", f"must be a finite number > 0, got {self.lr!r}")
        if self.optimizer not in _OPTIMIZERS:
            raise bad("optimizer", f"must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise bad("momentum", f"must be in [0, 1), got {self.momentum!r}")
        if self.nesterov and self.momentum == 0.0:
            raise bad("nesterov", "needs momentum > 0")
        if not (self.weight_decay >= 0.0 and math.isfinite(self.weight_decay)):
            raise bad("weight_decay", f"must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise bad("betas", f"must be two numbers in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            raise bad("eps", f"must be > 0, got {self.eps!r}")
        if self.loss not in _LOSSES:
            raise bad("loss", f"must be one of {_LOSSES}, got {self.loss!r}")
        if not (self.proximal_mu >= 0.0 and math.isfinite(self.proximal_mu)):
            raise bad("proximal_mu", f"must be >= 0, got {self.proximal_mu!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise bad("max_steps", f"must be an integer >= 1 or unset, got {self.max_steps!r}")


@dataclass(frozen=True)
class ClientInstruction:
    """One client's orders for one round.

    ``seed`` drives the client's data shuffling and dropout, so a round is reproducible.
    ``payload`` holds strategy tensors the client needs (SCAFFOLD's server control variate).
    """

    round: int
    client_id: str
    train: TrainConfig
    seed: int
    payload: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "payload", _frozen_map(self.payload))


@dataclass(frozen=True)
class ClientUpdate:
    """A client's answer for one round.

    ``delta`` is the flat vector ``local - global`` (possibly post-processed). ``extras``
    carries strategy-specific tensors (SCAFFOLD's ``control_delta``). ``metrics`` are the
    client's training metrics; ``num_steps`` the local optimizer steps it took.
    """

    client_id: str
    round: int
    delta: torch.Tensor
    num_examples: int
    num_steps: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", _frozen_map(self.metrics))
        object.__setattr__(self, "extras", _frozen_map(self.extras))

    def validate(self, *, numel: int, dtype: torch.dtype | None = None, max_examples: int | None = None) -> None:
        """Raise :class:`InvalidUpdateError` unless this update is well-formed for a model of ``numel``."""
        cid = self.client_id

        def check_vec(name: str, t: object) -> None:
            if not isinstance(t, torch.Tensor):
                raise InvalidUpdateError(f"{name} is {type(t).__name__}, not a tensor", client_id=cid)
            if t.dim() != 1 or t.numel() != numel:
                raise InvalidUpdateError(f"{name} has shape {tuple(t.shape)}, expected ({numel},)", client_id=cid)
            if not t.dtype.is_floating_point or (dtype is not None and t.dtype != dtype):
                raise InvalidUpdateError(f"{name} has dtype {t.dtype}, expected {dtype or 'a float dtype'}", client_id=cid)
            if not bool(torch.isfinite(t).all()):
                raise InvalidUpdateError(f"{name} contains NaN or Inf", client_id=cid)

        check_vec("delta", self.delta)
        for k, v in self.extras.items():
            check_vec(f"extras[{k!r}]", v)
        if isinstance(self.num_examples, bool) or not isinstance(self.num_examples, int) or self.num_examples < 1:
            raise InvalidUpdateError(f"num_examples must be an integer >= 1, got {self.num_examples!r}", client_id=cid)
        if max_examples is not None and self.num_examples > max_examples:
            raise InvalidUpdateError(f"num_examples {self.num_examples} exceeds the limit {max_examples}", client_id=cid)
        for k, m in self.metrics.items():
            if not isinstance(m, (int, float)) or not math.isfinite(float(m)):
                raise InvalidUpdateError(f"metric {k!r} is not a finite number: {m!r}", client_id=cid)


@dataclass(frozen=True)
class Aggregate:
    """What an aggregator hands to ``Strategy.apply``.

    ``delta`` is the aggregated update (a pseudo-gradient pointing downhill, i.e. to add).
    ``extras`` are aggregated extras (mean over clients, unweighted); ``metrics`` are the
    example-weighted means of the clients' training metrics.
    """

    delta: torch.Tensor
    num_clients: int
    num_examples: int
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    client_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "extras", _frozen_map(self.extras))
        object.__setattr__(self, "metrics", _frozen_map(self.metrics))
