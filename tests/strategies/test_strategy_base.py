"""The streaming sum with the weighting stage (FedAvg's weighted mean), the base Aggregator's bookkeeping, ServerState."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.core.types import Aggregate, ClientUpdate
from fedloom.strategies import FedAdam, FedAvg, ServerState, SumAggregator

from _server import Server

_SETTINGS = settings(max_examples=60, deadline=None)


def _random_updates(seed: int, n: int, numel: int, dtype: torch.dtype) -> tuple[list[ClientUpdate], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    deltas = torch.randn(n, numel, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 4, (n, 1), generator=g)
    counts = torch.randint(1, 1000, (n,), generator=g)
    ups = [
        ClientUpdate(client_id=f"c{i}", round=1, delta=deltas[i].to(dtype), num_examples=int(counts[i]))
        for i in range(n)
    ]
    return ups, counts.to(torch.float64)


@_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 9), numel=st.integers(1, 300))
def test_streaming_equals_batch_weighted_mean(seed: int, n: int, numel: int) -> None:
    ups, w = _random_updates(seed, n, numel, torch.float32)
    agg = Server(FedAvg(), FedAvg().init(torch.zeros(numel)))
    for u in ups:
        agg.add(u)
    got = agg.result().delta
    batch = torch.stack([u.delta for u in ups])  # (n, numel)
    expected = (w[:, None] * batch.to(torch.float64)).sum(0) / w.sum()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.to(torch.float32), rtol=1e-6, atol=1e-6 * float(batch.abs().max()))


@_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 6), numel=st.integers(1, 200))
def test_independent_of_arrival_order(seed: int, n: int, numel: int) -> None:
    ups, w = _random_updates(seed, n, numel, torch.float64)
    # Relative to the magnitude being summed, Σ w_i |Δ_i| / Σ w_i (the result itself may cancel to ~0).
    scale = (w[:, None] * torch.stack([u.delta for u in ups]).abs()).sum(0) / w.sum()
    g = torch.Generator().manual_seed(seed)
    results = []
    for _ in range(8):
        agg = Server(FedAvg(), FedAvg().init(torch.zeros(numel, dtype=torch.float64)))
        for i in torch.randperm(n, generator=g).tolist():
            agg.add(ups[i])
        results.append(agg.result().delta)
    for r in results[1:]:
        assert bool(((r - results[0]).abs() <= 1e-12 * scale).all())


def test_plain_sum_of_weighted_deltas() -> None:
    # deltas arrive weighted (2 * [1, 0.5] with weight 2, 4 * [0.25, -1] with weight 4)
    agg = SumAggregator()
    agg.add(ClientUpdate(client_id="a", round=1, delta=torch.tensor([2.0, 1.0]), num_examples=1, weight=2.0))
    agg.add(ClientUpdate(client_id="b", round=1, delta=torch.tensor([1.0, -4.0]), num_examples=2, weight=4.0))
    # 2*[1, 0.5] + 4*[0.25, -1] = [3, -3], total weight 6
    res = agg.result()
    assert torch.equal(res.delta, torch.tensor([3.0, -3.0], dtype=torch.float64)) and res.weight == 6.0


def test_extras_are_unweighted_means_and_inputs_untouched() -> None:
    e1, e2 = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0, -2.0], dtype=torch.float64)
    agg = Server(FedAvg(), FedAvg().init(torch.zeros(2)))
    agg.add(ClientUpdate(client_id="a", round=1, delta=torch.zeros(2), num_examples=1, extras={"c": e1}))
    agg.add(ClientUpdate(client_id="b", round=1, delta=torch.zeros(2), num_examples=9, extras={"c": e2}))
    res = agg.result()
    assert torch.equal(res.extras["c"], torch.tensor([2.0, 0.0]))  # ([1, 2] + [3, -2]) / 2
    assert torch.equal(e1, torch.tensor([1.0, 2.0], dtype=torch.float64))  # the accumulator did not alias it


def test_server_state_round_trip_with_optimizer_state() -> None:
    s = FedAdam(server_lr=0.5)
    state = s.init(torch.tensor([1.0, -2.0, 0.5]))
    state = s.apply(state, Aggregate(delta=torch.tensor([0.5, 0.25, -1.0]), num_clients=1, num_examples=1))
    data = state.to_tensors()
    assert set(data) == {"params", "round", "state.m", "state.v"}
    assert data["round"].dtype == torch.int64 and int(data["round"]) == 1
    back = ServerState.from_tensors(data)
    assert back.round == 1 and torch.equal(back.params, state.params)
    assert set(back.tensors) == {"m", "v"}
    assert all(torch.equal(back.tensors[k], state.tensors[k]) for k in ("m", "v"))
