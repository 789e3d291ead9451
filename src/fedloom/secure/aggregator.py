"""The aggregator of a secure round: it sums masked inputs and learns only the total.

:class:`SecureSumAggregator` has the :class:`~fedloom.strategies.base.Aggregator` interface
of the plain streaming sum, so the round loop and the weighting stage's finalize treat a
secure round like any other: ``add`` folds a masked input into the sum mod 2^k (and its
weight, which travels in the clear beside it), ``result`` runs the unmasking exchange and
returns Σ w_i Δ_i (clipped, within the quantization bound) and Σ w_i.
"""

from __future__ import annotations

import torch

from fedloom.core.types import ClientUpdate
from fedloom.secure.host import Exchange, SecureServer
from fedloom.strategies.base import Aggregator

__all__ = ["SecureSumAggregator"]


class SecureSumAggregator(Aggregator):
    """Streaming sum of masked inputs; ``result()`` unmasks (may raise ProtocolAbort)."""

    def __init__(self, server: SecureServer, exchange: Exchange, numel: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.server = server
        self.exchange = exchange
        self.numel = numel
        self.total_weight = 0.0
        self._dtype = dtype

    def _add(self, update: ClientUpdate) -> None:
        self.server.add(update, self.numel)
        self.total_weight += 1.0 if update.weight is None else float(update.weight)

    def _result(self) -> torch.Tensor:
        total, survivors = self.server.finish(self.exchange)
        assert survivors == sorted(self.client_ids)
        return total

    def _weight(self) -> float | None:
        return self.total_weight
