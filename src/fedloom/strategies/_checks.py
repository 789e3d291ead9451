"""Validation helpers shared by the strategies (internal).

Every hyperparameter is checked when a strategy is built, so a bad value is one
:class:`~fedloom.core.errors.ConfigError` naming ``strategy.<key>``, never a ``TypeError``
from deep inside a round. :func:`state_tensor` fetches a named server-optimizer tensor
and says clearly when the state was not made by the strategy that uses it.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from fedloom.core.errors import ConfigError, StrategyError

__all__ = ["check_int", "check_real", "population", "set_fields", "state_tensor"]


def check_real(
    value: object,
    *,
    key: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float, or :class:`ConfigError` (key ``strategy.<key>``) unless it is a
    finite real number (not a bool) within the given bounds."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    want = f"a finite number in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"must be {want}, got {value!r}", key=f"strategy.{key}")
    x = float(value)
    ok = math.isfinite(x)
    if ok and low is not None:
        ok = x > low if low_open else x >= low
    if ok and high is not None:
        ok = x < high if high_open else x <= high
    if not ok:
        raise ConfigError(f"must be {want}, got {value!r}", key=f"strategy.{key}")
    return x


def check_int(value: object, *, key: str, low: int) -> int:
    """``value`` as an int, or :class:`ConfigError` unless it is an integer (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < low:
        raise ConfigError(f"must be an integer >= {low}, got {value!r}", key=f"strategy.{key}")
    return int(value)


def set_fields(obj: object, **values: object) -> None:
    """Store checked (normalized) values on a frozen dataclass from its ``__post_init__``."""
    for name, value in values.items():
        object.__setattr__(obj, name, value)


def state_tensor(state_tensors: object, key: str, like: torch.Tensor, *, strategy: str) -> torch.Tensor:
    """The server-state tensor ``key``, checked to have ``like``'s shape.

    Raises :class:`StrategyError` when it is missing (the state was not made by this
    strategy's ``init``, or comes from an incompatible checkpoint) or has the wrong shape.
    """
    try:
        t = state_tensors[key]  # type: ignore[index]
    except KeyError:
        raise StrategyError(
            f"{strategy}: server state has no {key!r} tensor; create the state with {strategy}.init()"
        ) from None
    if not isinstance(t, torch.Tensor) or t.shape != like.shape:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise StrategyError(f"{strategy}: server state {key!r} has shape {shape}, params have {tuple(like.shape)}")
    return t


def population(num_clients: int | None, available: int | None, cohort: int, *, who: str) -> int:
    """N, the population a round's cohort was drawn from: ``num_clients`` if fixed, else the aggregate's ``num_available``.

    Raises :class:`StrategyError` when N is unknown or smaller than the ``cohort`` that answered.
    """
    n_total = num_clients if num_clients is not None else available
    if n_total is None:
        raise StrategyError(
            f"{who}: the number of clients N is unknown; the aggregate carries no num_available "
            "(the round loop sets it) and num_clients is not set"
        )
    if cohort > n_total:
        raise StrategyError(f"{who}: {cohort} updates but only N={n_total} clients")
    return n_total
