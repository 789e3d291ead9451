"""Personalization: personal layers kept on the clients (FedPer), each client's own evaluation
(its personal layers, k fine-tuning steps), per-client metrics, and the config's refusals."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import toy
from torch import nn

from fedloom.client.transforms import personal_mask
from fedloom.core.config import parse_config
from fedloom.core.errors import ConfigError
from fedloom.core.keys import PERSONAL, PERSONAL_PARAMS
from fedloom.core.types import ComponentSpec, PersonalEval, TrainConfig
from fedloom.data.base import FederatedDataset
from fedloom.engines.sequential import SequentialEngine
from fedloom.engines.vectorized import VectorizedEngine
from fedloom.federation.loop import Federation
from fedloom.run import build_run
from fedloom.strategies.fedavg import FedAvg

TRAIN = TrainConfig(loss="mse", epochs=1, batch_size=4, lr=0.05)
HEAD = ComponentSpec.of(PERSONAL, layers="2")


def _dataset(sizes: Sequence[int], dtype: torch.dtype = torch.float32) -> FederatedDataset:
    return toy.dataset(sizes, dtype=dtype, offset=2.0, test_shift=0.1)  # each client its own offset


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))


def _federation(ds, strategy, *, model_fn=_mlp, engine_cls=SequentialEngine, dtype=torch.float32, **kw) -> Federation:
    return toy.federation(ds, strategy, model_fn=model_fn, engine_cls=engine_cls, dtype=dtype, **kw)


@pytest.mark.parametrize("engine_cls", [SequentialEngine, VectorizedEngine])
def test_personal_layers_never_leave_the_clients(engine_cls) -> None:
    plan = PersonalEval(transforms=(HEAD,))
    fed = _federation(_dataset([12, 9, 15, 7]), FedAvg(train=TRAIN, fraction=1.0), engine_cls=engine_cls, personal=plan)
    mask = personal_mask(fed.spec, "2")
    w0 = fed.state.params.clone()
    seen = []
    fed.engine.run_cohort = _spy(fed.engine.run_cohort, seen)  # type: ignore[method-assign]
    fed.run(3)
    assert all(bool((u.delta[mask] == 0).all()) for u in seen)  # zeros where the head is
    assert torch.equal(fed.state.params[mask], w0[mask])  # so the server's head never moves
    assert not torch.equal(fed.state.params[~mask], w0[~mask])  # the body does
    heads = [fed.engine.client_states.get(c)[PERSONAL_PARAMS] for c in ("c0", "c1", "c2", "c3")]
    assert all(h.shape == (int(mask.sum()),) for h in heads)
    assert not torch.equal(heads[0], heads[3])  # each client its own head


def _spy(fn, seen):  # type: ignore[no-untyped-def]
    def run(*a, **kw):  # type: ignore[no-untyped-def]
        for u in fn(*a, **kw):
            seen.append(u)
            yield u

    return run


@pytest.mark.parametrize(("recipe", "key"), [(HEAD, PERSONAL_PARAMS), (ComponentSpec.of("ditto", lam=0.5), "ditto.model")])
def test_sequential_and_vectorized_keep_the_same_personal_state(recipe: ComponentSpec, key: str) -> None:
    """Personal layers and Ditto's model: the lockstep engine keeps the sequential one's client states."""
    plan = PersonalEval(transforms=(recipe,))
    feds = [
        _federation(_dataset([12, 9, 15, 7]), FedAvg(train=TRAIN, fraction=0.5, seed=1), engine_cls=cls, personal=plan)
        for cls in (SequentialEngine, VectorizedEngine)
    ]
    for f in feds:
        f.run(4)
    torch.testing.assert_close(feds[1].state.params, feds[0].state.params, rtol=1e-5, atol=1e-6)
    kept = 0
    for c in ("c0", "c1", "c2", "c3"):
        a, b = (f.engine.client_states.get(c).get(key) for f in feds)
        assert (a is None) == (b is None)
        if a is not None:
            kept += 1
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert kept >= 2  # 4 rounds of 2 of 4 clients: several kept a state


def test_fine_tuned_evaluation_by_hand() -> None:
    """A linear model, full-batch GD: each client's pers_mae is its test MAE after k GD steps from the global model."""
    ds = _dataset([10, 14], dtype=torch.float64)
    ft = TrainConfig(loss="mse", epochs=1, batch_size=64, lr=0.1)
    plan = PersonalEval(steps=3, train=ft, seed=5)
    fed = _federation(ds, FedAvg(train=ft, fraction=1.0), model_fn=lambda: nn.Linear(3, 1), dtype=torch.float64, personal=plan)
    rec = fed.step(checkpoint=True)  # the last round: personalized evaluation runs
    w = fed.state.params
    for cid, data in ds.clients.items():
        v = w.clone()
        for _ in range(3):
            v = v.clone().requires_grad_()
            loss = F.mse_loss(data.train.x @ v[:3] + v[3], data.train.y)
            (g,) = torch.autograd.grad(loss, (v,))
            v = (v - 0.1 * g).detach()
        mae = (data.test.x @ v[:3] + v[3] - data.test.y).abs().mean().item()
        glob = (data.test.x @ w[:3] + w[3] - data.test.y).abs().mean().item()
        assert rec.client_metrics[cid]["pers_mae"] == pytest.approx(mae, rel=1e-9)
        assert rec.client_metrics[cid]["fed_mae"] == pytest.approx(glob, rel=1e-9)
    n = {c: len(d.test) for c, d in ds.clients.items()}
    mean = sum(rec.client_metrics[c]["pers_mae"] * n[c] for c in n) / sum(n.values())
    assert rec.metrics["pers_mae"] == pytest.approx(mean, rel=1e-12)


def test_personalized_evaluation_leaves_the_client_state_alone_and_without_steps_or_layers_is_the_global_one() -> None:
    plan = PersonalEval(steps=4, train=TRAIN, transforms=(HEAD,))
    fed = _federation(_dataset([12, 9]), FedAvg(train=TRAIN, fraction=1.0), personal=plan, personal_eval_every=1)
    fed.run(2)
    before = {c: fed.engine.client_states.get(c)[PERSONAL_PARAMS].clone() for c in ("c0", "c1")}
    fed.federated_evaluation(personal=plan)
    assert all(torch.equal(before[c], fed.engine.client_states.get(c)[PERSONAL_PARAMS]) for c in before)
    assert all("pers_mae" in r.metrics for r in fed.history)
    plain = _federation(_dataset([12, 9]), FedAvg(train=TRAIN, fraction=1.0), personal=PersonalEval(), personal_eval_every=1)
    r = plain.step()
    assert r.metrics["pers_mae"] == r.metrics["fed_mae"]
    assert all(m["pers_mae"] == m["fed_mae"] for m in r.client_metrics.values())


def _config(**personalization) -> dict:  # type: ignore[no-untyped-def]
    return {
        "run": {"rounds": 2, "engine": "sequential", "seed": 1},
        "data": {"name": "hospital"},
        "model": {"name": "mlp", "hidden": [16]},
        "strategy": {"name": "fedavg", "fraction": 1.0},
        "client": {"epochs": 1, "batch_size": 64, "lr": 0.01},
        "personalization": personalization,
    }


def test_bad_personalization_settings_are_keyed_errors() -> None:
    with pytest.raises(ConfigError, match="no parameters under 'head'") as e:
        build_run(parse_config(_config(layers=["head"])))
    assert e.value.key == "personalization.layers"
    with pytest.raises(ConfigError) as e:
        parse_config(_config(finetune_steps=-1))
    assert e.value.key == "personalization.finetune_steps"


def test_a_configured_run_reports_each_hospitals_global_and_personalized_metrics() -> None:
    run = build_run(parse_config(_config(finetune_steps=5)))
    hist = run.federation.run(2)
    last = hist.records[-1]
    assert sorted(last.client_metrics) == sorted(run.dataset.clients)
    assert all({"fed_mae", "pers_mae"} <= set(m) for m in last.client_metrics.values())
    assert "pers_mae" not in hist.records[0].metrics  # eval_every = 0: after the last round only


DITTO_REC = ComponentSpec.of("ditto", lam=0.5)


def test_ditto_personal_model_by_hand() -> None:
    """One client, a linear model, full-batch GD (one step a round): the global model takes FedAvg's
    step; the personal model v takes v - lr·(∇F(v) + λ(v − w)) from the global w it received."""
    ds = _dataset([10], dtype=torch.float64)
    train = TrainConfig(loss="mse", epochs=1, batch_size=64, lr=0.1)
    plan = PersonalEval(transforms=(DITTO_REC,))
    fed = _federation(ds, FedAvg(train=train, fraction=1.0), model_fn=lambda: nn.Linear(3, 1), dtype=torch.float64, personal=plan)
    data = ds.clients["c0"].train

    def grad(v: torch.Tensor) -> torch.Tensor:
        v = v.clone().requires_grad_()
        (g,) = torch.autograd.grad(F.mse_loss(data.x @ v[:3] + v[3], data.y), (v,))
        return g

    w = fed.state.params.clone()
    v = w.clone()  # the first personal run starts from the global model
    for _ in range(3):
        fed.step()
        v = v - 0.1 * (grad(v) + 0.5 * (v - w))
        w = w - 0.1 * grad(w)
        torch.testing.assert_close(fed.state.params, w, rtol=0, atol=1e-12)
        torch.testing.assert_close(fed.engine.client_states.get("c0")["ditto.model"], v, rtol=0, atol=1e-12)
    rec = fed.step(checkpoint=True)
    v = v - 0.1 * (grad(v) + 0.5 * (v - w))
    test = ds.clients["c0"].test
    assert rec.client_metrics["c0"]["pers_mae"] == pytest.approx((test.x @ v[:3] + v[3] - test.y).abs().mean().item(), rel=1e-9)
