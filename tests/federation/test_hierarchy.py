"""Hierarchical rounds (HierFAVG): edges forwarding partials equal flat FedAvg; kappa edge rounds by hand."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
import toy

from fedloom.core.config import parse_config
from fedloom.core.errors import ConfigError
from fedloom.core.types import Partial, TrainConfig
from fedloom.data.base import FederatedDataset, Split
from fedloom.engines.sequential import SequentialEngine
from fedloom.engines.vectorized import VectorizedEngine
from fedloom.federation.hierarchy import Hierarchy, edges_of
from fedloom.federation.loop import Federation
from fedloom.run import build_run
from fedloom.strategies.fedavg import FedAvg
from fedloom.strategies.fedprox import FedProx
from fedloom.strategies.robust import FedMedian, Krum

TRAIN = TrainConfig(loss="mse", epochs=2, batch_size=4, lr=0.05)
SIZES = [13, 7, 21, 9, 16, 11, 8, 12]


def _dataset(sizes: Sequence[int], dtype: torch.dtype = torch.float32) -> FederatedDataset:
    return toy.dataset(sizes, dtype=dtype)


def _federation(ds: FederatedDataset, strategy, *, engine_cls=SequentialEngine, dtype=torch.float32, **kw) -> Federation:
    return toy.federation(ds, strategy, engine_cls=engine_cls, dtype=dtype, **kw)


def test_one_edge_equals_flat_fedavg_exactly() -> None:
    strategy = FedAvg(train=TRAIN, fraction=0.5, seed=2)
    flat = _federation(_dataset(SIZES), strategy)
    flat.run(4)
    one = _federation(_dataset(SIZES), strategy, hierarchy=edges_of(1, [f"c{i}" for i in range(8)]))
    one.run(4)
    assert [r.clients for r in one.history] == [r.clients for r in flat.history]
    assert torch.equal(one.state.params, flat.state.params)
    assert [r.metrics["edges"] for r in one.history] == [1.0] * 4


@pytest.mark.parametrize("engine_cls", [SequentialEngine, VectorizedEngine])
def test_edges_forwarding_partials_equal_flat_fedavg_with_full_participation(engine_cls) -> None:
    """kappa = 1: the root's sum of edge sums is the flat sum (float64, so up to its rounding)."""
    strategy = FedProx(train=TRAIN, fraction=1.0, seed=2, mu=0.1)
    flat = _federation(_dataset(SIZES), strategy, engine_cls=engine_cls)
    flat.run(3)
    h = Hierarchy({"north": ("c0", "c3", "c5"), "south": ("c1", "c2", "c4", "c6", "c7")})
    two = _federation(_dataset(SIZES), strategy, engine_cls=engine_cls, hierarchy=h)
    two.run(3)
    torch.testing.assert_close(two.state.params, flat.state.params, rtol=0, atol=1e-6)
    assert all(sorted(r.clients) == [f"c{i}" for i in range(8)] for r in two.history)
    assert two.history[-1].metrics["train_loss"] == pytest.approx(flat.history[-1].metrics["train_loss"], rel=1e-6)


def test_kappa_edge_rounds_by_hand() -> None:
    """Two edges of one client each, full-batch GD (one step per edge round), kappa = 2:
    each edge takes two GD steps on its own data; the root averages the edges' models by examples."""
    ds = _dataset([10, 30], dtype=torch.float64)
    train = TrainConfig(loss="mse", epochs=1, batch_size=64, lr=0.1)
    strategy = FedAvg(train=train, fraction=1.0)
    fed = _federation(ds, strategy, dtype=torch.float64, hierarchy=Hierarchy({"e0": ("c0",), "e1": ("c1",)}, kappa=2))
    w0 = fed.state.params.clone()
    fed.step()

    def gd(w: torch.Tensor, data: Split, steps: int) -> torch.Tensor:
        for _ in range(steps):
            w = w.clone().requires_grad_()
            loss = F.mse_loss(data.x @ w[:3] + w[3], data.y)
            (g,) = torch.autograd.grad(loss, (w,))
            w = (w - 0.1 * g).detach()
        return w

    w_a, w_b = gd(w0, ds.clients["c0"].train, 2), gd(w0, ds.clients["c1"].train, 2)
    torch.testing.assert_close(fed.state.params, (10 * w_a + 30 * w_b) / 40, rtol=0, atol=1e-12)
    assert sorted(fed.history[0].clients) == ["c0", "c1"]


@pytest.mark.parametrize("strategy", [FedMedian(train=TRAIN, fraction=1.0), Krum(train=TRAIN, fraction=1.0, f=0)])
def test_median_and_krum_refuse_to_run_hierarchically(strategy) -> None:
    with pytest.raises(ConfigError, match="cannot run hierarchically: a robust rule needs every client's update"):
        _federation(_dataset(SIZES), strategy, hierarchy=edges_of(2, [f"c{i}" for i in range(8)]))


def test_a_partial_for_the_wrong_round_version_or_roster_is_refused() -> None:
    h = Hierarchy({"e0": ("c0", "c1"), "e1": ("c2",)})
    fed = _federation(_dataset([5, 5, 5]), FedAvg(train=TRAIN, fraction=1.0), hierarchy=h)
    numel = fed.spec.numel

    def part(**kw) -> Partial:
        base = dict(source="e0", round=1, model_version=0, delta_sum=torch.zeros(numel, dtype=torch.float64), weight=5.0, client_ids=("c0",), client_examples=(5,))
        return Partial(**{**base, **kw})

    fed._check_partial(part(), {"e0", "e1"}, 1)
    for p, msg in [
        (part(round=2), "partial is for round 2, not 1"),
        (part(model_version=3), "partial starts from model version 3, not 0"),
        (part(client_ids=("c2",)), "client(s) ['c2'] are not in edge 'e0''s roster"),
        (part(source="e9"), "not an edge of this round"),
    ]:
        with pytest.raises(Exception, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
            fed._check_partial(p, {"e0", "e1"}, 1)


def test_hierarchy_config_edges() -> None:
    h = edges_of(3, [f"c{i}" for i in range(8)])
    assert dict(h.edges) == {"edge-0": ("c0", "c1", "c2"), "edge-1": ("c3", "c4", "c5"), "edge-2": ("c6", "c7")}
    with pytest.raises(ConfigError, match="belong to no edge"):
        edges_of({"a": ["c0"]}, ["c0", "c1"])
    with pytest.raises(ConfigError, match="is in edges 'a' and 'b'"):
        edges_of({"a": ["c0"], "b": ["c0"]}, ["c0"])
    cfg = parse_config(
        {
            "run": {"rounds": 2, "engine": "sequential"},
            "data": {"name": "hospital"},
            "model": {"name": "mlp", "hidden": [8]},
            "strategy": {"name": "fedavg", "fraction": 1.0},
            "hierarchy": {"edges": {"west": ["hospital-A", "hospital-B"], "east": ["hospital-C"]}, "kappa": 2},
        }
    )
    run = build_run(cfg)
    run.federation.run(2)
    assert [r.metrics["edges"] for r in run.federation.history] == [2.0, 2.0]
