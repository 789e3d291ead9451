"""Training losses by name, with the target/output shapes each task uses.

Classification models output (N, C) logits and take int64 labels; binary and regression
models output (N, 1) (or (N,)) and take float targets of shape (N,).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedloom.core.errors import ConfigError

__all__ = ["LOSSES", "LossFn", "get_loss", "per_sample_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y)


def _bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out.reshape(-1), y.to(out.dtype).reshape(-1))


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.reshape(-1), y.to(out.dtype).reshape(-1))


def _l1(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(out.reshape(-1), y.to(out.dtype).reshape(-1))


def _huber(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.huber_loss(out.reshape(-1), y.to(out.dtype).reshape(-1))


LOSSES: dict[str, LossFn] = {
    "cross_entropy": _cross_entropy,
    "bce": _bce,
    "mse": _mse,
    "l1": _l1,
    "huber": _huber,
}


def get_loss(name: str) -> LossFn:
    """The mean-reduced loss function called ``name``."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ConfigError(f"unknown loss {name!r}; known: {sorted(LOSSES)}", key="client.loss") from None


_PER_SAMPLE: dict[str, Callable[..., torch.Tensor]] = {
    "bce": F.binary_cross_entropy_with_logits,
    "mse": F.mse_loss,
    "l1": F.l1_loss,
    "huber": F.huber_loss,
}


def per_sample_loss(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample losses ``(N,)`` whose mean is :func:`get_loss` ``(name)``."""
    if name == "cross_entropy":
        return F.cross_entropy(out, y, reduction="none")
    fn = _PER_SAMPLE.get(name)
    if fn is None:
        raise ConfigError(f"unknown loss {name!r}; known: {sorted(LOSSES)}", key="client.loss")
    n = out.shape[0]
    shape = (n, -1) if n else (0, math.prod(out.shape[1:]))  # an empty (Poisson) batch: no -1 to infer
    return fn(out.reshape(shape), y.to(out.dtype).reshape(shape), reduction="none").mean(1)
