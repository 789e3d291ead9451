"""In-memory federated datasets.

A :class:`FederatedDataset` maps client ids to :class:`ClientData` (a train split and an
optional local test split), holds the server's held-out test split, and a :class:`TaskSpec`
that says what is learned (classification, binary detection, regression), which loss trains
it and which metrics judge it. Splits are plain tensors so engines can batch them freely.

A deployed server trains on remote clients' data, never on its own copy: its dataset is a
*server view* (``server_only``; ``load_dataset(..., server_only=True)``): the task, the
server's test split, the info and the client ids, while ``clients`` is a :class:`LazyClients`
that loads the simulated clients' data only if something reads it (a test or a demo starting
agents from the same config); a deployed server never does, so it never holds that data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from fedloom.core.errors import DataError

__all__ = ["ClientData", "FederatedDataset", "LazyClients", "Split", "TaskKind", "TaskSpec"]

TaskKind = Literal["classification", "binary", "regression"]


@dataclass(frozen=True)
class TaskSpec:
    """What a dataset asks a model to learn.

    ``kind``: ``classification`` (integer labels, ``num_classes`` logits), ``binary`` (one
    logit, labels 0/1 as float) or ``regression`` (one output, float target).
    ``loss``: the training loss name understood by :mod:`fedloom.client.losses`.
    ``metrics``: names understood by :mod:`fedloom.core.metrics`; the first is the headline.
    ``input_shape``: shape of one example.
    """

    kind: TaskKind
    input_shape: tuple[int, ...]
    num_outputs: int
    loss: str
    metrics: tuple[str, ...]
    target_name: str = "y"
    feature_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "binary", "regression"):
            raise DataError(f"unknown task kind {self.kind!r}")
        if not self.metrics:
            raise DataError("a task needs at least one metric")


@dataclass(frozen=True)
class Split:
    """Features ``x`` (N, *input_shape) float32 and targets ``y`` (N,) of one data split."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: torch.Tensor) -> Split:
        return Split(self.x[index], self.y[index])


@dataclass(frozen=True)
class ClientData:
    """One data holder's local data: a train split and an optional local test split."""

    train: Split
    test: Split | None = None
    site: str | None = None

    @property
    def num_examples(self) -> int:
        return len(self.train)


class LazyClients(Mapping[str, ClientData]):
    """Client ids known up front; every client's data loaded by ``load`` on the first read of any of it.

    Iterating, ``len`` and ``in`` only use the ids. ``loaded`` says whether the data was read.
    """

    def __init__(self, ids: Sequence[str], load: Callable[[], Mapping[str, ClientData]]) -> None:
        self._ids = tuple(ids)
        self._known = frozenset(self._ids)
        self._load: Callable[[], Mapping[str, ClientData]] | None = load
        self._data: Mapping[str, ClientData] | None = None

    @property
    def loaded(self) -> bool:
        return self._data is not None

    def __getitem__(self, cid: str) -> ClientData:
        if cid not in self._known:
            raise KeyError(cid)
        if self._data is None:
            assert self._load is not None
            data = self._load()
            if list(data) != list(self._ids):
                raise DataError("the reloaded clients differ from the server view's client ids")
            self._data, self._load = data, None
        return self._data[cid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, cid: object) -> bool:
        return cid in self._known

    def __repr__(self) -> str:
        return f"LazyClients({len(self._ids)} clients, {'loaded' if self.loaded else 'not loaded'})"


@dataclass(frozen=True)
class FederatedDataset:
    """Clients' data keyed by client id, plus the server's held-out test split.

    ``server_only``: a deployed server's view: ``clients`` knows the ids but holds no data
    (a :class:`LazyClients`, or empty); build it with :meth:`server_view` or
    ``load_dataset(..., server_only=True)``.
    """

    name: str
    task: TaskSpec
    clients: Mapping[str, ClientData]
    server_test: Split | None = None
    info: Mapping[str, object] = field(default_factory=dict)
    server_only: bool = False

    def __post_init__(self) -> None:
        if self.server_only:
            if self.clients and not (isinstance(self.clients, LazyClients) and not self.clients.loaded):
                raise DataError(f"the server view of dataset {self.name!r} holds no client data")
            return
        if not self.clients:
            raise DataError(f"dataset {self.name!r} has no clients")
        for cid, cd in self.clients.items():
            if len(cd.train) == 0:
                raise DataError(f"client {cid!r} of dataset {self.name!r} has no training examples")

    @property
    def client_ids(self) -> list[str]:
        return list(self.clients)

    def server_view(self, reload: Callable[[], Mapping[str, ClientData]] | None = None) -> FederatedDataset:
        """This dataset as a deployed server holds it: task, server test split, info, no client data.

        ``reload`` (e.g. loading the dataset again) makes the clients' data readable on demand
        (:class:`LazyClients`); without it the view has no clients.
        """
        clients: Mapping[str, ClientData] = LazyClients(list(self.clients), reload) if reload is not None else {}
        return FederatedDataset(self.name, self.task, clients, self.server_test, self.info, server_only=True)

    def pooled_train(self) -> Split:
        """All clients' training data concatenated (the centralized upper bound)."""
        if self.server_only:
            raise DataError(f"the server view of dataset {self.name!r} holds no client data")
        parts = list(self.clients.values())
        return Split(torch.cat([p.train.x for p in parts]), torch.cat([p.train.y for p in parts]))
