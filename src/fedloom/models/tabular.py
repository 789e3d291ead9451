"""Models for tabular features ``(N, F)``: a multilayer perceptron and a linear model.

Output convention (the whole package): a model returns ``(N, num_outputs)``; binary
detection and regression tasks have ``num_outputs = 1``, so they return ``(N, 1)`` (one
logit, or the prediction in the target's units). :func:`fedloom.core.metrics.compute_metrics`
and the losses accept ``(N, 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedloom.core.errors import ConfigError

__all__ = ["MLP", "Linear"]


def _positive_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"must be an integer >= 1, got {value!r}", key=key)
    return value


class MLP(nn.Module):
    """``in_features → hidden[0] → ... → hidden[-1] → out_features`` with ReLU.

    Each hidden layer is ``Linear → [BatchNorm1d] → ReLU → [Dropout]``. BatchNorm adds
    running-statistics buffers (they travel in the flat vector like parameters); leave it
    off for the vectorized engine and for DP training, where per-example gradients are needed.
    Inputs of shape ``(N, *shape)`` are flattened to ``(N, F)``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (64, 32),
        out_features: int = 1,
        *,
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        _positive_int(in_features, "model.in_features")
        _positive_int(out_features, "model.out_features")
        if isinstance(hidden, int):
            hidden = (hidden,)
        hidden = tuple(hidden)
        for h in hidden:
            _positive_int(h, "model.hidden")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ConfigError(f"must be in [0, 1), got {dropout!r}", key="model.dropout")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0.0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class Linear(nn.Module):
    """A linear (affine) model: logistic regression for binary tasks, least squares for regression."""

    def __init__(self, in_features: int, out_features: int = 1) -> None:
        super().__init__()
        _positive_int(in_features, "model.in_features")
        _positive_int(out_features, "model.out_features")
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))
