"""One entry point for every dataset: ``load_dataset("mnist", partition="shards")``.

``mnist`` dispatches to :func:`fedloom.data.mnist_federated.mnist_federated`; the scenario
names (``hospital``, ``fraud``, ``equipment``) to
:func:`fedloom.data.scenarios.load_scenario`. Unknown names and options raise
:class:`~fedloom.core.errors.DataError` naming them.

``load_dataset(..., server_only=True)`` is what a deployed server loads: the task, its test
split, the info and the client ids, no client data (``clients`` loads it only if read:
:class:`~fedloom.data.base.LazyClients`). A loader that can build that view without loading
the clients' data takes a ``server_only`` keyword (MNIST: the test set alone); any other is
loaded whole once and reduced with :meth:`~fedloom.data.base.FederatedDataset.server_view`.
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


SERVER_ONLY = "server_only"  # the loaders' keyword for the server's view: not a dataset option


def dataset_options(name: str) -> dict[str, Any]:
    """The options dataset ``name`` accepts, with their defaults."""
    params = inspect.signature(_loader(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != SERVER_ONLY}


def load_dataset(name: str, *, server_only: bool = False, **options: Any) -> FederatedDataset:
    """Build dataset ``name`` with ``options`` (e.g. ``num_clients``, ``partition``, ``seed``).

    ``server_only``: only what a deployed server holds (:meth:`FederatedDataset.server_view`):
    the clients' data is not kept, and not even loaded where the loader can avoid it.
    """
    accepted = dataset_options(name)
    for key in options:
        if key not in accepted:
            raise DataError(
                f"unknown option {key!r} for dataset {name!r}; it accepts {', '.join(accepted)}"
            )
    loader = _loader(name)
    if not server_only:
        return loader(**options)
    if SERVER_ONLY in inspect.signature(loader).parameters:
        return loader(**options, server_only=True)
    return loader(**options).server_view(reload=lambda: loader(**options).clients)
