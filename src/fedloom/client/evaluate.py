"""Evaluation of a model (or a flat parameter vector) on a data split, with the task's metrics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedloom.core.metrics import compute_metrics
from fedloom.core.params import ParamSpec
from fedloom.data.base import Split, TaskSpec

__all__ = ["evaluate_model", "evaluate_vector", "predict"]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 2048) -> torch.Tensor:
    """Model outputs for ``x`` in eval mode, batched."""
    was_training = model.training
    model.eval()
    try:
        outs = [model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate_model(
    model: nn.Module, split: Split, task: TaskSpec, *, metrics: Sequence[str] | None = None, batch_size: int = 2048
) -> dict[str, float]:
    """The task's metrics (or ``metrics``) of ``model`` on ``split``."""
    out = predict(model, split.x, batch_size=batch_size)
    return compute_metrics(task.kind, out, split.y, list(metrics or task.metrics))


def evaluate_vector(
    model: nn.Module,
    spec: ParamSpec,
    vec: torch.Tensor,
    split: Split,
    task: TaskSpec,
    *,
    metrics: Sequence[str] | None = None,
) -> dict[str, float]:
    """Load ``vec`` into ``model`` (a scratch module of the right architecture) and evaluate it."""
    spec.load_into(model, vec)
    return evaluate_model(model, split, task, metrics=metrics)
