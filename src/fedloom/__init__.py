"""fedloom: federated learning with fast vectorized simulation and secure deployment.

The public entry points are re-exported here; see DESIGN.md for the layers.
"""

from fedloom.core.errors import (
    ConfigError,
    DataError,
    EngineError,
    FedloomError,
    InvalidUpdateError,
    SpecError,
    StoreError,
    StrategyError,
)
from fedloom.core.params import ParamSpec, TensorEntry
from fedloom.core.config import RunConfig, load_config, parse_config
from fedloom.core.types import Aggregate, ClientInstruction, ClientUpdate, TrainConfig
from fedloom.run import Run, build_run

__version__ = "0.1.0"

__all__ = [
    "Aggregate",
    "ClientInstruction",
    "ClientUpdate",
    "ConfigError",
    "DataError",
    "EngineError",
    "FedloomError",
    "InvalidUpdateError",
    "ParamSpec",
    "Run",
    "RunConfig",
    "SpecError",
    "StoreError",
    "StrategyError",
    "TensorEntry",
    "TrainConfig",
    "build_run",
    "load_config",
    "parse_config",
    "__version__",
]
