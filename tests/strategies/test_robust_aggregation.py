"""Median, trimmed mean (Yin et al. 2018), Krum and Multi-Krum (Blanchard et al. 2017)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedloom.core.errors import ConfigError, StrategyError
from fedloom.core.types import ClientUpdate
from fedloom.strategies import FedMedian, FedTrimmedMean, Krum, KrumAggregator, MultiKrum, Strategy

from _server import Server


def upd(cid: str, delta: list[float], n: int = 1) -> ClientUpdate:
    return ClientUpdate(client_id=cid, round=1, delta=torch.tensor(delta, dtype=torch.float32), num_examples=n)


def aggregate(s: Strategy, updates: list[ClientUpdate], numel: int = 3) -> torch.Tensor:
    agg = Server(s, s.init(torch.zeros(numel)), 1)
    for u in updates:
        agg.add(u)
    return agg.result().delta


def test_median_odd_and_even() -> None:
    ups = [upd("a", [1, 5, -2], n=100), upd("b", [3, -1, 0]), upd("c", [100, 2, 4])]
    # per coordinate: {1, 3, 100} → 3; {-1, 2, 5} → 2; {-2, 0, 4} → 0 (example counts ignored)
    assert torch.equal(aggregate(FedMedian(), ups), torch.tensor([3.0, 2.0, 0.0]))
    ups.append(upd("d", [-7, 8, 1]))
    # {-7, 1, 3, 100} → (1+3)/2 = 2; {-1, 2, 5, 8} → 3.5; {-2, 0, 1, 4} → 0.5
    assert torch.equal(aggregate(FedMedian(), ups), torch.tensor([2.0, 3.5, 0.5]))


def test_median_server_step() -> None:
    s = FedMedian(server_lr=0.5)
    state = s.init(torch.tensor([1.0, 1.0, 1.0]))
    agg = Server(s, state, 1)
    for u in [upd("a", [1, 5, -2]), upd("b", [3, -1, 0]), upd("c", [100, 2, 4])]:
        agg.add(u)
    # x = [1, 1, 1] + 0.5 * [3, 2, 0] = [2.5, 2, 1]
    assert torch.equal(s.apply(state, agg.result()).params, torch.tensor([2.5, 2.0, 1.0]))


def test_trimmed_mean() -> None:
    ups = [upd("a", [1, -50]), upd("b", [2, 0]), upd("c", [3, 1]), upd("d", [4, 2]), upd("e", [100, 3])]
    # beta = 0.2, n = 5 → trim floor(1.0) = 1 per end
    # coord 0: {1, 2, 3, 4, 100} → mean(2, 3, 4) = 3;  coord 1: {-50, 0, 1, 2, 3} → mean(0, 1, 2) = 1
    assert torch.equal(aggregate(FedTrimmedMean(beta=0.2), ups, 2), torch.tensor([3.0, 1.0]))
    # beta = 0.4 → trim 2 per end → the middle value: [3, 1]
    assert torch.equal(aggregate(FedTrimmedMean(beta=0.4), ups, 2), torch.tensor([3.0, 1.0]))
    # beta = 0 → plain mean: [110/5, -44/5] = [22, -8.8]
    torch.testing.assert_close(aggregate(FedTrimmedMean(beta=0.0), ups, 2), torch.tensor([22.0, -8.8]))


def test_trimmed_mean_too_few_clients() -> None:
    ups = [upd("a", [1.0]), upd("b", [2.0]), upd("c", [3.0])]
    with pytest.raises(StrategyError, match="at least 4"):  # floor(0.25 * 3) = 0
        aggregate(FedTrimmedMean(beta=0.25), ups, 1)


# Five honest clients around [0.5, 0.5] and two colluding Byzantine ones far away; f = 2, n = 7.
HONEST = {"h1": [0.0, 0.0], "h2": [1.0, 0.0], "h3": [0.0, 1.0], "h4": [0.5, 0.5], "h5": [1.0, 1.0]}
BYZANTINE = {"z1": [10.0, 10.0], "z2": [10.0, 10.5]}


def krum_agg(m: int | None, order: list[str]) -> KrumAggregator:
    s = Krum(f=2) if m == 1 else MultiKrum(f=2, m=m)
    agg = Server(s, s.init(torch.zeros(2)), 1)
    assert isinstance(agg.aggregator, KrumAggregator)
    every = {**HONEST, **BYZANTINE}
    for cid in order:
        agg.add(upd(cid, every[cid], n=1000 if cid.startswith("z") else 1))
    return agg


def test_krum_picks_the_central_honest_client() -> None:
    agg = krum_agg(1, ["z1", "h1", "h2", "z2", "h3", "h4", "h5"])
    # n - f - 2 = 3 nearest; squared distances from h4 to every other honest one are 0.5
    # score(h4) = 0.5*3 = 1.5; score(h1) = 0.5 + 1 + 1 = 2.5 (likewise h2, h3, h5)
    # score(z1) = 0.25 + 162 + 180.5 (z2, h5 = 9² + 9², h4 = 9.5² + 9.5²) ≫ all honest ones
    assert torch.equal(agg.result().delta, torch.tensor([0.5, 0.5]))
    assert agg.selected == ("h4",)
    assert agg.scores["h4"] == 1.5 and agg.scores["h1"] == 2.5
    assert agg.scores["z1"] == 0.25 + 162.0 + 180.5


def test_multikrum_averages_the_honest_ones() -> None:
    agg = krum_agg(None, ["z1", "h1", "h2", "z2", "h3", "h4", "h5"])
    # m = n - f = 5: exactly the honest ones, mean = [2.5, 2.5] / 5 = [0.5, 0.5]
    assert torch.equal(agg.result().delta, torch.tensor([0.5, 0.5]))
    # best first, ties (2.5) broken by client id
    assert agg.selected == ("h4", "h1", "h2", "h3", "h5")


def test_multikrum_independent_of_arrival_order() -> None:
    ids = list(HONEST) + list(BYZANTINE)
    for perm in itertools.islice(itertools.permutations(ids), 0, 5040, 397):
        agg = krum_agg(3, list(perm))
        # m = 3: h4 then h1, h2 (ties broken by id): ([0.5, 0.5] + [0, 0] + [1, 0]) / 3 = [0.5, 1/6]
        torch.testing.assert_close(agg.result().delta, torch.tensor([0.5, 1 / 6]))
        assert agg.selected == ("h4", "h1", "h2")


def test_krum_needs_more_than_2f_plus_2() -> None:
    s = Krum(f=1)
    with pytest.raises(StrategyError, match=r"more than 2f\+2=4"):
        aggregate(s, [upd(c, [float(i)]) for i, c in enumerate("abcd")], 1)
    aggregate(s, [upd(c, [float(i)]) for i, c in enumerate("abcde")], 1)  # n = 5 is enough


def test_multikrum_m_at_most_n_minus_f() -> None:
    with pytest.raises(StrategyError, match="at most n-f=4"):
        aggregate(MultiKrum(f=1, m=5), [upd(c, [float(i)]) for i, c in enumerate("abcde")], 1)


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: FedTrimmedMean(beta=0.5), "strategy.beta"),
        (lambda: FedTrimmedMean(beta=-0.1), "strategy.beta"),
        (lambda: FedTrimmedMean(beta="0.1"), "strategy.beta"),  # type: ignore[arg-type]
        (lambda: Krum(f=-1), "strategy.f"),
        (lambda: Krum(f=1.5), "strategy.f"),  # type: ignore[arg-type]
        (lambda: Krum(f=True), "strategy.f"),
        (lambda: MultiKrum(f=1, m=0), "strategy.m"),
        (lambda: FedMedian(server_lr=-1.0), "strategy.server_lr"),
    ],
)
def test_bad_hyperparameters(make: object, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        make()  # type: ignore[operator]
    assert ei.value.key == key


def test_trimmed_mean_refuses_a_beta_that_could_trim_everything() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.beta: .*keeps no value"):
        FedTrimmedMean(beta=0.49999999995)
    FedTrimmedMean(beta=0.49999)  # the largest allowed keeps a value for every cohort size
    # the aggregator guards the result too: floor(0.49999999995 * 10 + 1e-9) = 5 of 10 per end
    from fedloom.strategies.robust import TrimmedMeanAggregator

    agg = TrimmedMeanAggregator(0.49999999995)
    for i in range(10):
        agg.add(upd(f"c{i}", [float(i)]))
    with pytest.raises(StrategyError, match="none is left"):
        agg.result()


def test_centered_clipping_by_hand() -> None:
    from fedloom.strategies import CenteredClip

    # no bucketing, one iteration, center 0, tau = 1:
    # a = [3, 4] (norm 5) -> clipped to [0.6, 0.8]; b = [0.5, 0] passes; c = [0, -0.2] passes
    # v = 0 + mean([0.6, 0.8], [0.5, 0], [0, -0.2]) = [1.1/3, 0.6/3]
    ups = [upd("a", [3, 4]), upd("b", [0.5, 0]), upd("c", [0, -0.2])]
    s = CenteredClip(tau=1.0, iterations=1, bucket=1)
    torch.testing.assert_close(aggregate(s, ups, 2), torch.tensor([1.1 / 3, 0.6 / 3]))
    # a second iteration re-centres: from v1, a's difference is clipped again to length 1
    v1 = torch.tensor([1.1 / 3, 0.6 / 3], dtype=torch.float64)
    diffs = torch.tensor([[3.0, 4.0], [0.5, 0.0], [0.0, -0.2]], dtype=torch.float64) - v1
    norms = diffs.norm(dim=1, keepdim=True)
    v2 = v1 + (diffs * torch.clamp(1.0 / norms, max=1.0)).mean(dim=0)
    torch.testing.assert_close(aggregate(CenteredClip(tau=1.0, iterations=2, bucket=1), ups, 2), v2.float())
    # with a radius above every distance it is the plain mean
    torch.testing.assert_close(aggregate(CenteredClip(tau=100.0, iterations=1, bucket=1), ups, 2), torch.tensor([3.5 / 3, 3.8 / 3]))


def test_centered_clipping_buckets_and_centre_state() -> None:
    from fedloom.strategies import CenteredClip

    # buckets of 2 over 4 identical-but-one updates: with tau large the result is still the plain mean
    ups = [upd(c, [float(i), 1.0]) for i, c in enumerate("abcd")]
    s = CenteredClip(tau=1e6, iterations=1, bucket=2, seed=1)
    torch.testing.assert_close(aggregate(s, ups, 2), torch.tensor([1.5, 1.0]))
    # the result does not depend on arrival order (buckets are drawn from the sorted ids)
    s2 = CenteredClip(tau=0.5, iterations=2, bucket=2, seed=1)
    assert torch.equal(aggregate(s2, ups, 2), aggregate(s2, list(reversed(ups)), 2))
    # the centre is the previous aggregate, kept in the server state
    state = s2.init(torch.zeros(2))
    assert torch.equal(state.tensors["cclip_center"], torch.zeros(2))
    agg = Server(s2, state, 1)
    for u in ups:
        agg.add(u)
    res = agg.result()
    new = s2.apply(state, res)
    assert torch.equal(new.tensors["cclip_center"], res.delta) and torch.equal(new.params, res.delta)
    with pytest.raises(ConfigError, match="strategy.tau"):
        CenteredClip(tau=0.0)
    with pytest.raises(ConfigError, match="strategy.bucket"):
        CenteredClip(tau=1.0, bucket=0)
