"""FedAvg: example-weighted averaging of client deltas.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
Networks from Decentralized Data." AISTATS 2017.

The server update is ``x ← x + η_g · Σ_i (n_i / n) Δ_i`` (η_g = ``server_lr``, 1 in the
paper) with the default server optimizer; ``weighted=False`` gives every client the same
weight. FedAvgM, FedAdam, FedYogi and FedAdagrad are FedAvg with another server optimizer
(:mod:`fedloom.strategies.optimizers`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedloom.core.errors import ConfigError
from fedloom.pipeline import ExampleWeighting, Stage, UniformWeighting
from fedloom.strategies.base import Strategy

__all__ = ["FedAvg"]


@dataclass(frozen=True, kw_only=True)
class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017); ``weighted`` weights Δ_i by example counts."""

    name = "fedavg"

    weighted: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.weighted, bool):
            raise ConfigError(f"must be true or false, got {self.weighted!r}", key="strategy.weighted")

    def stages(self) -> tuple[Stage, ...]:
        return (ExampleWeighting() if self.weighted else UniformWeighting(),)
