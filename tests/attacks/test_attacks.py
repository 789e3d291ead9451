"""Attacks: each crafted update by hand, the adversary on the stream, attacker choice, refusals, every engine."""

from __future__ import annotations

import math
from collections.abc import Iterator
from statistics import NormalDist
from typing import Any

import pytest
import torch
from torch import nn

from fedloom.attacks import (
    ALIE,
    Adversary,
    AttackContext,
    GaussianNoise,
    Inflate,
    InnerProduct,
    Scale,
    SignFlip,
    alie_z,
    build_attack,
    choose_attackers,
    flip_labels,
    plan_attack,
)
from fedloom.core.config import parse_config
from fedloom.core.errors import ConfigError
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientUpdate
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec
from fedloom.pipeline import ExampleWeighting, build_stage
from fedloom.run import build_run

SPEC = ParamSpec.from_module(nn.Linear(2, 1))  # 3 trainable entries: weight (1, 2), bias (1,)


def _up(cid: str, delta: list[float], n: int = 1, weight: float | None = None) -> ClientUpdate:
    d = torch.tensor(delta, dtype=torch.float32)
    if weight is not None:
        d = d * weight
    return ClientUpdate(client_id=cid, round=1, delta=d, num_examples=n, weight=weight)


def _run(adv: Adversary, ups: list[ClientUpdate], weighting: ExampleWeighting | None = None, spec: ParamSpec = SPEC) -> list[ClientUpdate]:
    return list(adv.intercept(iter(ups), AttackContext(spec, 1, weighting)))


def test_sign_flip_on_a_weighted_update_keeps_the_weight() -> None:
    adv = Adversary(SignFlip(), frozenset({"bad"}))
    out = _run(adv, [_up("good", [1, 1, 1], n=2, weight=2.0), _up("bad", [1, 2, 3], n=4, weight=4.0)], ExampleWeighting())
    assert [u.client_id for u in out] == ["good", "bad"]
    assert out[0].delta.tolist() == [2.0, 2.0, 2.0]
    assert out[1].delta.tolist() == [-4.0, -8.0, -12.0] and out[1].weight == 4.0 and out[1].num_examples == 4


def test_scale_multiplies_the_unweighted_delta() -> None:
    out = _run(Adversary(Scale(factor=10.0), frozenset({"bad"})), [_up("bad", [1.0, -2.0, 0.5])])
    assert out[0].delta.tolist() == [10.0, -20.0, 5.0] and out[0].weight is None


def test_inflate_declares_more_examples_and_the_weighting_rule_prices_them() -> None:
    bad = _up("bad", [1.0, 2.0, 3.0], n=4, weight=4.0)
    out = _run(Adversary(Inflate(factor=100.0), frozenset({"bad"})), [bad], ExampleWeighting())[0]
    assert out.num_examples == 400 and out.weight == 400.0
    assert out.delta.tolist() == [-400.0, -800.0, -1200.0]
    capped = _run(Adversary(Inflate(factor=100.0), frozenset({"bad"})), [bad], ExampleWeighting(cap=50))[0]
    assert capped.num_examples == 400 and capped.weight == 50.0
    assert capped.delta.tolist() == [-50.0, -100.0, -150.0]
    # the capped weighting's server half accepts it: the weight is the rule's for the declared count
    ExampleWeighting(cap=50).server(capped, None)  # type: ignore[arg-type]


def test_alie_z_is_baruchs_formula() -> None:
    # n = 10, f = 2: s = floor(10/2 + 1) - 2 = 4, z = Phi^-1((10 - 4) / 10) = Phi^-1(0.6)
    assert alie_z(10, 2) == pytest.approx(0.2533471031357997, abs=1e-12)
    assert alie_z(20, 6) == pytest.approx(NormalDist().inv_cdf(15 / 20), abs=1e-12)  # s = 5
    assert alie_z(10, 0) == 0.0  # s = 6, (10 - 6)/10 = 0.4 <= 0.5: no room to shift


def _benign() -> list[ClientUpdate]:
    # 4 x [1, 0, 2] and 4 x [3, 0, -2], weighted by 2: mean [2, 0, 0], population std [1, 0, 2]
    return [_up(f"g{i}", [1, 0, 2] if i % 2 else [3, 0, -2], n=2, weight=2.0) for i in range(8)]


def test_alie_sends_mean_minus_z_sigma_of_the_benign_updates_after_them() -> None:
    attackers = [_up("a1", [9, 9, 9], n=2, weight=2.0), _up("a2", [7, 7, 7], n=2, weight=2.0)]
    ups = [attackers[0], *_benign()[:4], attackers[1], *_benign()[4:]]
    out = _run(Adversary(ALIE(), frozenset({"a1", "a2"})), ups, ExampleWeighting())
    assert [u.client_id for u in out] == ["g0", "g1", "g2", "g3", "g4", "g5", "g6", "g7", "a1", "a2"]
    z = alie_z(10, 2)
    want = torch.tensor([2 - z, 0.0, -2 * z]) * 2.0  # re-weighted by w = 2
    for u in out[-2:]:
        assert torch.allclose(u.delta, want.float(), atol=1e-6) and u.weight == 2.0
    fixed = _run(Adversary(ALIE(z=1.5), frozenset({"a1", "a2"})), ups, ExampleWeighting())
    assert torch.allclose(fixed[-1].delta, torch.tensor([0.5, 0.0, -3.0]) * 2.0)


def test_ipm_sends_minus_epsilon_times_the_benign_mean() -> None:
    out = _run(Adversary(InnerProduct(epsilon=0.5), frozenset({"a"})), [_up("a", [5, 5, 5], n=2, weight=2.0), *_benign()], ExampleWeighting())
    assert out[-1].client_id == "a" and out[-1].delta.tolist() == [-2.0, 0.0, 0.0]  # -0.5 * [2, 0, 0] * w


def test_own_knowledge_uses_only_the_attackers_updates() -> None:
    ups = [*_benign(), _up("a1", [1, 0, 0]), _up("a2", [3, 0, 4])]
    out = _run(Adversary(InnerProduct(epsilon=1.0), frozenset({"a1", "a2"}), knowledge="own"), ups)
    assert out[-1].delta.tolist() == [-2.0, 0.0, -2.0]


def test_gaussian_noise_has_the_configured_spread() -> None:
    spec = ParamSpec.from_module(nn.Linear(1000, 200))  # 200,200 entries
    up = ClientUpdate(client_id="bad", round=1, delta=torch.zeros(spec.numel), num_examples=1)
    d = _run(Adversary(GaussianNoise(sigma=0.3), frozenset({"bad"})), [up], spec=spec)[0].delta.double()
    n = d.numel()
    assert abs(float(d.mean())) < 6 * 0.3 / math.sqrt(n)  # 6 standard errors: a false alarm ~1e-9
    assert abs(float(d.std()) / 0.3 - 1.0) < 6 / math.sqrt(2 * n)
    again = _run(Adversary(GaussianNoise(sigma=0.3), frozenset({"bad"})), [up], spec=spec)[0].delta
    assert torch.equal(again, d.float())  # seeded by (run seed, round, client)


def test_buffers_travel_as_trained() -> None:
    spec = ParamSpec.from_module(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    mask = spec.trainable_mask()
    delta = torch.arange(1.0, spec.numel + 1.0)
    out = _run(Adversary(SignFlip(), frozenset({"bad"})), [ClientUpdate(client_id="bad", round=1, delta=delta, num_examples=1)], spec=spec)[0]
    assert torch.equal(out.delta[mask], -delta[mask]) and torch.equal(out.delta[~mask], delta[~mask])


def test_closing_the_adversary_closes_the_engine_stream() -> None:
    closed = []

    def stream() -> Iterator[ClientUpdate]:
        try:
            yield _up("g", [1, 1, 1])
            yield _up("g2", [1, 1, 1])
        finally:
            closed.append(True)

    it = Adversary(SignFlip(), frozenset({"bad"})).intercept(stream(), AttackContext(SPEC, 1))
    next(it)
    it.close()
    assert closed == [True]


def test_attackers_are_a_seeded_share_or_named() -> None:
    ids = [f"c{i:03d}" for i in range(100)]
    a = choose_attackers(ids, fraction=0.2, clients=(), seed=3)
    assert len(a) == 20 and a <= set(ids) and a == choose_attackers(list(reversed(ids)), fraction=0.2, clients=(), seed=3)
    assert a != choose_attackers(ids, fraction=0.2, clients=(), seed=4)
    assert len(choose_attackers(ids[:3], fraction=0.5, clients=(), seed=0)) == 2  # floor(1.5 + 0.5)
    assert choose_attackers(ids, fraction=None, clients=("c001",), seed=0) == {"c001"}
    with pytest.raises(ConfigError, match="attack.clients"):
        choose_attackers(ids, fraction=None, clients=("nobody",), seed=0)
    with pytest.raises(ConfigError, match="fraction"):
        choose_attackers(ids, fraction=None, clients=(), seed=0)
    with pytest.raises(ConfigError, match="not both"):
        choose_attackers(ids, fraction=0.1, clients=("c001",), seed=0)


def _tiny(kind: str = "classification") -> FederatedDataset:
    y = torch.tensor([0, 3, 9]) if kind == "classification" else torch.tensor([0.0, 1.0, 1.0])
    split = Split(torch.zeros(3, 2), y)
    task = TaskSpec(kind=kind, input_shape=(2,), num_outputs=10 if kind == "classification" else 1, loss="x", metrics=("accuracy",))  # type: ignore[arg-type]
    return FederatedDataset("tiny", task, {"a": ClientData(split, test=split), "b": ClientData(split)}, server_test=split)


def test_label_flip_relabels_only_the_attackers_training_data() -> None:
    d = flip_labels(_tiny(), {"a"})
    assert d.clients["a"].train.y.tolist() == [9, 6, 0]
    assert d.clients["a"].test.y.tolist() == [0, 3, 9] and d.clients["b"].train.y.tolist() == [0, 3, 9]
    assert d.server_test.y.tolist() == [0, 3, 9]
    assert flip_labels(_tiny("binary"), {"b"}).clients["b"].train.y.tolist() == [1.0, 0.0, 0.0]
    reg = FederatedDataset("r", TaskSpec("regression", (2,), 1, "mse", ("mae",)), {"a": ClientData(Split(torch.zeros(1, 2), torch.zeros(1)))})
    with pytest.raises(ConfigError, match="regression"):
        flip_labels(reg, {"a"})


def _plan(name: str = "sign_flip", options: dict[str, Any] | None = None, **kw: Any):  # type: ignore[no-untyped-def]
    args: dict[str, Any] = dict(dataset=_tiny(), fraction=0.5, clients=(), knowledge="omniscient", seed=0, stages=(), secure=False, remote=False)
    args.update(kw)
    return plan_attack(name, options or {}, **args)


def test_refusals_name_the_key_and_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"attack\.name.*unknown attack 'nope'"):
        build_attack("nope")
    with pytest.raises(ConfigError, match=r"attack\.sigm.*accepted: sigma"):
        build_attack("gaussian", {"sigm": 1.0})
    with pytest.raises(ConfigError, match=r"attack\.sigma: must be > 0"):
        build_attack("gaussian", {"sigma": 0.0})
    with pytest.raises(ConfigError, match=r"attack\.factor: must be >= 1"):
        build_attack("inflate", {"factor": 0.5})
    with pytest.raises(ConfigError, match="simulation experiments"):
        _plan(remote=True)
    with pytest.raises(ConfigError, match="secure aggregation hides"):
        _plan(secure=True)
    with pytest.raises(ConfigError, match="'qsgd' encodes them"):
        _plan(stages=(build_stage("qsgd", {"bits": 4}),))
    adv, data = _plan("label_flip", secure=True, stages=(build_stage("qsgd", {"bits": 4}),))  # a data attack works under both
    assert len(adv.attackers) == 1 and data.clients[next(iter(adv.attackers))].train.y.tolist() == [9, 6, 0]
    with pytest.raises(ConfigError, match="knowledge"):
        parse_config({"data": {"name": "mnist"}, "model": {"name": "2nn"}, "attack": {"name": "alie", "fraction": 0.1, "knowledge": "all"}})


def _attacked_run(engine: str, attack: dict[str, Any], strategy: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
    cfg = parse_config(
        {
            "run": {"seed": 2, "rounds": 2, "engine": engine},
            "data": {"name": "mnist", "partition": "shards", "num_clients": 20},
            "model": {"name": "2nn"},
            "strategy": strategy or {"name": "fedavg", "fraction": 0.5},
            "client": {"epochs": 1, "batch_size": 10, "lr": 0.05, "max_steps": 5},
            "attack": attack,
        }
    )
    r = build_run(cfg)
    r.federation.run(2)
    return r


@pytest.mark.parametrize(
    "attack",
    [
        {"name": "alie", "fraction": 0.3},
        {"name": "inflate", "fraction": 0.2},
        {"name": "label_flip", "fraction": 0.3},
        {"name": "gaussian", "fraction": 0.2, "sigma": 0.01},
    ],
    ids=lambda a: a["name"],
)
def test_an_attacked_run_is_the_same_on_the_sequential_and_vectorized_engines(attack: dict[str, Any]) -> None:
    seq = _attacked_run("sequential", attack)
    vec = _attacked_run("vectorized", attack)
    a, b = seq.federation.state.params, vec.federation.state.params
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert [r.clients for r in seq.federation.history] == [r.clients for r in vec.federation.history]
    clean = _attacked_run("sequential", {**attack, "fraction": 0.0})
    assert not torch.allclose(a, clean.federation.state.params, atol=1e-4)  # the attack changed the model


def test_inflation_buys_the_round_under_fedavg_but_not_under_a_cap() -> None:
    attack = {"name": "inflate", "clients": ["client-000"], "factor": 1000.0, "delta_scale": 1.0}
    strategy = {"name": "fedavg", "fraction": 1.0}
    r = _attacked_run("sequential", attack, strategy)
    hist = r.federation.history.records[-1]
    assert "client-000" in hist.clients and hist.num_examples == 1000 * 3000 + 19 * 3000
    capped = parse_config(
        {
            "run": {"seed": 2, "rounds": 1, "engine": "sequential"},
            "data": {"name": "mnist", "partition": "shards", "num_clients": 20},
            "model": {"name": "2nn"},
            "strategy": strategy,
            "client": {"epochs": 1, "batch_size": 10, "lr": 0.05, "max_steps": 5},
            "pipeline": [{"name": "weight_examples", "cap": 3000}],
            "attack": attack,
        }
    )
    rc = build_run(capped)
    rec = rc.federation.step()
    assert rec.status == "ok" and "client-000" in rec.clients
    # every client holds 3,000 of the 60,000 weight: the capped run equals the run without the inflation
    plain = build_run(capped.model_copy(update={"attack": None}))
    plain.federation.step()
    assert torch.allclose(rc.federation.state.params, plain.federation.state.params, atol=1e-7)
