"""FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, Algorithm 2): two exact rounds each.

Hyperparameters are picked so that every intermediate value, square roots included, is a
dyadic rational and hence exact in float32.
"""

from __future__ import annotations

import pytest
import torch

from fedloom.core.errors import ConfigError, StrategyError
from fedloom.core.types import ClientUpdate
from fedloom.strategies import FedAdagrad, FedAdam, FedAvg, FedOpt, FedYogi, ServerState

from _server import Server


def one_round(s: FedOpt, state: ServerState, delta: list[float]) -> ServerState:
    agg = Server(s, state, state.round + 1)
    agg.add(ClientUpdate(client_id="c", round=state.round + 1, delta=torch.tensor(delta), num_examples=3))
    return s.apply(state, agg.result())


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v)


def test_fedadagrad_two_rounds() -> None:
    s = FedAdagrad(server_lr=1.0, beta_1=0.5, tau=0.75)
    state = s.init(t(1.0, 2.0, -1.0))
    assert torch.equal(state.tensors["m"], t(0, 0, 0))
    assert torch.equal(state.tensors["v"], t(0.5625, 0.5625, 0.5625))  # v = τ² = 9/16
    # round 1, Δ = [1, -1, 0]:
    #   m = 0.5*0 + 0.5*Δ = [1/2, -1/2, 0];  v = 9/16 + Δ² = [25/16, 25/16, 9/16]
    #   step = m / (√v + τ) = [(1/2)/(5/4 + 3/4), -(1/2)/2, 0] = [1/4, -1/4, 0]
    state = one_round(s, state, [1.0, -1.0, 0.0])
    assert torch.equal(state.params, t(1.25, 1.75, -1.0))
    # round 2, Δ = [3, 3, 0]:
    #   m = 0.5*m + 0.5*Δ = [1/4 + 3/2, -1/4 + 3/2, 0] = [7/4, 5/4, 0]
    #   v = v + 9 = [169/16, 169/16, 9/16]  (√ = 13/4)
    #   step = [ (7/4)/(13/4 + 3/4), (5/4)/4, 0 ] = [7/16, 5/16, 0]
    state = one_round(s, state, [3.0, 3.0, 0.0])
    assert torch.equal(state.tensors["m"], t(1.75, 1.25, 0.0))
    assert torch.equal(state.tensors["v"], t(10.5625, 10.5625, 0.5625))
    assert torch.equal(state.params, t(1.25 + 0.4375, 1.75 + 0.3125, -1.0))  # [1.6875, 2.0625, -1]
    assert state.round == 2


def test_fedadam_two_rounds() -> None:
    s = FedAdam(server_lr=1.0, beta_1=0.25, beta_2=0.875, tau=0.25)
    state = s.init(t(0.0, 0.0, 0.0))
    # v0 = τ² = 1/16
    # round 1, Δ = [5/4, -5/4, 0]:
    #   m = 0.75*Δ = [15/16, -15/16, 0]
    #   v = 7/8 * 1/16 + 1/8 * Δ² = 7/128 + 25/128 = 1/4   (zero coord: 7/128)
    #   step = (15/16) / (1/2 + 1/4) = 5/4
    state = one_round(s, state, [1.25, -1.25, 0.0])
    assert torch.equal(state.tensors["m"], t(0.9375, -0.9375, 0.0))
    assert torch.equal(state.tensors["v"], t(0.25, 0.25, 7 / 128))
    assert torch.equal(state.params, t(1.25, -1.25, 0.0))
    # round 2, Δ = [5/2, 5/2, 0]:
    #   m = 1/4*m + 3/4*Δ = [15/64 + 120/64, -15/64 + 120/64, 0] = [135/64, 105/64, 0]
    #   v = 7/8 * 1/4 + 1/8 * 25/4 = 7/32 + 25/32 = 1   (zero coord: 7/8 * 7/128 = 49/1024)
    #   step = m / (1 + 1/4) = [27/16, 21/16, 0]
    state = one_round(s, state, [2.5, 2.5, 0.0])
    assert torch.equal(state.tensors["m"], t(135 / 64, 105 / 64, 0.0))
    assert torch.equal(state.tensors["v"], t(1.0, 1.0, 49 / 1024))
    assert torch.equal(state.params, t(1.25 + 27 / 16, -1.25 + 21 / 16, 0.0))  # [47/16, 1/16, 0]


def test_fedyogi_two_rounds_both_sign_branches() -> None:
    s = FedYogi(server_lr=1.0, beta_1=0.25, beta_2=0.25, tau=0.25)
    state = s.init(t(0.0, 0.0, 0.0, 0.0))
    # v0 = 1/16 everywhere; 1 - β2 = 3/4
    # round 1, Δ = [2, -2, 0, 1/4]:
    #   coords 0,1: Δ² = 4 > v → v = 1/16 + 3/4*4 = 49/16 (√ = 7/4); m = 3/4*(±2) = ±3/2
    #               step = ±(3/2) / (7/4 + 1/4) = ±3/4
    #   coord 2:    Δ = 0, sign(v - 0) = +1 → v = 1/16 - 0 = 1/16; m = 0; step 0
    #   coord 3:    Δ² = 1/16 = v → sign 0 → v = 1/16; m = 3/16; step = (3/16)/(1/2) = 3/8
    state = one_round(s, state, [2.0, -2.0, 0.0, 0.25])
    assert torch.equal(state.tensors["v"], t(49 / 16, 49 / 16, 1 / 16, 1 / 16))
    assert torch.equal(state.tensors["m"], t(1.5, -1.5, 0.0, 3 / 16))
    assert torch.equal(state.params, t(0.75, -0.75, 0.0, 0.375))
    # round 2, Δ = [3/4, -3/4, 0, 0]:
    #   coords 0,1: Δ² = 9/16 < v → v = 49/16 - 3/4*9/16 = 196/64 - 27/64 = 169/64 (√ = 13/8)
    #               m = 1/4*(±3/2) + 3/4*(±3/4) = ±15/16; step = ±(15/16)/(13/8 + 1/4) = ±1/2
    #   coord 3:    v = 1/16 - 0 = 1/16; m = 1/4*3/16 = 3/64; step = (3/64)/(1/2) = 3/32
    state = one_round(s, state, [0.75, -0.75, 0.0, 0.0])
    assert torch.equal(state.tensors["v"], t(169 / 64, 169 / 64, 1 / 16, 1 / 16))
    assert torch.equal(state.tensors["m"], t(15 / 16, -15 / 16, 0.0, 3 / 64))
    assert torch.equal(state.params, t(1.25, -1.25, 0.0, 0.375 + 3 / 32))


def test_defaults() -> None:
    for cls in (FedAdam, FedYogi):
        s = cls()
        assert (s.beta_1, s.beta_2, s.tau, s.server_lr) == (0.9, 0.99, 1e-3, 1e-2)
    g = FedAdagrad()
    assert (g.beta_1, g.tau, g.server_lr) == (0.9, 1e-3, 1e-2)
    assert not hasattr(g, "beta_2")
    v = FedAdam().init(torch.zeros(3)).tensors["v"]
    assert torch.equal(v, torch.full((3,), 1e-3 * 1e-3))


@pytest.mark.parametrize(
    ("cls", "kw", "key"),
    [
        (FedAdam, {"beta_1": 1.0}, "strategy.beta_1"),
        (FedAdagrad, {"beta_1": -0.5}, "strategy.beta_1"),
        (FedAdam, {"beta_2": 1.0}, "strategy.beta_2"),
        (FedYogi, {"beta_2": float("nan")}, "strategy.beta_2"),
        (FedYogi, {"tau": 0.0}, "strategy.tau"),
        (FedAdagrad, {"tau": -1e-3}, "strategy.tau"),
        (FedAdam, {"server_lr": 0.0}, "strategy.server_lr"),
    ],
)
def test_bad_hyperparameters(cls: type[FedOpt], kw: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        cls(**kw)  # type: ignore[arg-type]
    assert ei.value.key == key


def test_checkpoint_round_trip_resumes_identically() -> None:
    s = FedAdam(server_lr=1.0, beta_1=0.25, beta_2=0.875, tau=0.25)
    state = one_round(s, s.init(t(0.0, 0.0, 0.0)), [1.25, -1.25, 0.0])
    data = state.to_tensors()
    assert set(data) == {"params", "round", "state.m", "state.v"}
    restored = ServerState.from_tensors(data)
    assert restored.round == 1
    assert set(restored.tensors) == {"m", "v"}
    for k in ("m", "v"):
        assert torch.equal(restored.tensors[k], state.tensors[k])
    a = one_round(s, state, [2.5, 2.5, 0.0])
    b = one_round(s, restored, [2.5, 2.5, 0.0])
    assert torch.equal(a.params, b.params) and torch.equal(a.tensors["v"], b.tensors["v"])


def test_foreign_state_is_a_clear_error() -> None:
    s = FedYogi()
    with pytest.raises(StrategyError, match=r"FedYogi\.init\(\)"):
        one_round(s, FedAvg().init(torch.zeros(3)), [1.0, 1.0, 1.0])
