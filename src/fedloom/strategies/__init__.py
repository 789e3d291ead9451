"""Strategies: client selection, per-client configs, aggregation and the server update.

Every strategy shares the :class:`~fedloom.strategies.base.Strategy` interface; each one
overrides only the hook that makes it different (aggregator, ``apply`` or ``client_config``).
:func:`~fedloom.strategies.registry.build_strategy` builds one by name.
"""

from fedloom.strategies.base import (
    Aggregator,
    BufferingAggregator,
    ServerState,
    Strategy,
    WeightedMeanAggregator,
    WeightFn,
    example_weight,
)
from fedloom.strategies.contribution import ContributionAggregator, ContributionWeighted, squared_gradient_norm
from fedloom.strategies.fedavg import FedAvg
from fedloom.strategies.fedavgm import FedAvgM
from fedloom.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from fedloom.strategies.fedprox import FedProx
from fedloom.strategies.registry import STRATEGIES, build_strategy, list_strategies, strategy_params
from fedloom.strategies.robust import (
    FedMedian,
    FedTrimmedMean,
    Krum,
    KrumAggregator,
    MedianAggregator,
    MultiKrum,
    RobustStrategy,
    TrimmedMeanAggregator,
)
from fedloom.strategies.scaffold import CONTROL_DELTA, SERVER_CONTROL, Scaffold, ScaffoldAggregator
from fedloom.strategies.selection import ClientSampler

__all__ = [
    "CONTROL_DELTA",
    "SERVER_CONTROL",
    "STRATEGIES",
    "Aggregator",
    "BufferingAggregator",
    "ClientSampler",
    "ContributionAggregator",
    "ContributionWeighted",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedOpt",
    "FedProx",
    "FedTrimmedMean",
    "FedYogi",
    "Krum",
    "KrumAggregator",
    "MedianAggregator",
    "MultiKrum",
    "RobustStrategy",
    "Scaffold",
    "ScaffoldAggregator",
    "ServerState",
    "Strategy",
    "TrimmedMeanAggregator",
    "WeightFn",
    "WeightedMeanAggregator",
    "build_strategy",
    "example_weight",
    "list_strategies",
    "squared_gradient_norm",
    "strategy_params",
]
