"""One entry point for every dataset: ``load_dataset("mnist", partition="shards")``.

``mnist`` dispatches to :func:`fedloom.data.mnist_federated.mnist_federated`; the scenario
names (``hospital``, ``fraud``, ``equipment``) to
:func:`fedloom.data.scenarios.load_scenario`. Unknown names and options raise
:class:`~fedloom.core.errors.DataError` naming them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fedloom.core.errors import DataError
from fedloom.data.base import FederatedDataset
from fedloom.data.mnist_federated import mnist_federated
from fedloom.data.scenarios import SCENARIOS

__all__ = ["dataset_options", "list_datasets", "load_dataset"]


def _loader(name: str) -> Callable[..., FederatedDataset]:
    if name == "mnist":
        return mnist_federated
    if name in SCENARIOS:
        return SCENARIOS[name].loader
    raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")


def list_datasets() -> list[str]:
    """Every name :func:`load_dataset` accepts."""
    return ["mnist", *SCENARIOS]


def dataset_options(name: str) -> dict[str, Any]:
    """The options dataset ``name`` accepts, with their defaults."""
    params = inspect.signature(_loader(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def load_dataset(name: str, **options: Any) -> FederatedDataset:
    """Build dataset ``name`` with ``options`` (e.g. ``num_clients``, ``partition``, ``seed``)."""
    accepted = dataset_options(name)
    for key in options:
        if key not in accepted:
            raise DataError(
                f"unknown option {key!r} for dataset {name!r}; it accepts {', '.join(accepted)}"
            )
    return _loader(name)(**options)
