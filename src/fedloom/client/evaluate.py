"""Evaluation of a model (or a flat parameter vector) on a data split, with the task's metrics;
and a client's evaluation of its own, personalized model (:func:`evaluate_personal`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedloom.core.metrics import compute_metrics
from fedloom.client.transforms import build_transforms
from fedloom.core.params import ParamSpec
from fedloom.core.seeding import derive_seed
from fedloom.core.types import ClientInstruction, PersonalEval
from fedloom.data.base import Split, TaskSpec

__all__ = ["evaluate_model", "evaluate_personal", "evaluate_vector", "predict"]


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


def evaluate_personal(
    model: nn.Module,
    spec: ParamSpec,
    global_vec: torch.Tensor,
    train: Split,
    test: Split,
    task: TaskSpec,
    plan: PersonalEval,
    client_id: str,
    client_state: Mapping[str, torch.Tensor],
) -> dict[str, float]:
    """A client's own model on its test split (:class:`~fedloom.core.types.PersonalEval`).

    The global vector with the client's personal layers, fine-tuned ``plan.steps`` steps on
    ``train`` when that is > 0. ``client_state`` is read, never changed.
    """
    from fedloom.client.training import train_local
    from fedloom.client.transforms import start_vector

    ins = plan.instruction(client_id, derive_seed(plan.seed, "personal-eval", client_id))
    if ins is None or len(train) == 0:
        transforms = build_transforms(plan.transforms)
        probe = ClientInstruction(round=0, client_id=client_id, train=plan.train, seed=0, transforms=plan.transforms)
        spec.load_into(model, start_vector(transforms, spec, global_vec, probe, client_state))
    else:
        train_local(model, spec, global_vec, train, ins, client_state=dict(client_state))  # leaves the local model in ``model``
    return evaluate_model(model, test, task)
