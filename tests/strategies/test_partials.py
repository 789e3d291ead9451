"""Partial aggregates: emitting and merging them gives what adding every update gives."""

from __future__ import annotations

import pytest
import torch

from fedloom.core.errors import InvalidUpdateError, StrategyError
from fedloom.core.types import ClientUpdate, Partial
from fedloom.strategies.base import SumAggregator
from fedloom.strategies.robust import KrumAggregator, MedianAggregator


def _up(cid: str, delta: list[float], n: int, w: float, loss: float, extra: list[float] | None = None) -> ClientUpdate:
    extras = {"e": torch.tensor(extra)} if extra is not None else {}
    return ClientUpdate(cid, 1, torch.tensor(delta), n, metrics={"loss": loss}, extras=extras, weight=w)


UPS = [
    _up("a", [1.0, 2.0], 2, 2.0, 0.5, [1.0, 0.0]),
    _up("b", [3.0, -1.0], 6, 6.0, 1.5, [0.0, 2.0]),
    _up("c", [0.5, 0.5], 4, 4.0, 1.0, [3.0, 1.0]),
]


def test_a_partial_holds_the_sums_by_hand() -> None:
    agg = SumAggregator()
    agg.add(UPS[0])
    agg.add(UPS[1])
    p = agg.partial("edge-1", 1, 0)
    assert p.delta_sum.dtype == torch.float64 and p.delta_sum.tolist() == [4.0, 1.0]
    assert p.weight == 8.0 and p.client_ids == ("a", "b") and p.client_examples == (2, 6) and p.num_examples == 8
    assert p.metric_sums == {"loss": 0.5 * 2 + 1.5 * 6} and p.metric_weights == {"loss": 8}
    assert p.extra_sums["e"].tolist() == [1.0, 2.0] and p.extra_counts == {"e": 2}


def test_merging_partials_equals_adding_every_update() -> None:
    flat = SumAggregator()
    for u in UPS:
        flat.add(u)
    e1, e2 = SumAggregator(), SumAggregator()
    e1.add(UPS[0])
    e1.add(UPS[2])
    e2.add(UPS[1])
    root = SumAggregator()
    root.merge(e1.partial("e1", 1, 0), dtype=torch.float32)
    root.merge(e2.partial("e2", 1, 0), dtype=torch.float32)
    a, b = flat.result(), root.result()
    assert torch.equal(a.delta, b.delta) and a.delta.tolist() == [4.5, 1.5]
    assert a.weight == b.weight == 12.0 and a.num_examples == b.num_examples == 12
    assert a.metrics == b.metrics == {"loss": (1.0 + 9.0 + 4.0) / 12}
    assert torch.equal(a.extras["e"], b.extras["e"]) and torch.equal(b.extras["e"], torch.tensor([4 / 3, 1.0]))
    assert b.extras["e"].dtype == a.extras["e"].dtype == torch.float32  # the updates' dtype, told to merge
    assert sorted(b.client_ids) == ["a", "b", "c"]


def test_a_client_in_two_partials_is_refused() -> None:
    e1, e2 = SumAggregator(), SumAggregator()
    e1.add(UPS[0])
    e2.add(UPS[0])
    root = SumAggregator()
    root.merge(e1.partial("e1", 1, 0), dtype=torch.float32)
    with pytest.raises(StrategyError, match=r"partial from 'e2' repeats client\(s\) \['a'\]"):
        root.merge(e2.partial("e2", 1, 0), dtype=torch.float32)


@pytest.mark.parametrize("agg", [MedianAggregator(), KrumAggregator(f=0)])
def test_robust_rules_refuse_partials_with_the_reason(agg) -> None:
    agg.add(UPS[0])
    with pytest.raises(StrategyError, match="needs every client's update"):
        agg.partial("e", 1, 0)


def test_a_malformed_partial_is_refused_by_name() -> None:
    good = dict(source="edge-a", round=1, model_version=0, delta_sum=torch.zeros(2, dtype=torch.float64), weight=1.0, client_ids=("a",), client_examples=(3,))
    Partial(**good).validate(numel=2)
    for change, msg in [
        ({"delta_sum": torch.zeros(2)}, "float64 vector of 2"),
        ({"delta_sum": torch.tensor([0.0, float("nan")], dtype=torch.float64)}, "NaN"),
        ({"weight": -1.0}, "weight"),
        ({"client_ids": ("a", "a"), "client_examples": (1, 1)}, "distinct"),
        ({"client_examples": (0,)}, "client_examples"),
    ]:
        with pytest.raises(InvalidUpdateError, match=msg) as e:
            Partial(**{**good, **change}).validate(numel=2)
        assert e.value.client_id == "edge-a"
