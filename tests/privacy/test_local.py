"""Local DP: each client clips and noises its own update; the same draws alone or in a chunk; its ε."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedloom.core.errors import BudgetExhausted, InvalidUpdateError
from fedloom.core.params import ParamSpec
from fedloom.core.types import Aggregate, ClientUpdate
from fedloom.pipeline import ClientBatch, StageContext
from fedloom.privacy import accountant as acct
from fedloom.privacy.local import LocalDP

SPEC = ParamSpec.from_module(nn.Linear(300, 200))


def _batch(rows: torch.Tensor, seeds: list[int]) -> ClientBatch:
    ups = [ClientUpdate(client_id=f"c{s}", round=1, delta=r, num_examples=4, metrics={"train_loss": 1.0}) for s, r in zip(seeds, rows)]
    return ClientBatch.of(ups, seeds=seeds, states=[{} for _ in ups])


def test_clip_then_gaussian_noise_of_std_sigma_c() -> None:
    ctx = StageContext(SPEC, 1)
    rows = torch.randn(2, SPEC.numel, generator=torch.Generator().manual_seed(0)) * 10
    sigma, c = 0.8, 2.0
    batch = _batch(rows.clone(), [5, 6])
    LocalDP(clip_norm=c, noise_multiplier=sigma).client(batch, ctx)
    out = batch.finish()
    for i, u in enumerate(out):
        clipped = rows[i] * (c / float(rows[i].double().norm()))
        noise = (u.delta - clipped).double()
        n = noise.numel()
        assert abs(float(noise.std()) / (sigma * c) - 1.0) < 6.0 / math.sqrt(2 * n)
        assert u.weight == 1.0 and u.metrics == {}


def test_a_client_draws_the_same_noise_alone_or_in_a_chunk() -> None:
    ctx = StageContext(SPEC, 1)
    rows = torch.randn(3, SPEC.numel, generator=torch.Generator().manual_seed(1))
    st = LocalDP(clip_norm=1.0, noise_multiplier=1.0)
    chunk = _batch(rows.clone(), [10, 11, 12])
    st.client(chunk, ctx)
    for i, seed in enumerate([10, 11, 12]):
        alone = _batch(rows[i : i + 1].clone(), [seed])
        st.client(alone, ctx)
        assert torch.equal(alone.deltas[0], chunk.deltas[i])


def test_os_noise_is_not_reproducible_from_the_seed() -> None:
    ctx = StageContext(SPEC, 1)
    rows = torch.zeros(1, SPEC.numel)
    a, b = _batch(rows.clone(), [3]), _batch(rows.clone(), [3])
    st = LocalDP(noise="os")
    st.client(a, ctx)
    st.client(b, ctx)
    assert not torch.equal(a.deltas, b.deltas)


def test_server_checks_and_uniform_mean() -> None:
    ctx = StageContext(SPEC, 1)
    st = LocalDP(clip_norm=1.0, noise_multiplier=2.0)
    d = torch.zeros(SPEC.numel)
    with pytest.raises(InvalidUpdateError, match="extras"):
        st.server(ClientUpdate("c", 1, d, 3, weight=1.0, extras={"x": torch.zeros(SPEC.numel)}), ctx)
    with pytest.raises(InvalidUpdateError, match="weight"):
        st.server(ClientUpdate("c", 1, d, 3, weight=3.0), ctx)
    assert st.server(ClientUpdate("c", 1, d, 3, weight=1.0, metrics={"train_loss": 1.0}), ctx).metrics == {}
    total = torch.full((SPEC.numel,), 6.0, dtype=torch.float64)
    agg = Aggregate(delta=total, num_clients=3, num_examples=9, weight=3.0, client_ids=("a", "b", "c"))
    out, state, m = st.finalize(agg, ctx, st.init_state(SPEC))
    assert torch.equal(out.delta, torch.full((SPEC.numel,), 2.0))
    assert state.meta["rounds"] == {"a": 1, "b": 1, "c": 1}
    assert m["dp_epsilon"] == m["dp_epsilon_round"] == acct.epsilon(((1.0, 1.0, 1),), 1e-5)  # sensitivity 2C: σ/2


def test_epsilon_composes_over_a_clients_rounds_and_the_budget_stops_the_run() -> None:
    st = LocalDP(clip_norm=1.0, noise_multiplier=8.0, max_epsilon=3.0)
    state = st.init_state(SPEC)
    agg = Aggregate(delta=torch.zeros(SPEC.numel, dtype=torch.float64), num_clients=1, num_examples=3, weight=1.0, client_ids=("a",))
    rounds = 0
    with pytest.raises(BudgetExhausted, match="local ε"):
        while True:
            st.admit(state, rounds + 1)
            _, state, m = st.finalize(agg, StageContext(SPEC, rounds + 1), state)
            rounds += 1
            assert m["dp_epsilon"] == acct.epsilon(((4.0, 1.0, rounds),), 1e-5)
    assert rounds >= 2 and state.meta["rounds"]["a"] == rounds
    assert acct.epsilon(((4.0, 1.0, rounds),), 1e-5) <= 3.0 < acct.epsilon(((4.0, 1.0, rounds + 1),), 1e-5)
