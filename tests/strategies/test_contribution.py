"""Contribution weighting from gradient norms, both modes, against FedAvg."""

from __future__ import annotations

import pytest
import torch

from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.core.types import ClientUpdate, TrainConfig
from fedloom.strategies import ContributionAggregator, ContributionWeighted, FedAvg, Strategy

from _server import Server

F64 = torch.float64


def upd(cid: str, delta: list[float], steps: int = 2, n: int = 10) -> ClientUpdate:
    return ClientUpdate(client_id=cid, round=1, delta=torch.tensor(delta, dtype=F64), num_examples=n, num_steps=steps)


def aggregate(s: Strategy, *updates: ClientUpdate) -> torch.Tensor:
    agg = Server(s, s.init(torch.zeros(2, dtype=F64)), 1)
    for u in updates:
        agg.add(u)
    return agg.result().delta


# Two clients, equal examples and steps; update norms 1 and 3. With lr = 0.5 and 2 steps,
# g_i = -Δ_i / (0.5 * 2) = -Δ_i, so ‖g_a‖² = 1 and ‖g_b‖² = 9.
TRAIN = TrainConfig(lr=0.5)
A, B = upd("a", [1.0, 0.0]), upd("b", [0.0, 3.0])


def test_fedavg_gives_half_half() -> None:
    # 0.5*[1, 0] + 0.5*[0, 3] = [0.5, 1.5]
    assert torch.equal(aggregate(FedAvg(train=TRAIN), A, B), torch.tensor([0.5, 1.5], dtype=F64))


def test_norm_mode_gives_tenth_and_nine_tenths() -> None:
    s = ContributionWeighted(train=TRAIN, mode="norm")
    agg = Server(s, s.init(torch.zeros(2, dtype=F64)), 1)
    assert isinstance(agg.aggregator, ContributionAggregator)
    agg.add(A)
    agg.add(B)
    # weights 1 and 9 → 0.1 and 0.9: (1*[1, 0] + 9*[0, 3]) / 10 = [1, 27] / 10 = [0.1, 2.7]
    assert torch.equal(agg.result().delta, torch.tensor([1 / 10, 27 / 10], dtype=F64))
    assert agg.weights == {"a": 1.0, "b": 9.0}
    assert agg.normalized_weights() == {"a": 0.1, "b": 0.9}


def test_inverse_mode_gives_nine_tenths_and_tenth() -> None:
    s = ContributionWeighted(train=TRAIN, mode="inverse")
    agg = Server(s, s.init(torch.zeros(2, dtype=F64)), 1)
    assert isinstance(agg.aggregator, ContributionAggregator)
    agg.add(A)
    agg.add(B)
    # weights 1 and 1/9 → 0.9 and 0.1: 0.9*[1, 0] + 0.1*[0, 3] = [0.9, 0.3]
    torch.testing.assert_close(agg.result().delta, torch.tensor([0.9, 0.3], dtype=F64), rtol=1e-15, atol=0)
    w = agg.normalized_weights()
    assert w["a"] == pytest.approx(0.9, rel=1e-15) and w["b"] == pytest.approx(0.1, rel=1e-14)


def test_gradient_estimate_divides_by_lr_times_steps() -> None:
    # lr = 1: a = [2, 0] over 2 steps → ‖g‖ = 1; b = [0, 3] over 1 step → ‖g‖ = 3
    # weights 1 and 9: (1*[2, 0] + 9*[0, 3]) / 10 = [2, 27] / 10 = [0.2, 2.7]
    s = ContributionWeighted(train=TrainConfig(lr=1.0), mode="norm")
    got = aggregate(s, upd("a", [2.0, 0.0], steps=2), upd("b", [0.0, 3.0], steps=1))
    assert torch.equal(got, torch.tensor([2 / 10, 27 / 10], dtype=F64))


def test_zero_steps_use_the_delta_itself() -> None:
    s = ContributionWeighted(train=TRAIN, mode="norm")
    got = aggregate(s, upd("a", [1.0, 0.0], steps=0), upd("b", [0.0, 3.0], steps=0))
    assert torch.equal(got, torch.tensor([1 / 10, 27 / 10], dtype=F64))


def test_examples_do_not_matter() -> None:
    s = ContributionWeighted(train=TRAIN, mode="norm")
    got = aggregate(s, upd("a", [1.0, 0.0], n=1), upd("b", [0.0, 3.0], n=1000))
    assert torch.equal(got, torch.tensor([1 / 10, 27 / 10], dtype=F64))


def test_norm_mode_zero_updates() -> None:
    s = ContributionWeighted(train=TRAIN, mode="norm")
    # a zero update has weight 0: the aggregate is b's delta
    assert torch.equal(aggregate(s, upd("a", [0.0, 0.0]), upd("b", [2.0, 2.0])), torch.tensor([2.0, 2.0], dtype=F64))
    # every update zero: the aggregate is zero (not a division by zero)
    assert torch.equal(aggregate(s, upd("a", [0.0, 0.0]), upd("b", [0.0, 0.0])), torch.zeros(2, dtype=F64))


def test_inverse_mode_rejects_zero_update_and_goes_on() -> None:
    s = ContributionWeighted(train=TRAIN, mode="inverse")
    agg = Server(s, s.init(torch.zeros(2, dtype=F64)), 1)
    agg.add(upd("a", [4.0, 0.0]))
    with pytest.raises(InvalidUpdateError) as ei:
        agg.add(upd("lazy", [0.0, 0.0]))
    assert ei.value.client_id == "lazy"
    agg.add(upd("b", [0.0, 4.0]))
    res = agg.result()
    assert res.client_ids == ("a", "b") and res.num_examples == 20
    # equal norms → equal weights: [2, 2]
    assert torch.equal(res.delta, torch.tensor([2.0, 2.0], dtype=F64))


def test_apply_uses_server_lr() -> None:
    s = ContributionWeighted(train=TRAIN, mode="norm", server_lr=0.5)
    state = s.init(torch.tensor([1.0, 1.0], dtype=F64))
    agg = Server(s, state, 1)
    agg.add(upd("a", [0.0, 0.0]))
    agg.add(upd("b", [2.0, -4.0]))
    # aggregate = b's delta (a has weight 0); x = [1, 1] + 0.5*[2, -4] = [2, -1]
    assert torch.equal(s.apply(state, agg.result()).params, torch.tensor([2.0, -1.0], dtype=F64))


@pytest.mark.parametrize("bad", ["norms", "", None, 1])
def test_bad_mode(bad: object) -> None:
    with pytest.raises(ConfigError) as ei:
        ContributionWeighted(mode=bad)  # type: ignore[arg-type]
    assert ei.value.key == "strategy.mode"
