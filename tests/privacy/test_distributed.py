"""Distributed DP: the Skellam bound by hand, the integer encoding, the noise under SecAgg, runs, refusals."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from fedloom.core.config import parse_config
from fedloom.core.errors import ConfigError
from fedloom.core.types import ClientInstruction, ClientUpdate, Payload, TrainConfig
from fedloom.privacy import accountant as acct
from fedloom.run import build_run
from fedloom.secure.encoding import SkellamPlan, plan_from_meta, rounded_norm_bound
from fedloom.secure.host import ProtocolClients
from fedloom.secure.secagg import SecAggConfig


# ----------------------------------------------------------------- the accountant
def test_skellam_rdp_by_hand() -> None:
    # α = 2, μ = 100, Δ2 = 10, Δ1 = 100: 2·100/200 + min((3·100 + 600)/(4·10^4), 3·100/200) = 1 + 0.0225
    assert acct.skellam_rdp(2, 100.0, 100.0, 10.0) == pytest.approx(1.0225, rel=1e-15)
    # a small variance takes the other branch: α = 3, μ = 2, Δ2 = 1, Δ1 = 1: 3/4 + min((5 + 6)/16, 3/4) = 1.4375 (11/16 < 3/4)
    assert acct.skellam_rdp(3, 2.0, 1.0, 1.0) == pytest.approx(0.75 + 11 / 16, rel=1e-15)
    assert acct.skellam_rdp(3, 0.5, 1.0, 1.0) == pytest.approx(3.0 + 3.0, rel=1e-15)  # min(8 + ..., 3)
    with pytest.raises(ValueError, match="integer orders"):
        acct.skellam_rdp(1, 1.0, 1.0, 1.0)


def test_skellam_epsilon_composes_rdp_and_converts_with_dp_accounting() -> None:
    from dp_accounting.rdp import rdp_privacy_accountant as rdp

    entry = (4.0e6, 1.0e6, 1000.0, 7)
    want, _ = rdp.compute_epsilon(
        acct.SKELLAM_ORDERS, [7 * acct.skellam_rdp(a, 4.0e6, 1.0e6, 1000.0) for a in acct.SKELLAM_ORDERS], 1e-5
    )
    assert acct.skellam_epsilon((entry,), 1e-5) == want
    # seven single releases are the same ledger as one entry of count 7
    led: acct.SkellamLedger = ()
    for _ in range(7):
        led = acct.skellam_add(led, 4.0e6, 1.0e6, 1000.0)
    assert led == (entry,)
    # with a large variance the Skellam mechanism is within a few percent of the Gaussian of σ = √μ / Δ2 = 2
    gauss = acct.epsilon(((2.0, 1.0, 7),), 1e-5)
    assert gauss <= want < 1.05 * gauss
    assert acct.skellam_epsilon((), 1e-5) == 0.0


def test_skellam_calibration_reaches_the_target_from_below() -> None:
    l2 = 1000.0
    s = acct.skellam_calibrate(3.0, 1e-5, l1=l2 * l2, l2=l2, count=20)
    eps = acct.skellam_epsilon(((s * s * l2 * l2, l2 * l2, l2, 20),), 1e-5)
    assert eps <= 3.0 and eps > 3.0 - 1e-3
    with pytest.raises(ConfigError) as e:
        acct.skellam_calibrate(1e-6, 1e-5, l1=1.0, l2=1.0, count=10**6)
    assert e.value.key == "privacy.target_epsilon"


def test_skellam_ledger_round_trips_and_refuses_junk() -> None:
    led = acct.skellam_add(acct.skellam_add((), 5.0, 2.0, 1.0), 6.0, 2.0, 1.0, 3)
    assert acct.skellam_ledger_from_json([list(e) for e in led]) == led
    for bad in ({"a": 1}, [[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0, True]], [[1.0, 2.0, 3.0, 1.5]]):
        with pytest.raises(ValueError):
            acct.skellam_ledger_from_json(bad)


# ----------------------------------------------------------------- the encoding
def test_rounded_norm_bound_by_hand() -> None:
    # c = 3, d = 16, β = e^-1/2: √(9 + 4 + 1·(3 + 2)) = √18 < c + √d = 7
    assert rounded_norm_bound(3.0, 16) == pytest.approx(math.sqrt(18.0), rel=1e-15)
    assert rounded_norm_bound(0.1, 10**6) == pytest.approx(math.sqrt(0.01 + 250_000 + 500.1), rel=1e-15)  # rounding dominates


def test_build_leaves_headroom_for_the_sum_and_its_noise() -> None:
    plan = SkellamPlan.build(clip_norm=0.5, noise_multiplier=1.5, clients=10, numel=10_000)
    half = 2.0**31
    assert 10 * plan.bound + 8 * math.sqrt(10 * plan.variance) < half / 1.9  # half the signed range, by construction
    assert plan.variance == pytest.approx((1.5 * plan.bound) ** 2 / 10, rel=1e-12)
    c = min(half / (2 * (10 + 12)), math.sqrt(2e10 * 10) / 1.5) - 100.0  # the headroom, or the Poisson sampler's range
    assert plan.gamma == pytest.approx(0.5 / c, rel=1e-12) and plan.variance / 2 <= 1e10 * (1 + 1e-12)
    assert plan.max_clients >= 10
    l1, l2 = plan.sensitivity(10_000)
    assert l2 == plan.bound and l1 == pytest.approx(100.0 * plan.bound)
    assert plan_from_meta(plan.meta()) == plan
    with pytest.raises(ConfigError, match="too fine a grid"):
        SkellamPlan.build(clip_norm=1.0, noise_multiplier=1.0, clients=1000, numel=10**6, modulus_bits=16)


def test_conditional_rounding_is_unbiased_and_bounded() -> None:
    d = 400
    plan = SkellamPlan(clip_norm=1.0, gamma=1.0 / 50.0, bound=rounded_norm_bound(50.0, d), variance=1e-30)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(d, generator=g, dtype=torch.float64)
    x = x / x.norm() * 3.0  # clipped to norm 1 first
    draws = np.stack([plan.quantize(x, g) for _ in range(400)])  # noise of variance 1e-30 is all zeros
    assert (np.linalg.norm(draws, axis=1) <= plan.bound).all()
    target = (x / 3.0 * 50.0).numpy()  # x clipped to C = 1, on the grid of step 1/50
    assert (np.abs(draws - target[None, :]) < 1.0).all()  # each entry rounds to a neighbouring integer
    # the mean of 400 roundings: each entry's error has sd <= 1/2, so the mean's is <= 1/40; 6 sd is 0.15
    assert np.abs(draws.mean(axis=0) - target).max() < 0.15


def test_skellam_noise_has_the_stated_variance() -> None:
    plan = SkellamPlan(clip_norm=1.0, gamma=1.0, bound=10.0, variance=2500.0)
    q = plan.quantize(torch.zeros(200_000, dtype=torch.float64), torch.Generator().manual_seed(3))
    assert q.dtype == np.int64
    var = q.astype(np.float64).var()
    assert abs(var - 2500.0) < 6 * 2500.0 * math.sqrt(2 / 200_000)  # 6 standard errors of a variance estimate
    assert abs(q.mean()) < 6 * math.sqrt(2500.0 / 200_000)


def test_decode_reads_signed_integers_mod_2k() -> None:
    plan = SkellamPlan(clip_norm=1.0, gamma=0.5, bound=10.0, variance=1.0, modulus_bits=16)
    total = np.array([(1 << 16) - 5, 7, 1 << 15, (1 << 15) - 1], dtype=np.uint32)
    assert plan.decode_sum(total, 2).tolist() == [-2.5, 3.5, -(2**15) * 0.5, (2**15 - 1) * 0.5]


def test_noise_under_secagg_is_the_sum_of_the_clients_shares() -> None:
    """Four clients' inputs through SecAgg: decoded sum − Σ clipped inputs has sd √(4μ)·γ (and mean 0)."""
    d, n = 30_000, 4
    plan = SkellamPlan.build(clip_norm=1.0, noise_multiplier=0.8, clients=n, numel=d)
    cfg = SecAggConfig(encoding=plan)
    cohort = [f"c{i}" for i in range(n)]
    host = ProtocolClients()
    srv = cfg.server(1, cohort, seed=1)
    trained = srv.setup(lambda reqs: list(host.exchange(reqs)))
    g = torch.Generator().manual_seed(9)
    xs = {c: torch.randn(d, generator=g, dtype=torch.float64) * 0.004 for c in cohort}  # norms ≈ 0.7 < C
    for i, c in enumerate(trained):
        ins = ClientInstruction(round=1, client_id=c, train=TrainConfig(), seed=100 + i, protocol=srv.input_message(c))
        sealed = host.seal(ins, ClientUpdate(client_id=c, round=1, delta=xs[c], num_examples=1, weight=1.0))
        assert sealed is not None
        srv.check(sealed)
        srv.add(sealed, d)
    total, survivors = srv.finish(lambda reqs: list(host.exchange(reqs)))
    assert survivors == sorted(cohort)
    err = (total - sum(xs.values())).numpy()
    sd = math.sqrt(n * plan.variance) * plan.gamma  # = σ·Δ2·γ ≈ σ·C
    assert sd == pytest.approx(0.8 * plan.bound * plan.gamma, rel=1e-12)
    assert abs(err.std() - sd) < 6 * sd / math.sqrt(2 * d)
    assert abs(err.mean()) < 6 * sd / math.sqrt(d)


# ----------------------------------------------------------------- runs
def _config(privacy: dict[str, Any] | None, secure: dict[str, Any] | None, **over: Any):  # type: ignore[no-untyped-def]
    data: dict[str, Any] = {
        "run": {"name": "ddp", "seed": 5, "rounds": 3, **over.pop("run", {})},
        "data": {"name": "hospital"},
        "model": {"name": "mlp", "hidden": [16]},
        "strategy": {"name": "fedavg", "fraction": 1.0},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.01, "max_steps": 12},
        **over,
    }
    if privacy is not None:
        data["privacy"] = privacy
    if secure is not None:
        data["secure"] = secure
    return parse_config(data)


DDP = {"mode": "distributed", "noise_multiplier": 1.0, "clip_norm": 1.0, "delta": 1e-5}


@pytest.mark.parametrize("secure", [{"protocol": "secagg"}, {"protocol": "secagg+", "neighbours": 2}, {"protocol": "ckks"}])
def test_a_distributed_dp_run_reports_the_accountants_epsilon(secure: dict[str, Any]) -> None:
    if secure["protocol"] == "ckks":
        pytest.importorskip("tenseal")
    r = build_run(_config(DDP, secure))
    assert "distributed DP" in r.privacy.summary
    stage = r.federation.pipeline.stages[0]
    assert stage.name == "dp_distributed"
    h = r.federation.run(3)
    numel = r.spec.numel
    plan = stage.encoding(numel)
    l1, l2 = plan.sensitivity(numel)
    for rec in h:
        assert rec.status == "ok" and len(rec.clients) == 3
        want = acct.skellam_epsilon(((3 * plan.variance, l1, l2, rec.round),), 1e-5)
        assert rec.metrics["dp_epsilon"] == want
        assert rec.metrics["dp_noise_std"] == pytest.approx(1.0 * 1.0 / 3, rel=1e-3)  # σ·C / n of the mean
        assert "train_loss" not in rec.metrics
    # σ = 1, 3 releases: about the Gaussian mechanism's ε (integer orders only: a little above)
    assert acct.epsilon(((1.0, 1.0, 3),), 1e-5) <= h[-1].metrics["dp_epsilon"] < 1.05 * acct.epsilon(((1.0, 1.0, 3),), 1e-5)


def test_fewer_survivors_mean_less_noise_and_a_larger_epsilon() -> None:
    r = build_run(_config(DDP, {"protocol": "secagg", "threshold": 1, "dropout": {"input": 0.4}}, run={"rounds": 6}))
    h = r.federation.run(6)
    stage = r.federation.pipeline.stages[0]
    plan = stage.encoding(r.spec.numel)
    l1, l2 = plan.sensitivity(r.spec.numel)
    led: acct.SkellamLedger = ()
    assert any(len(x.clients) < 3 for x in h if x.status == "ok"), [x.clients for x in h]
    for x in h:
        if x.status == "ok":
            led = acct.skellam_add(led, len(x.clients) * plan.variance, l1, l2)
            assert x.metrics["dp_epsilon"] == acct.skellam_epsilon(led, 1e-5)
    full = acct.skellam_epsilon(((3 * plan.variance, l1, l2, sum(n for *_, n in led)),), 1e-5)
    assert h[-1].metrics["dp_epsilon"] > full


def test_the_budget_stops_the_run_before_a_round_would_exceed_it() -> None:
    r = build_run(_config({**DDP, "max_epsilon": 7.5}, {"protocol": "secagg"}, run={"rounds": 10}))
    h = r.federation.run(10)
    eps = [x.metrics["dp_epsilon"] for x in h]
    assert eps[-1] <= 7.5 and len(h) < 10
    stage = r.federation.pipeline.stages[0]
    plan = stage.encoding(r.spec.numel)
    l1, l2 = plan.sensitivity(r.spec.numel)
    assert acct.skellam_epsilon(((3 * plan.variance, l1, l2, len(h) + 1),), 1e-5) > 7.5


def test_target_epsilon_calibrates_sigma_for_the_run() -> None:
    r = build_run(_config({"mode": "distributed", "target_epsilon": 5.0, "clip_norm": 1.0, "delta": 1e-5}, {"protocol": "secagg"}, run={"rounds": 4}))
    h = r.federation.run(4)
    assert "chosen for ε = 5 after 4 rounds" in r.privacy.summary
    assert 4.99 < h[-1].metrics["dp_epsilon"] <= 5.0


def test_distributed_dp_is_refused_without_secure_aggregation_and_names_its_key() -> None:
    with pytest.raises(ConfigError, match=r"add a \[secure\] section") as e:
        build_run(_config(DDP, None))
    assert e.value.key == "privacy.mode"
    with pytest.raises(ConfigError, match="needs every individual update"):
        build_run(_config(DDP, {"protocol": "secagg"}, strategy={"name": "median", "fraction": 1.0}))


def test_a_plain_update_is_refused_by_the_distributed_dp_stage() -> None:
    from fedloom.core.errors import InvalidUpdateError
    from fedloom.pipeline.base import StageContext
    from fedloom.privacy.distributed import DistributedDP

    r = build_run(_config(DDP, {"protocol": "secagg"}))
    st = DistributedDP(clients=3)
    ctx = StageContext(r.spec, 1, torch.float32)
    up = ClientUpdate(client_id="x", round=1, delta=torch.zeros(r.spec.numel), num_examples=5, weight=1.0)
    with pytest.raises(InvalidUpdateError, match="must arrive masked or encrypted"):
        st.server(up, ctx)
    with pytest.raises(InvalidUpdateError, match="is not 1"):
        masked = Payload(codec="secagg", tensors={"masked": torch.zeros(3, dtype=torch.int32)})
        st.server(ClientUpdate(client_id="x", round=1, delta=None, payload=masked, num_examples=5, weight=5.0), ctx)
