"""In-memory federated datasets.

A :class:`FederatedDataset` maps client ids to :class:`ClientData` (a train split and an
optional local test split), holds the server's held-out test split, and a :class:`TaskSpec`
that says what is learned (classification, binary detection, regression), which loss trains
it and which metrics judge it. Splits are plain tensors so engines can batch them freely.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from fedloom.core.errors import DataError

__all__ = ["ClientData", "FederatedDataset", "Split", "TaskKind", "TaskSpec"]

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


@dataclass(frozen=True)
class FederatedDataset:
    """Clients' data keyed by client id, plus the server's held-out test split."""

    name: str
    task: TaskSpec
    clients: Mapping[str, ClientData]
    server_test: Split | None = None
    info: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.clients:
            raise DataError(f"dataset {self.name!r} has no clients")
        for cid, cd in self.clients.items():
            if len(cd.train) == 0:
                raise DataError(f"client {cid!r} of dataset {self.name!r} has no training examples")

    @property
    def client_ids(self) -> list[str]:
        return list(self.clients)

    def pooled_train(self) -> Split:
        """All clients' training data concatenated (the centralized upper bound)."""
        parts = list(self.clients.values())
        return Split(torch.cat([p.train.x for p in parts]), torch.cat([p.train.y for p in parts]))
