"""Build a model by name for a task: ``build_model("mlp", task, hidden=(64, 32))``.

Names: ``cnn`` / ``mcmahan_cnn`` (:class:`~fedloom.models.mnist.McMahanCNN`, 28x28 inputs
only), ``2nn`` / ``mcmahan_2nn`` (:class:`~fedloom.models.mnist.McMahan2NN`), ``mlp``
(:class:`~fedloom.models.tabular.MLP`) and ``linear`` (:class:`~fedloom.models.tabular.Linear`).
Input size and number of outputs come from the :class:`~fedloom.data.base.TaskSpec`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedloom.core.errors import ConfigError
from fedloom.data.base import TaskSpec
from fedloom.models.mnist import McMahan2NN, McMahanCNN
from fedloom.models.tabular import MLP, Linear

__all__ = ["MODEL_ALIASES", "build_model", "list_models"]


def _cnn(task: TaskSpec, init: str = "torch") -> nn.Module:
    if math.prod(task.input_shape) != 784:
        raise ConfigError(
            f"the McMahan CNN needs 28x28 = 784 inputs, the task has shape {task.input_shape}", key="model.name"
        )
    return McMahanCNN(num_classes=task.num_outputs, init=init)


def _2nn(task: TaskSpec, hidden: int = 200, init: str = "he") -> nn.Module:
    return McMahan2NN(num_classes=task.num_outputs, in_features=math.prod(task.input_shape), hidden=hidden, init=init)


def _mlp(
    task: TaskSpec, hidden: tuple[int, ...] = (64, 32), dropout: float = 0.0, batchnorm: bool = False
) -> nn.Module:
    return MLP(math.prod(task.input_shape), hidden, task.num_outputs, dropout=dropout, batchnorm=batchnorm)


def _linear(task: TaskSpec) -> nn.Module:
    return Linear(math.prod(task.input_shape), task.num_outputs)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mcmahan_cnn": _cnn,
    "mcmahan_2nn": _2nn,
    "mlp": _mlp,
    "linear": _linear,
}
MODEL_ALIASES: dict[str, str] = {"cnn": "mcmahan_cnn", "2nn": "mcmahan_2nn"}
"""Short names and the canonical model names they stand for."""


def list_models() -> list[str]:
    """Every name :func:`build_model` accepts (canonical names and aliases), sorted."""
    return sorted([*_BUILDERS, *MODEL_ALIASES])


def build_model(name: str, task: TaskSpec, *, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """A fresh model ``name`` for ``task``; ``kwargs`` are the model's options (``hidden``, ``dropout``, ...).

    With ``seed`` the initial weights are a function of the seed alone (the global RNG is
    left untouched). Unknown names and options raise :class:`ConfigError` naming them.
    """
    canonical = MODEL_ALIASES.get(name, name)
    builder = _BUILDERS.get(canonical)
    if builder is None:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}", key="model.name")
    accepted = [p for p in inspect.signature(builder).parameters if p != "task"]
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(
                f"unknown option {key!r} for model {name!r}; it accepts {', '.join(accepted) or 'no options'}",
                key=f"model.{key}",
            )
    if "hidden" in kwargs and isinstance(kwargs["hidden"], list):
        kwargs["hidden"] = tuple(kwargs["hidden"])
    if seed is None:
        return builder(task, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU generator only: no CUDA side effects
        return builder(task, **kwargs)
