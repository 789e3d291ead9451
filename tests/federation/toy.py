"""A toy federation for the round-loop tests: linear-regression clients and a Federation builder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from fedloom.core.params import ParamSpec
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec
from fedloom.engines.sequential import SequentialEngine
from fedloom.federation.loop import Federation

TASK = TaskSpec(kind="regression", input_shape=(3,), num_outputs=1, loss="mse", metrics=("mae", "loss"))


def dataset(sizes: Sequence[int], *, dtype: torch.dtype = torch.float32, offset: float = 0.3, test_shift: float = 0.0) -> FederatedDataset:
    """Client i: y = x·(1, −2, 0.5) + offset·i on n_i standard-normal x; its test split is its first
    examples (x shifted by ``test_shift``)."""
    g = torch.Generator().manual_seed(0)
    clients = {}
    for i, n in enumerate(sizes):
        x = torch.randn(n, 3, generator=g, dtype=dtype)
        y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype) + offset * i
        clients[f"c{i}"] = ClientData(train=Split(x, y), test=Split(x[:6] + test_shift, y[:6]))
    return FederatedDataset("toy", TASK, clients)


def federation(
    ds: FederatedDataset,
    strategy: Any,
    *,
    model_fn: Callable[[], nn.Module] = lambda: nn.Linear(3, 1),
    engine_cls: type = SequentialEngine,
    dtype: torch.dtype = torch.float32,
    **kw: Any,
) -> Federation:
    """A Federation of ``strategy`` over ``ds`` on ``engine_cls``, from a model seeded with 0."""
    torch.manual_seed(0)
    model = model_fn().to(dtype)
    spec = ParamSpec.from_module(model)
    engine = engine_cls(model_fn=lambda: model_fn().to(dtype), dataset=ds, spec=spec)
    return Federation(strategy=strategy, engine=engine, spec=spec, initial=spec.module_vector(model), **kw)
