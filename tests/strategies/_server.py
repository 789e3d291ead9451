"""Test helper: the server side of a round for updates handed in one by one.

:class:`Server` wraps a strategy's aggregator the way the round loop does: each added
(dense, trained) update goes through the strategy's stages — client halves (its weighting),
then server halves — into the aggregator, and :meth:`Server.result` runs the finalize halves
on the aggregate, giving what ``Strategy.apply`` receives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from fedloom.core.params import ParamSpec
from fedloom.core.types import Aggregate, ClientUpdate
from fedloom.pipeline import ClientBatch, Pipeline, StageContext
from fedloom.strategies import ServerState, Strategy


class Server:
    def __init__(self, s: Strategy, state: ServerState, rnd: int = 1, num_available: int | None = None) -> None:
        self.pipeline = Pipeline(s.stages())
        self.aggregator = s.aggregator(state, rnd)
        self.numel = state.params.numel()
        self.rnd = rnd
        self.num_available = num_available
        self._ctx: StageContext | None = None

    def ctx(self, dtype: torch.dtype) -> StageContext:
        if self._ctx is None:
            spec = ParamSpec.from_state_dict({"w": torch.zeros(self.numel, dtype=dtype)}, trainable={"w"}, vector_dtype=dtype)
            self._ctx = StageContext(spec, self.rnd, dtype)
        return self._ctx

    def add(self, update: ClientUpdate) -> None:
        ctx = self.ctx(update.delta.dtype)
        batch = ClientBatch.of([update], [0], [{}])
        for st in self.pipeline.stages:
            if st.runs_on_client:
                st.client(batch, ctx)
        self.aggregator.add(self.pipeline.decode(batch.finish()[0], ctx))

    def result(self) -> Aggregate:
        out = replace(self.aggregator.result(), num_available=self.num_available)
        out, _, _, _ = self.pipeline.finalize(out, self.ctx(self.aggregator._dtype or torch.float32), {}, {})
        return out

    def __getattr__(self, name: str) -> Any:  # the aggregator's own bookkeeping (weights, client_ids, ...)
        return getattr(self.__dict__["aggregator"], name)


def aggregate(
    s: Strategy, state: ServerState, updates: Sequence[ClientUpdate], rnd: int = 1, num_available: int | None = None
) -> Aggregate:
    """The aggregate ``s.apply`` receives for ``updates`` in round ``rnd``."""
    server = Server(s, state, rnd, num_available)
    for u in updates:
        server.add(u)
    return server.result()
