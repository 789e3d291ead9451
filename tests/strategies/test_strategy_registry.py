"""build_strategy / list_strategies: names, parameters and errors that name the key."""

from __future__ import annotations

import pytest
import torch

from fedloom.core.errors import ConfigError
from fedloom.core.types import TrainConfig
from fedloom.strategies import (
    ContributionWeighted,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedDyn,
    FedMedian,
    FedNova,
    FedProx,
    FedTrimmedMean,
    FedYogi,
    Krum,
    MultiKrum,
    Scaffold,
    CenteredClip,
    Strategy,
    build_strategy,
    list_strategies,
)

EXPECTED: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "scaffold": Scaffold,
    "fednova": FedNova,
    "feddyn": FedDyn,
    "contribution": ContributionWeighted,
    "median": FedMedian,
    "trimmed_mean": FedTrimmedMean,
    "krum": Krum,
    "multikrum": MultiKrum,
    "centered_clip": CenteredClip,
}
REQUIRED = {"krum": {"f": 1}, "multikrum": {"f": 1}, "centered_clip": {"tau": 1.0}}


def test_list_strategies() -> None:
    assert list_strategies() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_name_builds_its_class(name: str) -> None:
    train = TrainConfig(lr=0.25)
    s = build_strategy(name, train=train, fraction=0.5, min_clients=2, seed=3, **REQUIRED.get(name, {}))
    assert type(s) is EXPECTED[name]
    assert s.name == name
    assert s.train is train and s.seed == 3
    assert (s.sampler.fraction, s.sampler.min_clients, s.sampler.seed) == (0.5, 2, 3)
    s.init(torch.zeros(4))  # and it is usable


def test_params_are_forwarded_and_names_normalized() -> None:
    s = build_strategy("FedAdam", train=TrainConfig(), fraction=1.0, min_clients=1, seed=0, tau=1e-2, beta_2=0.9)
    assert isinstance(s, FedAdam) and (s.tau, s.beta_2) == (1e-2, 0.9)
    t = build_strategy(" trimmed-mean ", train=TrainConfig(), fraction=1.0, min_clients=1, seed=0, beta=0.25)
    assert isinstance(t, FedTrimmedMean) and t.beta == 0.25


def test_unknown_name() -> None:
    with pytest.raises(ConfigError) as ei:
        build_strategy("fedsgd", train=TrainConfig(), fraction=0.1, min_clients=1, seed=0)
    assert ei.value.key == "strategy.name"
    assert "fedsgd" in str(ei.value) and "fedavg" in str(ei.value) and "multikrum" in str(ei.value)


def test_unknown_parameter() -> None:
    with pytest.raises(ConfigError) as ei:
        build_strategy("fedadagrad", train=TrainConfig(), fraction=0.1, min_clients=1, seed=0, beta_2=0.9)
    assert ei.value.key == "strategy.beta_2"
    assert "beta_1" in str(ei.value)  # lists what is accepted
    with pytest.raises(ConfigError) as ei:
        build_strategy("median", train=TrainConfig(), fraction=0.1, min_clients=1, seed=0, weighted=True)
    assert ei.value.key == "strategy.weighted"


def test_missing_required_parameter() -> None:
    with pytest.raises(ConfigError) as ei:
        build_strategy("krum", train=TrainConfig(), fraction=0.1, min_clients=1, seed=0)
    assert ei.value.key == "strategy.f"


def test_bad_values_name_their_key() -> None:
    cases: list[tuple[str, dict[str, object], str]] = [
        ("fedprox", {"mu": -1.0}, "strategy.mu"),
        ("fedavgm", {"server_momentum": 1.5}, "strategy.server_momentum"),
        ("multikrum", {"f": 1, "m": 0}, "strategy.m"),
        ("contribution", {"mode": "max"}, "strategy.mode"),
        ("feddyn", {"alpha": 0.0}, "strategy.alpha"),
    ]
    for name, kw, key in cases:
        with pytest.raises(ConfigError) as ei:
            build_strategy(name, train=TrainConfig(), fraction=0.1, min_clients=1, seed=0, **kw)
        assert ei.value.key == key
    with pytest.raises(ConfigError) as ei:
        build_strategy("fedavg", train=TrainConfig(), fraction=0.0, min_clients=1, seed=0)
    assert ei.value.key == "strategy.fraction"
