"""Strategies: client selection, per-client configs, aggregation and the server update.

Every strategy shares the :class:`~fedloom.strategies.base.Strategy` interface; each one
overrides only the hook that makes it different (aggregator, ``apply`` or ``client_config``).
"""

from fedloom.strategies.base import Aggregator, ServerState, Strategy
from fedloom.strategies.fedavg import FedAvg
from fedloom.strategies.selection import ClientSampler

__all__ = ["Aggregator", "ClientSampler", "FedAvg", "ServerState", "Strategy"]
