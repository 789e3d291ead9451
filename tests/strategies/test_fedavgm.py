"""FedAvgM (Hsu et al. 2019): two rounds of server momentum, checkpointed in between."""

from __future__ import annotations

import pytest
import torch

from fedloom.core.errors import ConfigError, StrategyError
from fedloom.core.types import Aggregate, ClientUpdate
from fedloom.strategies import FedAvg, FedAvgM, ServerState

from _server import Server


def one_round(s: FedAvgM, state: ServerState, *deltas: list[float]) -> ServerState:
    agg = Server(s, state, state.round + 1)
    for i, d in enumerate(deltas):
        agg.add(ClientUpdate(client_id=f"c{i}", round=state.round + 1, delta=torch.tensor(d), num_examples=1))
    return s.apply(state, agg.result())


def test_two_rounds_exact() -> None:
    s = FedAvgM(server_momentum=0.5, server_lr=0.5)
    state = s.init(torch.tensor([0.0, 0.0]))
    assert torch.equal(state.tensors["momentum"], torch.zeros(2))
    # round 1: Δ = mean([0, -4], [2, 0]) = [1, -2]
    # v1 = 0.5*0 + [1, -2] = [1, -2];  x1 = 0 + 0.5*[1, -2] = [0.5, -1]
    state = one_round(s, state, [0.0, -4.0], [2.0, 0.0])
    assert torch.equal(state.tensors["momentum"], torch.tensor([1.0, -2.0]))
    assert torch.equal(state.params, torch.tensor([0.5, -1.0]))
    # checkpoint round trip keeps the momentum
    state = ServerState.from_tensors(state.to_tensors())
    # round 2: Δ = [2, 0.5];  v2 = 0.5*[1, -2] + [2, 0.5] = [2.5, -0.5]
    # x2 = [0.5, -1] + 0.5*[2.5, -0.5] = [1.75, -1.25]
    state = one_round(s, state, [2.0, 0.5])
    assert torch.equal(state.tensors["momentum"], torch.tensor([2.5, -0.5]))
    assert torch.equal(state.params, torch.tensor([1.75, -1.25]))
    assert state.round == 2


def test_zero_momentum_is_fedavg() -> None:
    s, ref = FedAvgM(server_momentum=0.0), FedAvg()
    state, ref_state = s.init(torch.zeros(2)), ref.init(torch.zeros(2))
    for d in ([1.0, 2.0], [-3.0, 0.25]):
        a = Aggregate(delta=torch.tensor(d), num_clients=1, num_examples=1)
        state, ref_state = s.apply(state, a), ref.apply(ref_state, a)
        assert torch.equal(state.params, ref_state.params)


def test_default_and_validation() -> None:
    assert FedAvgM().server_momentum == 0.9
    for bad in (1.0, -0.1, float("nan"), "0.9"):
        with pytest.raises(ConfigError) as ei:
            FedAvgM(server_momentum=bad)  # type: ignore[arg-type]
        assert ei.value.key == "strategy.server_momentum"


def test_state_without_momentum_is_a_clear_error() -> None:
    s = FedAvgM()
    foreign = FedAvg().init(torch.zeros(2))
    with pytest.raises(StrategyError, match="momentum"):
        s.apply(foreign, Aggregate(delta=torch.zeros(2), num_clients=1, num_examples=1))
