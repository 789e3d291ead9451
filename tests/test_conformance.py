"""One pipeline, every engine: the same stages give the same run in all four engines.

A three-hospital FedAvg run with example weighting, top-k sparsification with error
feedback (client state carried across rounds) on the uplink and 8-bit QSGD on the broadcast
runs on the sequential, vectorized, Ray and remote (real gRPC server, client agents in
threads) engines. The remote engine's clients train with the sequential trainer, so it must
equal the sequential engine bit for bit (parameters, metrics, bytes); the vectorized and Ray
engines train in lockstep and must agree within 1e-5 relative. The same holds for strategies
whose clients do more than plain training: FedNova (the server normalizes by the reported step
counts) and FedDyn (a gradient transform, client state g_i, server state h).
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fedloom.agent import AgentOptions, ClientAgent
from fedloom.core.config import parse_config
from fedloom.run import Run, build_run

pytestmark = pytest.mark.slow

PIPELINES = {
    "topk-ef": {"pipeline": [{"name": "topk", "fraction": 0.05}], "broadcast": {"name": "qsgd", "bits": 8}},
    "fp16": {"pipeline": [{"name": "fp16"}]},
    # magnitude pruning: the mask in the instructions, sparse codec both ways, momentum and weight decay
    "pruned": {
        "pruning": {"sparsity": 0.75, "start": 1, "end": 2},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.01, "max_steps": 12, "momentum": 0.9, "weight_decay": 0.001},
    },
}


STRATEGY_RUNS = {
    # FedNova: unequal local steps (8, 7 and 10 batches of 1024) with momentum, normalized on the server
    "fednova": {"strategy": {"name": "fednova", "fraction": 1.0}, "client": {"epochs": 1, "batch_size": 1024, "lr": 0.02, "momentum": 0.5}},
    # FedDyn: the dynamic regularizer in local training, g_i as client state, h on the server
    "feddyn": {"strategy": {"name": "feddyn", "fraction": 1.0, "alpha": 0.1}},
    # personalization: a personal head (FedPer), Ditto's personal model, and each site's fine-tuned evaluation
    "personal": {"personalization": {"layers": ["net.2"], "ditto_lambda": 0.2, "finetune_steps": 3, "eval_every": 1}},
}


PRIVACY = {
    "central": {"mode": "central", "noise_multiplier": 0.8, "clip_norm": 0.05, "adaptive_clipping": True, "count_stddev": 1.0},
    "local": {"mode": "local", "noise_multiplier": 0.5, "clip_norm": 0.05},
    "sample": {"mode": "sample", "noise_multiplier": 1.1, "clip_norm": 1.0},
}


def _config(pipeline: str, privacy: str | None = None, **run: Any):  # type: ignore[no-untyped-def]
    extra: dict[str, Any] = {}
    if privacy is not None:  # seeded noise: the engines must draw the same (a deployment defaults to OS entropy)
        extra = {"privacy": {**PRIVACY[privacy], "noise": "seeded"}, "strategy": {"name": "fedavg", "fraction": 1.0, "sampling": "poisson"}}
    return parse_config(
        {
            "run": {"name": "conformance", "seed": 5, "rounds": 3, **run},
            "data": {"name": "hospital"},
            "model": {"name": "mlp", "hidden": [16]},
            "strategy": {"name": "fedavg", "fraction": 1.0},
            "client": {"epochs": 1, "batch_size": 32, "lr": 0.01, "max_steps": 12},
            "deploy": {
                "address": "127.0.0.1:0", "insecure": True, "min_clients": 3, "wait_timeout": 30,
                "round_timeout": 60, "heartbeat_interval": 0.5, "max_pull_wait": 0.5,
            },
            **(PIPELINES.get(pipeline) or STRATEGY_RUNS[pipeline]),
            **extra,
        }
    )  # fmt: skip


def _simulate(pipeline: str, engine: str, privacy: str | None = None, **run: Any) -> Run:
    r = build_run(_config(pipeline, privacy, engine=engine, **run))
    try:
        r.federation.run(3)
    finally:
        r.engine.close()
    return r


def _deploy(pipeline: str, privacy: str | None = None) -> tuple[Run, list[ClientAgent]]:
    cfg = _config(pipeline, privacy)
    if privacy is not None:
        cfg = cfg.model_copy(update={"deploy": cfg.deploy.model_copy(update={"round_retries": 0})})
    r = build_run(cfg, engine="remote")
    port = r.engine.port  # type: ignore[attr-defined]
    agents = [
        ClientAgent(r.dataset.clients[s], AgentOptions(server=f"127.0.0.1:{port}", client_id=s, pull_wait=0.5))
        for s in r.dataset.client_ids
    ]
    threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for t in threads:
        t.start()
    try:
        r.federation.run(3)
    finally:
        r.engine.close()
    for t in threads:
        t.join(timeout=30)
    return r, agents


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def _reload_ray_auth() -> None:
    try:  # Ray caches its RAY_AUTH_* settings
        from ray._private.authentication_test_utils import reset_auth_token_state
    except ImportError:
        return
    reset_auth_token_state()


@pytest.fixture(autouse=True)
def _ray_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A throwaway auth token (never written to ~/.ray), no usage stats, no outside cluster."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    _reload_ray_auth()
    yield
    monkeypatch.undo()
    _reload_ray_auth()


@pytest.mark.parametrize("pipeline", sorted(set(PIPELINES) - {"pruned"}))
def test_every_engine_runs_the_same_pipeline(pipeline: str) -> None:
    seq = _simulate(pipeline, "sequential")
    vec = _simulate(pipeline, "vectorized")
    ray_run = _simulate(pipeline, "ray", ray_workers=2)
    remote, agents = _deploy(pipeline)
    assert vec.engine.name == "vectorized" and ray_run.engine.name == "ray"

    ref = seq.federation
    # remote: the same trainer and stages in another process' shoes -> bit for bit
    assert torch.equal(remote.federation.state.params, ref.state.params)
    for d, s in zip(remote.federation.history, ref.history, strict=True):
        assert (d.bytes_up, d.bytes_down, d.status) == (s.bytes_up, s.bytes_down, s.status)
        assert sorted(d.clients) == sorted(s.clients)  # (in order of arrival)
        assert {k: v for k, v in d.metrics.items() if k.startswith("test_")} == {
            k: v for k, v in s.metrics.items() if k.startswith("test_")
        }  # the model is the same bit for bit; the mean training loss sums in arrival order
        assert d.metrics["train_loss"] == pytest.approx(s.metrics["train_loss"], rel=1e-12)
    # lockstep engines: within 1e-5
    for other in (vec.federation, ray_run.federation):
        _close(other.state.params, ref.state.params)
        for o, s in zip(other.history, ref.history, strict=True):
            assert (o.bytes_up, o.bytes_down, sorted(o.clients), o.status) == (s.bytes_up, s.bytes_down, sorted(s.clients), s.status)
            assert o.metrics["test_mae"] == pytest.approx(s.metrics["test_mae"], rel=1e-5)
    # the client state the stages keep (the error-feedback residual) matches as well
    if pipeline == "topk-ef":
        for cid in ref.engine.available_clients():
            want = ref.engine.client_states.get(cid)["topk.residual"]
            _close(vec.federation.engine.client_states.get(cid)["topk.residual"], want)
            _close(ray_run.federation.engine.client_states.get(cid)["topk.residual"], want)
            agent = next(a for a in agents if a.client_id == cid)
            assert torch.equal(agent.state["topk.residual"], want)
    # the bytes are the encoded ones, exactly: 3 clients, P trainable entries, B buffers
    p = int(ref.spec.trainable_mask().sum())
    b = ref.spec.numel - p
    per_client = 2 * p + 4 * b if pipeline == "fp16" else 8 * math.ceil(0.05 * p) + 4 * b
    assert all(r.bytes_up == 3 * per_client for r in ref.history)
    down = 4 * ref.spec.numel if pipeline == "fp16" else p + 4 * math.ceil(p / 512) + 4 * b  # QSGD-8 broadcast
    assert all(r.bytes_down == 3 * down for r in ref.history)


@pytest.mark.parametrize("privacy", sorted(PRIVACY))
def test_every_engine_gives_the_same_private_run(privacy: str) -> None:
    """Clipping and local noise in the clients (agents), central noise in the server: the same run everywhere."""
    seq = _simulate("fp16", "sequential", privacy)
    vec = _simulate("fp16", "vectorized", privacy)
    ray_run = _simulate("fp16", "ray", privacy, ray_workers=2)
    remote, _ = _deploy("fp16", privacy)
    ref = seq.federation
    eps = [r.metrics["dp_epsilon"] for r in ref.history]
    assert eps == sorted(eps) and eps[0] > 0
    assert torch.equal(remote.federation.state.params, ref.state.params)
    for other in (remote.federation, vec.federation, ray_run.federation):
        assert [r.metrics["dp_epsilon"] for r in other.history] == eps
        assert all(sorted(o.clients) == sorted(s.clients) for o, s in zip(other.history, ref.history, strict=True))
        assert all("train_loss" not in r.metrics for r in other.history)
    for other in (vec.federation, ray_run.federation):
        _close(other.state.params, ref.state.params)
    if privacy == "central":  # the adaptive clip norm follows the same noised counts
        clip = [r.metrics["dp_clip_norm"] for r in ref.history]
        assert clip[1] != clip[0]
        for other in (remote.federation, vec.federation, ray_run.federation):
            assert [r.metrics["dp_clip_norm"] for r in other.history] == pytest.approx(clip, rel=1e-12)


def test_every_engine_prunes_the_same() -> None:
    """The pruning mask travels to every engine's clients: pruned weights stay exactly zero everywhere."""
    from fedloom.cutting.magnitude import MASK_STATE

    seq = _simulate("pruned", "sequential")
    vec = _simulate("pruned", "vectorized")
    ray_run = _simulate("pruned", "ray", ray_workers=2)
    remote, _ = _deploy("pruned")
    ref = seq.federation
    keep = ref.state.tensors[MASK_STATE]
    assert 0.7 < ref.history[-1].metrics["sparsity"] <= 0.75
    assert torch.equal(remote.federation.state.params, ref.state.params)
    for o, s in zip(remote.federation.history, ref.history, strict=True):
        assert (o.bytes_up, o.bytes_down) == (s.bytes_up, s.bytes_down)
    for other in (vec.federation, ray_run.federation):
        assert torch.equal(other.state.tensors[MASK_STATE], keep)
        assert bool((other.state.params[~keep] == 0).all())
        _close(other.state.params, ref.state.params)
        assert [r.metrics["sparsity"] for r in other.history] == [r.metrics["sparsity"] for r in ref.history]
    # after the last pruning the deltas are zero on every pruned weight: the uplink holds only bitmaps and kept values
    p = int(ref.spec.trainable_mask().sum())
    assert ref.history[-1].bytes_up <= 3 * (math.ceil(p / 8) + 4 * int(keep.sum()))


@pytest.mark.parametrize("name", sorted(STRATEGY_RUNS))
def test_every_engine_runs_the_same_strategy(name: str) -> None:
    """FedNova, FedDyn and personalization: the same run on every engine; client states match too."""
    seq = _simulate(name, "sequential")
    vec = _simulate(name, "vectorized")
    ray_run = _simulate(name, "ray", ray_workers=2)
    remote, agents = _deploy(name)
    ref = seq.federation
    assert torch.equal(remote.federation.state.params, ref.state.params)
    for other in (vec.federation, ray_run.federation):
        _close(other.state.params, ref.state.params)
    for other in (remote.federation, vec.federation, ray_run.federation):
        assert all(o.status == "ok" and sorted(o.clients) == sorted(s.clients) for o, s in zip(other.history, ref.history, strict=True))
    if name == "fednova":
        tau_eff = [r.metrics["tau_eff"] for r in ref.history]
        # momentum 0.5: a_i = [tau_i - (1 - 0.5^tau_i)] / 0.5 = 14.0078125, 12.015625, 18.001953125 for tau = 8, 7, 10
        assert tau_eff == [(8000 * 14.0078125 + 6400 * 12.015625 + 9600 * 18.001953125) / 24000] * 3
        for other in (remote.federation, vec.federation, ray_run.federation):
            assert [r.metrics["tau_eff"] for r in other.history] == tau_eff
    elif name == "personal":
        for cid in ref.engine.available_clients():
            for key in ("personal.params", "ditto.model"):
                want = ref.engine.client_states.get(cid)[key]
                _close(vec.federation.engine.client_states.get(cid)[key], want)
                _close(ray_run.federation.engine.client_states.get(cid)[key], want)
                assert torch.equal(next(a for a in agents if a.client_id == cid).state[key], want)
        for o, s in zip(remote.federation.history, ref.history, strict=True):
            assert o.client_metrics == s.client_metrics  # each site's own evaluation, bit for bit
        for other in (vec.federation, ray_run.federation):
            for o, s in zip(other.history, ref.history, strict=True):
                assert sorted(o.client_metrics) == sorted(s.client_metrics) == sorted(ref.engine.available_clients())
                for cid, m in s.client_metrics.items():
                    assert o.client_metrics[cid]["pers_mae"] == pytest.approx(m["pers_mae"], rel=1e-5)
    else:
        h = ref.state.tensors["stage.0.feddyn.h"]  # the server's h
        assert float(h.abs().sum()) > 0 and torch.equal(remote.federation.state.tensors["stage.0.feddyn.h"], h)
        for other in (vec.federation, ray_run.federation):
            _close(other.state.tensors["stage.0.feddyn.h"], h)
        key = "feddyn.grad"  # each client's g_i
        for cid in ref.engine.available_clients():
            want = ref.engine.client_states.get(cid)[key]
            assert float(want.abs().sum()) > 0
            _close(vec.federation.engine.client_states.get(cid)[key], want)
            _close(ray_run.federation.engine.client_states.get(cid)[key], want)
            agent = next(a for a in agents if a.client_id == cid)
            assert torch.equal(agent.state[key], want)
