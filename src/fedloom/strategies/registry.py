"""Build a strategy by name, as a config file names it.

``build_strategy("fedadam", train=..., fraction=0.1, min_clients=2, seed=0, tau=1e-3)``
returns a ready :class:`~fedloom.strategies.base.Strategy`. An unknown name, an unknown or
missing parameter, or a bad value is one :class:`~fedloom.core.errors.ConfigError` naming
the key (``strategy.name``, ``strategy.<param>``). A strategy's parameters are the fields of
its dataclass beyond the common selection settings (``train``, ``fraction``,
``min_clients``, ``seed``); fields that take an object rather than a config value
(``server_optimizer``) are not parameters here.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from fedloom.core.errors import ConfigError
from fedloom.core.types import TrainConfig
from fedloom.strategies.base import Strategy
from fedloom.strategies.contribution import ContributionWeighted
from fedloom.strategies.fedavg import FedAvg
from fedloom.strategies.fedavgm import FedAvgM
from fedloom.strategies.feddyn import FedDyn
from fedloom.strategies.fednova import FedNova
from fedloom.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from fedloom.strategies.fedprox import FedProx
from fedloom.strategies.robust import CenteredClip, FedMedian, FedTrimmedMean, Krum, MultiKrum
from fedloom.strategies.scaffold import Scaffold

__all__ = ["STRATEGIES", "build_strategy", "list_strategies", "strategy_params"]

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "scaffold": Scaffold,
    "fednova": FedNova,
    "feddyn": FedDyn,
    "contribution": ContributionWeighted,
    "median": FedMedian,
    "trimmed_mean": FedTrimmedMean,
    "krum": Krum,
    "multikrum": MultiKrum,
    "centered_clip": CenteredClip,
}
"""Name -> strategy class (read-only by convention)."""

_COMMON = ("train", "fraction", "min_clients", "seed", "sampling")


def list_strategies() -> list[str]:
    """The names :func:`build_strategy` knows, sorted."""
    return sorted(STRATEGIES)


def _lookup(name: str) -> type[Strategy]:
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    try:
        return STRATEGIES[key]
    except (KeyError, TypeError):
        known = ", ".join(list_strategies())
        raise ConfigError(f"unknown strategy {name!r}; known: {known}", key="strategy.name") from None


def strategy_params(name: str) -> dict[str, inspect.Parameter]:
    """The strategy-specific keyword parameters of ``name`` (beyond train/fraction/min_clients/seed).

    Read from the strategy's dataclass fields; a required one has ``inspect.Parameter.empty``
    as its default.
    """
    out: dict[str, inspect.Parameter] = {}
    for f in dataclasses.fields(_lookup(name)):
        if not f.init or f.name in _COMMON or not f.metadata.get("param", True):
            continue
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = inspect.Parameter.empty
        out[f.name] = inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=f.type)
    return out


def build_strategy(
    name: str,
    *,
    train: TrainConfig | None = None,
    fraction: float = 0.1,
    min_clients: int = 1,
    seed: int = 0,
    sampling: str = "fixed",
    **params: Any,
) -> Strategy:
    """A strategy called ``name`` with the common selection settings and its own ``params``."""
    cls = _lookup(name)
    accepted = strategy_params(name)
    for key in params:
        if key not in accepted:
            known = ", ".join(sorted(accepted)) or "none"
            raise ConfigError(f"unknown parameter for strategy {name!r} (accepted: {known})", key=f"strategy.{key}")
    for key, p in accepted.items():
        if p.default is inspect.Parameter.empty and key not in params:
            raise ConfigError(f"strategy {name!r} requires this parameter", key=f"strategy.{key}")
    if train is not None:
        params["train"] = train
    return cls(fraction=fraction, min_clients=min_clients, seed=seed, sampling=sampling, **params)  # type: ignore[arg-type]
