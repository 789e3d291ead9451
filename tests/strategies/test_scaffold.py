"""SCAFFOLD (Karimireddy et al. 2020, option II): control variate update and persistence."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedloom.core.errors import ConfigError, InvalidUpdateError, StrategyError
from fedloom.core.types import Aggregate, ClientUpdate, TrainConfig
from fedloom.strategies import Scaffold, ServerState

from _server import Server


def upd(cid: str, dy: list[float], dc: list[float], n: int = 1) -> ClientUpdate:
    return ClientUpdate(
        client_id=cid,
        round=1,
        delta=torch.tensor(dy, dtype=torch.float32),
        num_examples=n,
        extras={"control_delta": torch.tensor(dc, dtype=torch.float32)},
    )


def run_round(s: Scaffold, state: ServerState, available: list[str], updates: list[ClientUpdate]) -> ServerState:
    rnd = state.round + 1
    s.select(rnd, available)
    agg = Server(s, state, rnd)
    for u in updates:
        agg.add(u)
    # as the round loop does: N = the number of distinct available clients
    return s.apply(state, replace(agg.result(), num_available=len(set(available))))


def test_two_rounds_control_variate_persists_and_accumulates() -> None:
    s = Scaffold(fraction=0.5, train=TrainConfig(lr=0.1))
    state = s.init(torch.tensor([0.0, 0.0]))
    assert torch.equal(state.tensors["control"], torch.zeros(2))
    instr = s.client_config(state, 1, "a")
    assert [t.name for t in instr.transforms] == ["scaffold"] and instr.train.lr == 0.1
    assert torch.equal(instr.payload["server_control"], torch.zeros(2))

    # round 1: N = 4 available, S = 2 reported (different example counts: ignored, unweighted)
    #   x1 = [0, 0] + 1 * ([1, 2] + [3, -2]) / 2 = [2, 0]
    #   c1 = [0, 0] + (2/4) * ([2, -4] + [-1, 1]) / 2 = 0.5 * [0.5, -1.5] = [0.25, -0.75]
    state = run_round(s, state, ["a", "b", "c", "d"], [upd("a", [1, 2], [2, -4], n=1), upd("b", [3, -2], [-1, 1], n=3)])
    assert not hasattr(s, "num_available")  # N travels with the aggregate, not on the strategy
    assert torch.equal(state.params, torch.tensor([2.0, 0.0]))
    assert torch.equal(state.tensors["control"], torch.tensor([0.25, -0.75]))
    assert torch.equal(s.client_config(state, 2, "c").payload["server_control"], torch.tensor([0.25, -0.75]))

    # checkpoint, then round 2 with an elastic population: N = 8 available now, S = 2
    state = ServerState.from_tensors(state.to_tensors())
    #   x2 = [2, 0] + ([-1, 1] + [1, 1]) / 2 = [2, 1]
    #   c2 = [0.25, -0.75] + (2/8) * ([1, 1] + [3, -1]) / 2 = [0.25, -0.75] + 0.25 * [2, 0] = [0.75, -0.75]
    state = run_round(s, state, [f"k{i}" for i in range(8)], [upd("k1", [-1, 1], [1, 1]), upd("k5", [1, 1], [3, -1])])
    assert torch.equal(state.params, torch.tensor([2.0, 1.0]))
    assert torch.equal(state.tensors["control"], torch.tensor([0.75, -0.75]))
    assert state.round == 2


def test_weighted_and_server_lr() -> None:
    s = Scaffold(weighted=True, server_lr=0.5, num_clients=2)
    state = s.init(torch.zeros(2))
    agg = Server(s, state, 1)
    agg.add(upd("a", [1, 2], [2, -4], n=1))
    agg.add(upd("b", [3, -2], [-1, 1], n=3))
    new = s.apply(state, agg.result())
    # Δx = (1*[1, 2] + 3*[3, -2]) / 4 = [10, -4] / 4 = [2.5, -1];  x = 0.5 * [2.5, -1] = [1.25, -0.5]
    # control stays unweighted: c = (2/2) * [0.5, -1.5]
    assert torch.equal(new.params, torch.tensor([1.25, -0.5]))
    assert torch.equal(new.tensors["control"], torch.tensor([0.5, -1.5]))


def test_fixed_num_clients_overrides_num_available() -> None:
    s = Scaffold(num_clients=10, fraction=1.0)
    state = s.init(torch.zeros(2))
    agg = Aggregate(
        delta=torch.zeros(2), num_clients=2, num_examples=2, extras={"control_delta": torch.tensor([5.0, -10.0])},
        num_available=2,
    )  # fmt: skip
    # c = 0 + (2/10) * [5, -10] = [1, -2]  (N = 10, not the 2 available)
    assert torch.equal(s.apply(state, agg).tensors["control"], torch.tensor([1.0, -2.0]))


def test_unknown_population_is_an_error() -> None:
    s = Scaffold()
    state = s.init(torch.zeros(2))
    agg = Aggregate(delta=torch.zeros(2), num_clients=1, num_examples=1, extras={"control_delta": torch.zeros(2)})
    with pytest.raises(StrategyError, match="num_available"):
        s.apply(state, agg)
    s2 = Scaffold(num_clients=1)
    with pytest.raises(StrategyError, match="N=1"):
        s2.apply(state, Aggregate(delta=torch.zeros(2), num_clients=2, num_examples=2, extras=dict(agg.extras)))


def test_update_without_control_delta_is_rejected() -> None:
    s = Scaffold()
    agg = Server(s, s.init(torch.zeros(2)), 1)
    bare = ClientUpdate(client_id="x", round=1, delta=torch.zeros(2), num_examples=1)
    with pytest.raises(InvalidUpdateError) as ei:
        agg.add(bare)
    assert ei.value.client_id == "x"
    assert agg.client_ids == []  # nothing was recorded


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_num_clients(bad: object) -> None:
    with pytest.raises(ConfigError) as ei:
        Scaffold(num_clients=bad)  # type: ignore[arg-type]
    assert ei.value.key == "strategy.num_clients"


def test_scaffold_refuses_adam_local_steps() -> None:
    from fedloom.core.errors import ConfigError

    with pytest.raises(ConfigError, match="client.optimizer: SCAFFOLD's control variates assume SGD"):
        Scaffold(train=TrainConfig(optimizer="adam", lr=1e-3))
