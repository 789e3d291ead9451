"""DP-FedAvg's stage: exact clipping, the server's checks, noise of the right scale, the ledger, adaptive clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedloom.core.errors import BudgetExhausted, ConfigError, InvalidUpdateError
from fedloom.core.params import ParamSpec
from fedloom.core.types import Aggregate, ClientUpdate
from fedloom.pipeline import ClientBatch, StageContext
from fedloom.pipeline.registry import build_stage
from fedloom.privacy import accountant as acct
from fedloom.privacy.central import CLIP_BIT, CentralDP


def _spec(n_in: int = 3, n_out: int = 2) -> ParamSpec:
    m = nn.Linear(n_in, n_out)
    m.bias.requires_grad_(False)  # a frozen entry: clipped updates never move it
    return ParamSpec.from_module(m)


def _batch(rows: torch.Tensor) -> ClientBatch:
    ups = [
        ClientUpdate(client_id=f"c{i}", round=1, delta=r, num_examples=5 + i, metrics={"train_loss": 0.3})
        for i, r in enumerate(rows)
    ]
    return ClientBatch.of(ups, seeds=list(range(len(ups))), states=[{} for _ in ups])


def test_client_half_clips_each_row_to_the_norm_on_trainable_entries_only() -> None:
    spec = _spec()
    ctx = StageContext(spec, 1)
    mask = ctx.trainable
    rows = torch.zeros(3, spec.numel)
    rows[:, mask] = torch.tensor([[0.3, 0.4, 0.0, 0.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 6])
    rows[:, ~mask] = 7.0
    batch = _batch(rows)
    CentralDP(clip_norm=1.0, noise_multiplier=1.0).client(batch, ctx)
    out = batch.finish()
    norms = [float(u.delta[mask].double().norm()) for u in out]
    assert norms == pytest.approx([0.5, 1.0, 0.0], abs=1e-7)
    assert all(n <= 1.0 + 1e-7 for n in norms)
    torch.testing.assert_close(out[1].delta[mask][:2], torch.tensor([0.6, 0.8]))
    assert all(bool((u.delta[~mask] == 0).all()) for u in out)
    assert [u.weight for u in out] == [1.0, 1.0, 1.0]
    assert all(u.metrics == {} for u in out), "training metrics are not noised: they stay on the client"


def test_adaptive_clipping_sends_the_unclipped_bit() -> None:
    spec = _spec()
    ctx = StageContext(spec, 1)
    rows = torch.zeros(2, spec.numel)
    rows[0, 0], rows[1, 0] = 0.5, 3.0
    batch = _batch(rows)
    CentralDP(clip_norm=1.0, noise_multiplier=1.0, target_quantile=0.5, count_stddev=1.0).client(batch, ctx)
    assert [float(u.extras[CLIP_BIT][0]) for u in batch.finish()] == [1.0, 0.0]


def _update(delta: torch.Tensor, **kw) -> ClientUpdate:
    return ClientUpdate(client_id="c", round=1, delta=delta, num_examples=3, weight=kw.pop("weight", 1.0), **kw)


def test_server_half_rejects_what_is_not_a_clipped_update_and_names_why() -> None:
    spec = _spec()
    ctx = StageContext(spec, 1)
    st = CentralDP(clip_norm=1.0, noise_multiplier=1.0)
    ok = torch.zeros(spec.numel)
    ok[0] = 1.0 + 5e-6  # float rounding of a clipped vector: accepted, scaled to exactly C
    assert float(st.server(_update(ok), ctx).delta.norm()) == pytest.approx(1.0, abs=1e-7)
    big = torch.zeros(spec.numel)
    big[0] = 1.1
    cases = {
        "exceeds the clip norm": _update(big),
        "weight 3.0 is not 1": _update(ok, weight=3.0),
        "non-trainable": _update(torch.where(ctx.trainable, 0.0, 1.0)),
        "NaN or Inf": _update(torch.full((spec.numel,), float("nan"))),
        "extras": _update(ok, extras={"control_delta": torch.zeros(spec.numel)}),
        "shape": _update(torch.zeros(spec.numel + 1)),
    }
    for reason, upd in cases.items():
        with pytest.raises(InvalidUpdateError, match=reason):
            st.server(upd, ctx)
    adaptive = CentralDP(clip_norm=1.0, noise_multiplier=1.0, target_quantile=0.5, count_stddev=1.0)
    with pytest.raises(InvalidUpdateError, match="dp_clip_bit"):
        adaptive.server(_update(ok, extras={CLIP_BIT: torch.tensor([0.5])}), ctx)


def test_noise_has_std_sigma_c_and_the_sum_is_divided_by_q_n() -> None:
    spec = ParamSpec.from_module(nn.Linear(400, 500))  # 200,500 trainable entries
    ctx = StageContext(spec, 3)
    sigma, c, q, n_avail = 1.7, 0.4, 0.25, 40
    st = CentralDP(clip_norm=c, noise_multiplier=sigma, sample_rate=q, noise_seed=11)
    agg = Aggregate(delta=torch.zeros(spec.numel, dtype=torch.float64), num_clients=0, num_examples=0, weight=0.0, num_available=n_avail)
    out, state, metrics = st.finalize(agg, ctx, st.init_state(spec))
    noise = out.delta.double() * (q * n_avail)
    n = noise.numel()
    # sample std of n Gaussians: relative standard error 1/sqrt(2n); 6 standard errors
    assert abs(float(noise.std()) / (sigma * c) - 1.0) < 6.0 / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 6.0 * sigma * c / math.sqrt(n)
    assert out.weight is None
    assert state.meta["ledger"] == [[sigma, q, 1]]
    assert metrics["dp_epsilon"] == acct.epsilon(((sigma, q, 1),), 1e-5, "rdp")
    # the same seed and round: the same noise (a resumed run gets the same model)
    again, _, _ = st.finalize(agg, ctx, st.init_state(spec))
    assert torch.equal(again.delta, out.delta)


def test_sum_of_clipped_updates_is_averaged_with_the_fixed_denominator() -> None:
    spec = _spec()
    ctx = StageContext(spec, 1)
    st = CentralDP(clip_norm=1.0, noise_multiplier=1e-9, sample_rate=0.5)
    total = torch.zeros(spec.numel, dtype=torch.float64)
    total[0] = 3.0
    agg = Aggregate(delta=total, num_clients=3, num_examples=9, weight=3.0, num_available=8)
    out, _, _ = st.finalize(agg, ctx, st.init_state(spec))
    assert float(out.delta[0]) == pytest.approx(3.0 / (0.5 * 8), abs=1e-7)  # q·N = 4, not the 3 that came


def test_epsilon_accumulates_over_rounds_and_the_budget_stops_the_next_round() -> None:
    spec = _spec()
    st = CentralDP(clip_norm=1.0, noise_multiplier=1.5, sample_rate=0.05, max_epsilon=1.0)
    state = st.init_state(spec)
    agg = Aggregate(delta=torch.zeros(spec.numel, dtype=torch.float64), num_clients=0, num_examples=0, weight=0.0, num_available=10)
    eps = []
    rnd = 0
    while True:
        rnd += 1
        try:
            st.admit(state, rnd)
        except BudgetExhausted as exc:
            assert "max_epsilon 1" in str(exc) and f"round {rnd}" in str(exc)
            break
        _, state, m = st.finalize(agg, StageContext(spec, rnd), state)
        eps.append(m["dp_epsilon"])
    assert eps == sorted(eps) and eps[-1] <= 1.0 and len(eps) >= 3
    assert eps[-1] == acct.epsilon(((1.5, 0.05, len(eps)),), 1e-5)
    assert acct.epsilon(((1.5, 0.05, len(eps) + 1),), 1e-5) > 1.0


def test_adaptive_clip_norm_moves_geometrically_toward_the_quantile() -> None:
    spec = _spec()
    st = CentralDP(clip_norm=2.0, noise_multiplier=1e-3, sample_rate=1.0, target_quantile=0.5, clip_lr=0.2, count_stddev=1e-3)
    bits = torch.tensor([0.75])  # mean of the bits of 4 clients: 3 unclipped
    agg = Aggregate(
        delta=torch.zeros(spec.numel, dtype=torch.float64), num_clients=4, num_examples=8, weight=4.0,
        num_available=4, extras={CLIP_BIT: bits},
    )  # fmt: skip
    out, state, metrics = st.finalize(agg, StageContext(spec, 1), st.init_state(spec))
    # b~ = (3 - 4/2) / (q N) + 1/2 = 0.75;  C <- 2 exp(-0.2 (0.75 - 0.5))
    assert metrics["dp_unclipped"] == pytest.approx(0.75, abs=1e-2)
    assert state.meta["clip_norm"] == pytest.approx(2.0 * math.exp(-0.05), rel=1e-3)
    assert CLIP_BIT not in out.extras
    nxt = st.for_round(state)
    assert nxt.clip_norm == state.meta["clip_norm"] and nxt.recipe().kwargs["clip_norm"] == state.meta["clip_norm"]
    # the update's noise multiplier leaves room for the count's: sigma^-2 = sigma_u^-2 + (2 sigma_b)^-2
    a = CentralDP(noise_multiplier=1.0, target_quantile=0.5, count_stddev=2.0)
    assert a.update_noise_multiplier ** -2 + (2 * 2.0) ** -2 == pytest.approx(1.0)


def test_recipe_carries_no_noise_seed_and_rebuilds_on_a_client() -> None:
    st = CentralDP(clip_norm=0.7, noise_multiplier=1.3, sample_rate=0.1, noise_seed=1234, target_quantile=0.5, count_stddev=2.0)
    r = st.recipe()
    assert "noise_seed" not in r.kwargs and "noise" not in r.kwargs
    client = build_stage(r)
    assert isinstance(client, CentralDP) and client.clip_norm == 0.7 and client.adaptive


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"delta": 1.0}, "delta"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"accountant": "moments"}, "accountant"),
        ({"target_quantile": 0.5}, "count_stddev"),
        ({"target_quantile": 0.5, "count_stddev": 0.4}, "count_stddev"),
        ({"target_quantile": 1.5, "count_stddev": 1.0}, "target_quantile"),
    ],
)
def test_bad_options_name_the_key(kw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_stage("dp_central", kw)
    assert err.value.key == f"pipeline.{key}"
