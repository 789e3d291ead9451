"""The three application scenarios, generated on the fly (no downloads), and their registry.

* ``hospital`` — length-of-stay regression, 3 hospitals (:mod:`.hospital`);
* ``fraud`` — card-fraud detection, 3 bank branches (:mod:`.fraud`);
* ``equipment`` — failure prediction from sensor windows, 3 production lines (:mod:`.equipment`).

Every scenario is a :class:`~fedloom.data.base.FederatedDataset` whose clients are the three
sites (each with a local 80/20 train/test split) and whose ``server_test`` is the
concatenation of the sites' local test splits. Generation is deterministic in ``seed``.
:data:`SCENARIOS` also records, per scenario, a model and client training settings that
train well (used as defaults by the CLI and the demos).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from fedloom.core.errors import DataError
from fedloom.core.types import TrainConfig
from fedloom.data.base import FederatedDataset
from fedloom.data.scenarios.equipment import equipment
from fedloom.data.scenarios.fraud import fraud
from fedloom.data.scenarios.hospital import hospital

__all__ = ["SCENARIOS", "ScenarioInfo", "equipment", "fraud", "hospital", "list_scenarios", "load_scenario"]


@dataclass(frozen=True)
class ScenarioInfo:
    """A scenario's name, what it is, how to build it, and defaults that train well.

    ``model`` and ``model_kwargs`` go to :func:`fedloom.models.build_model`; ``train`` is the
    clients' :class:`~fedloom.core.types.TrainConfig`; ``rounds`` a number of federated
    rounds (all clients each round) that gets close to the pooled model.
    """

    name: str
    description: str
    loader: Callable[..., FederatedDataset]
    model: str
    train: TrainConfig
    rounds: int
    model_kwargs: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_kwargs", MappingProxyType(dict(self.model_kwargs)))

    def load(self, *, seed: int = 0) -> FederatedDataset:
        return self.loader(seed=seed)


SCENARIOS: dict[str, ScenarioInfo] = {
    "hospital": ScenarioInfo(
        name="hospital",
        description="Length-of-stay regression (days) at 3 hospitals: 10000/8000/12000 patients, "
        "stays in [5,15]/[3,18]/[3,30] days",
        loader=hospital,
        model="mlp",
        model_kwargs={"hidden": (64, 32)},
        train=TrainConfig(epochs=1, batch_size=64, lr=3e-3, optimizer="adam", loss="mse"),
        rounds=20,
    ),
    "fraud": ScenarioInfo(
        name="fraud",
        description="Card-fraud detection at 3 bank branches: 50000/40000/60000 transactions, "
        "1%/2%/1.5% fraud",
        loader=fraud,
        model="mlp",
        model_kwargs={"hidden": (64, 32)},
        train=TrainConfig(epochs=1, batch_size=128, lr=2e-3, optimizer="adam", loss="bce"),
        rounds=15,
    ),
    "equipment": ScenarioInfo(
        name="equipment",
        description="Equipment failure prediction at 3 production lines: 100/80/120 devices, "
        "2%/1.5%/2.5% of sensor windows precede a failure",
        loader=equipment,
        model="mlp",
        model_kwargs={"hidden": (64, 32)},
        train=TrainConfig(epochs=1, batch_size=64, lr=2e-3, optimizer="adam", loss="bce"),
        rounds=15,
    ),
}
"""Scenarios by name."""


def list_scenarios() -> list[str]:
    """The scenario names, in registry order."""
    return list(SCENARIOS)


def load_scenario(name: str, *, seed: int = 0) -> FederatedDataset:
    """Generate scenario ``name`` (``hospital``, ``fraud`` or ``equipment``) from ``seed``."""
    info = SCENARIOS.get(name)
    if info is None:
        raise DataError(f"unknown scenario {name!r}; known scenarios: {', '.join(SCENARIOS)}")
    return info.load(seed=seed)
