"""FedProx (Li et al. 2020): the strategy only configures the proximal term."""

from __future__ import annotations

import pytest
import torch

from fedloom.core.errors import ConfigError
from fedloom.core.types import ClientUpdate, TrainConfig
from fedloom.core.types import ComponentSpec
from fedloom.strategies import FedAvg, FedProx

from _server import Server


def test_client_config_sets_mu_and_keeps_the_rest() -> None:
    train = TrainConfig(lr=0.05, epochs=2, batch_size=32)
    s = FedProx(train=train, mu=0.1, seed=7)
    state = s.init(torch.zeros(3))
    instr = s.client_config(state, 4, "hospital-2")
    assert instr.transforms == (ComponentSpec.of("proximal", mu=0.1),)
    assert instr.train == train  # the local-training settings are the strategy's, untouched
    assert (instr.round, instr.client_id) == (4, "hospital-2")
    # same per-client seed as FedAvg with the same run seed; the caller's config is not mutated
    assert instr.seed == FedAvg(train=train, seed=7).client_config(state, 4, "hospital-2").seed
    assert FedAvg(train=train).client_config(state, 4, "hospital-2").transforms == ()


def test_default_mu() -> None:
    s = FedProx()
    assert s.mu == 0.01
    assert s.client_config(s.init(torch.zeros(1)), 1, "a").transforms == (ComponentSpec.of("proximal", mu=0.01),)


def test_aggregation_is_fedavg() -> None:
    s = FedProx(mu=1.0)
    state = s.init(torch.tensor([1.0, 1.0]))
    agg = Server(s, state, 1)
    agg.add(ClientUpdate(client_id="a", round=1, delta=torch.tensor([4.0, 0.0]), num_examples=1))
    agg.add(ClientUpdate(client_id="b", round=1, delta=torch.tensor([0.0, 8.0]), num_examples=3))
    # (1*[4, 0] + 3*[0, 8]) / 4 = [1, 6];  x = [1, 1] + [1, 6] = [2, 7]
    assert torch.equal(s.apply(state, agg.result()).params, torch.tensor([2.0, 7.0]))


@pytest.mark.parametrize("bad", [0.0, -0.01, float("inf"), "0.1", None])
def test_bad_mu(bad: object) -> None:
    with pytest.raises(ConfigError) as ei:
        FedProx(mu=bad)  # type: ignore[arg-type]
    assert ei.value.key == "strategy.mu"
