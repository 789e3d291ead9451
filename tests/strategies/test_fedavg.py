"""FedAvg (McMahan et al. 2017): hand-computed weighted and unweighted rounds."""

from __future__ import annotations

import pytest
import torch

from fedloom.core.errors import ConfigError, StrategyError
from fedloom.core.types import ClientUpdate
from fedloom.strategies import FedAvg

from _server import Server


def upd(cid: str, delta: list[float], n: int = 1, **kw: object) -> ClientUpdate:
    return ClientUpdate(client_id=cid, round=1, delta=torch.tensor(delta), num_examples=n, **kw)  # type: ignore[arg-type]


def test_weighted_round_exact() -> None:
    s = FedAvg(server_lr=0.5)
    state = s.init(torch.tensor([1.0, 2.0]))
    agg = Server(s, state, 1)
    agg.add(upd("a", [1.0, 0.0], n=1, metrics={"loss": 1.0}))
    agg.add(upd("b", [-1.0, 4.0], n=3, metrics={"loss": 2.0}))
    res = agg.result()
    # (1*[1, 0] + 3*[-1, 4]) / 4 = [-2, 12] / 4 = [-0.5, 3]
    assert torch.equal(res.delta, torch.tensor([-0.5, 3.0]))
    assert res.num_clients == 2 and res.num_examples == 4 and res.client_ids == ("a", "b")
    assert res.metrics["loss"] == 1.75  # (1*1 + 3*2) / 4
    new = s.apply(state, res)
    # x = [1, 2] + 0.5 * [-0.5, 3] = [0.75, 3.5]
    assert torch.equal(new.params, torch.tensor([0.75, 3.5]))
    assert new.round == 1 and new.tensors == {}
    assert torch.equal(state.params, torch.tensor([1.0, 2.0]))  # the old state is untouched


def test_unweighted_round_exact() -> None:
    s = FedAvg(weighted=False)
    state = s.init(torch.tensor([1.0, 2.0]))
    agg = Server(s, state, 1)
    agg.add(upd("a", [1.0, 0.0], n=1))
    agg.add(upd("b", [-1.0, 4.0], n=3))
    # ([1, 0] + [-1, 4]) / 2 = [0, 2]; x = [1, 2] + [0, 2] = [1, 4]
    assert torch.equal(s.apply(state, agg.result()).params, torch.tensor([1.0, 4.0]))


def test_init_copies_params() -> None:
    p = torch.tensor([1.0, 2.0])
    state = FedAvg().init(p)
    p.add_(1.0)
    assert torch.equal(state.params, torch.tensor([1.0, 2.0]))


def test_duplicate_and_empty_rejected() -> None:
    s = FedAvg()
    agg = Server(s, s.init(torch.zeros(2)), 1)
    with pytest.raises(StrategyError, match="no updates"):
        agg.result()
    agg.add(upd("a", [1.0, 0.0]))
    with pytest.raises(StrategyError, match="duplicate"):
        agg.add(upd("a", [2.0, 0.0]))
    assert torch.equal(agg.result().delta, torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), "1", True])
def test_bad_server_lr(bad: object) -> None:
    with pytest.raises(ConfigError) as ei:
        FedAvg(server_lr=bad)  # type: ignore[arg-type]
    assert ei.value.key == "strategy.server_lr"


def test_bad_weighted() -> None:
    with pytest.raises(ConfigError) as ei:
        FedAvg(weighted="yes")  # type: ignore[arg-type]
    assert ei.value.key == "strategy.weighted"
