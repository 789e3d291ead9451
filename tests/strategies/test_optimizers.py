"""Server optimizers compose with any strategy; strategies are frozen keyword-only dataclasses."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedloom.core.errors import ConfigError
from fedloom.core.types import Aggregate, ClientUpdate, TrainConfig
from fedloom.strategies import (
    SGD,
    Adam,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Krum,
    Momentum,
    Scaffold,
    Yogi,
    build_strategy,
    strategy_params,
)

from _server import Server


def agg(*delta: float, **kw: object) -> Aggregate:
    return Aggregate(delta=torch.tensor(delta), num_clients=1, num_examples=1, **kw)  # type: ignore[arg-type]


def test_sgd_and_momentum_by_hand_inputs_untouched() -> None:
    p, d = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    new, tensors = SGD().step(p, d, {}, lr=0.5)
    assert torch.equal(new, torch.tensor([1.25, 1.5])) and tensors == {}
    opt = Momentum(0.5)
    v0 = torch.tensor([2.0, 0.0])
    new, tensors = opt.step(p, d, {"momentum": v0}, lr=0.5)
    # v = 0.5*[2, 0] + [0.5, -1] = [1.5, -1];  x = [1, 2] + 0.5*[1.5, -1] = [1.75, 1.5]
    assert torch.equal(tensors["momentum"], torch.tensor([1.5, -1.0]))
    assert torch.equal(new, torch.tensor([1.75, 1.5]))
    assert torch.equal(p, torch.tensor([1.0, 2.0])) and torch.equal(v0, torch.tensor([2.0, 0.0]))
    assert set(opt.init(p)) == set(Momentum.state_keys) == {"momentum"}


def test_fedprox_with_server_momentum_by_hand() -> None:
    s = FedProx(mu=0.1, server_lr=0.5, server_optimizer=Momentum(0.5))
    state = s.init(torch.zeros(2))
    assert set(state.tensors) == {"momentum"}
    # as FedAvgM: v1 = [1, -2], x1 = 0.5*[1, -2];  v2 = 0.5*[1, -2] + [2, 0.5] = [2.5, -0.5], x2 = x1 + 0.5*v2
    state = s.apply(s.apply(state, agg(1.0, -2.0)), agg(2.0, 0.5))
    assert torch.equal(state.tensors["momentum"], torch.tensor([2.5, -0.5]))
    assert torch.equal(state.params, torch.tensor([1.75, -1.25]))
    assert s.client_config(state, 3, "a").transforms[0].kwargs == {"mu": 0.1}  # the client side is unchanged


def test_named_adaptive_strategies_are_fedavg_with_that_optimizer() -> None:
    named = FedAdam(server_lr=1.0, beta_1=0.25, beta_2=0.875, tau=0.25)
    composed = FedAvg(server_lr=1.0, server_optimizer=Adam(beta_1=0.25, beta_2=0.875, tau=0.25))
    assert named.server_optimizer == composed.server_optimizer
    a, b = named.init(torch.zeros(3)), composed.init(torch.zeros(3))
    for d in ([1.25, -1.25, 0.0], [2.5, 2.5, 0.0]):
        a, b = named.apply(a, agg(*d)), composed.apply(b, agg(*d))
    # the values of test_fedopt.test_fedadam_two_rounds
    assert torch.equal(a.params, torch.tensor([47 / 16, 1 / 16, 0.0])) and torch.equal(a.params, b.params)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in ("m", "v"))
    assert isinstance(FedYogi().server_optimizer, Yogi)
    assert FedAvgM(server_momentum=0.5).server_optimizer == Momentum(0.5)


def test_krum_and_scaffold_compose_with_an_optimizer() -> None:
    k = Krum(f=0, server_optimizer=Momentum(0.5))
    assert set(k.init(torch.zeros(2)).tensors) == {"momentum"}
    s = Scaffold(num_clients=2, server_optimizer=Momentum(0.5))
    state = s.init(torch.zeros(2))
    assert set(state.tensors) == {"control", "momentum"}
    state = s.apply(state, agg(1.0, -2.0, extras={"control_delta": torch.tensor([2.0, 4.0])}))
    # x = 0 + 1 * (0.5*0 + [1, -2]);  c = 0 + (1/2) * [2, 4] = [1, 2]
    assert torch.equal(state.params, torch.tensor([1.0, -2.0]))
    assert torch.equal(state.tensors["momentum"], torch.tensor([1.0, -2.0]))
    assert torch.equal(state.tensors["control"], torch.tensor([1.0, 2.0]))


def test_strategies_are_frozen_values() -> None:
    s = FedAdam(tau=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tau = 0.1  # type: ignore[misc]
    assert FedAvg(fraction=0.5) == FedAvg(fraction=0.5) and hash(FedAvg()) == hash(FedAvg())
    t = dataclasses.replace(s, tau=0.25)  # the derived optimizer follows its fields
    assert t.server_optimizer == Adam(tau=0.25) and s.server_optimizer == Adam(tau=0.5)
    with pytest.raises(TypeError):
        FedAdam(server_optimizer=Yogi())  # type: ignore[call-arg]  # FedAdam's optimizer is its own
    with pytest.raises(TypeError):
        FedAvg(0.5)  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: FedAvg(server_optimizer="adam"), "strategy.server_optimizer"),
        (lambda: FedAvg(train={"lr": 0.1}), "strategy.train"),
        (lambda: FedAvg(server_optimizer=Momentum(1.0)), "strategy.server_momentum"),
        (lambda: FedAvg(server_optimizer=Yogi(tau=0.0)), "strategy.tau"),
        (lambda: FedAvg(server_optimizer=Adam(beta_2=-0.5)), "strategy.beta_2"),
    ],
)
def test_bad_composition_names_the_key(build: object, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        build()  # type: ignore[operator]
    assert ei.value.key == key


def test_server_optimizer_is_not_a_config_parameter() -> None:
    assert "server_optimizer" not in strategy_params("fedavg")
    assert "server_optimizer" not in strategy_params("fedadam")
    assert set(strategy_params("fedadam")) == {"server_lr", "weighted", "beta_1", "beta_2", "tau"}
    assert strategy_params("fedadam")["server_lr"].default == 1e-2
    with pytest.raises(ConfigError) as ei:
        build_strategy("fedavg", train=TrainConfig(), server_optimizer=SGD())
    assert ei.value.key == "strategy.server_optimizer"


def test_unweighted_fedadam_through_the_aggregator() -> None:
    s = FedAdam(weighted=False, server_lr=1.0, beta_1=0.25, beta_2=0.875, tau=0.25)
    state = s.init(torch.zeros(1))
    a = Server(s, state, 1)
    a.add(ClientUpdate(client_id="a", round=1, delta=torch.tensor([0.5]), num_examples=1))
    a.add(ClientUpdate(client_id="b", round=1, delta=torch.tensor([2.0]), num_examples=7))
    # Δ = (0.5 + 2) / 2 = 5/4 unweighted; as round 1 of test_fedadam_two_rounds: x = 5/4
    assert torch.equal(s.apply(state, a.result()).params, torch.tensor([1.25]))
