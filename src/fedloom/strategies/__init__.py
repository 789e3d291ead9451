"""Strategies: client selection, per-client configs, aggregation and the server update.

Every strategy is a frozen, keyword-only dataclass over :class:`~fedloom.strategies.base.Strategy`
(the common settings), declaring only its own fields and overriding only the hook that makes
it different (aggregator, weighting ``stages``, ``apply`` or ``client_config``). The server step is a composed
:class:`~fedloom.strategies.optimizers.ServerOptimizer` (SGD, momentum, Adagrad, Adam, Yogi).
:func:`~fedloom.strategies.registry.build_strategy` builds one by name.
"""

from fedloom.strategies.base import (
    Aggregator,
    BufferingAggregator,
    ServerState,
    Strategy,
    SumAggregator,
)
from fedloom.strategies.contribution import (
    ContributionAggregator,
    ContributionWeighted,
    ContributionWeighting,
    squared_gradient_norm,
)
from fedloom.strategies.fedavg import FedAvg
from fedloom.strategies.fedavgm import FedAvgM
from fedloom.strategies.feddyn import FedDyn, FedDynStep
from fedloom.strategies.fednova import FedNova, FedNovaAggregator, FedNovaWeighting, effective_steps
from fedloom.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from fedloom.strategies.fedprox import FedProx
from fedloom.strategies.optimizers import SGD, Adagrad, Adam, AdaptiveOptimizer, Momentum, ServerOptimizer, Yogi
from fedloom.strategies.registry import STRATEGIES, build_strategy, list_strategies, strategy_params
from fedloom.strategies.robust import (
    CenteredClip,
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
    "SGD",
    "STRATEGIES",
    "Adagrad",
    "Adam",
    "AdaptiveOptimizer",
    "Aggregator",
    "BufferingAggregator",
    "ClientSampler",
    "ContributionAggregator",
    "ContributionWeighted",
    "ContributionWeighting",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedDyn",
    "FedDynStep",
    "FedMedian",
    "FedNova",
    "FedNovaAggregator",
    "FedNovaWeighting",
    "FedOpt",
    "FedProx",
    "FedTrimmedMean",
    "FedYogi",
    "Krum",
    "KrumAggregator",
    "MedianAggregator",
    "Momentum",
    "MultiKrum",
    "CenteredClip",
    "RobustStrategy",
    "Scaffold",
    "ScaffoldAggregator",
    "ServerOptimizer",
    "ServerState",
    "Strategy",
    "SumAggregator",
    "TrimmedMeanAggregator",
    "Yogi",
    "build_strategy",
    "effective_steps",
    "list_strategies",
    "squared_gradient_norm",
    "strategy_params",
]
