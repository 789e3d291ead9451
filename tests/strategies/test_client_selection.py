"""ClientSampler: seeded, size max(floor(C·K), min_clients) capped at K, min_clients error."""

from __future__ import annotations

import pytest

from fedloom.core.errors import ConfigError, StrategyError
from fedloom.strategies import ClientSampler, FedAvg

IDS = [f"c{i:03d}" for i in range(100)]


def test_deterministic_and_seed_dependent() -> None:
    a = ClientSampler(fraction=0.1, seed=1)
    assert a.sample(5, IDS) == ClientSampler(fraction=0.1, seed=1).sample(5, IDS)
    # order and duplicates of the available ids do not matter
    assert a.sample(5, IDS) == a.sample(5, list(reversed(IDS)) + IDS[:10])
    assert a.sample(5, IDS) != a.sample(6, IDS)
    assert a.sample(5, IDS) != ClientSampler(fraction=0.1, seed=2).sample(5, IDS)
    cohort = a.sample(5, IDS)
    assert cohort == sorted(set(cohort)) and set(cohort) <= set(IDS)


@pytest.mark.parametrize(
    ("fraction", "min_clients", "k", "size"),
    [
        (0.1, 1, 100, 10),  # floor(0.1 * 100)
        (0.1, 1, 95, 9),  # floor(9.5)
        (0.3, 1, 10, 3),  # floor(3.0000000000000004) = 3, not 4
        (0.1, 1, 5, 1),  # floor(0.5) = 0 → min 1
        (0.1, 4, 20, 4),  # floor(2) < min 4
        (0.5, 4, 6, 4),
        (1.0, 1, 7, 7),
        (0.05, 3, 3, 3),
    ],
)
def test_cohort_size(fraction: float, min_clients: int, k: int, size: int) -> None:
    s = ClientSampler(fraction=fraction, min_clients=min_clients)
    assert s.cohort_size(k) == size
    assert len(s.sample(1, IDS[:k])) == size


def test_too_few_available() -> None:
    with pytest.raises(StrategyError, match="min_clients is 3"):
        ClientSampler(min_clients=3).sample(1, ["a", "b"])


def test_strategy_select_uses_the_sampler() -> None:
    s = FedAvg(fraction=0.2, min_clients=2, seed=9)
    assert s.select(3, IDS) == ClientSampler(fraction=0.2, min_clients=2, seed=9).sample(3, IDS)


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"fraction": 0.0}, "strategy.fraction"),
        ({"fraction": 1.5}, "strategy.fraction"),
        ({"fraction": "0.1"}, "strategy.fraction"),
        ({"min_clients": 0}, "strategy.min_clients"),
        ({"min_clients": 2.0}, "strategy.min_clients"),
        ({"seed": -1}, "strategy.seed"),
    ],
)
def test_bad_settings(kw: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        ClientSampler(**kw)  # type: ignore[arg-type]
    assert ei.value.key == key
