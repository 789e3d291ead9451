"""Secure rounds in the loop: every simulation engine, the plain run's result within the bound, aborts, refusals."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from fedloom.core.config import parse_config
from fedloom.core.errors import ConfigError
from fedloom.run import Run, build_run


def _config(secure: dict[str, Any] | None, **over: Any):  # type: ignore[no-untyped-def]
    data: dict[str, Any] = {
        "run": {"name": "secure", "seed": 5, "rounds": 3, **over.pop("run", {})},
        "data": {"name": "hospital"},
        "model": {"name": "mlp", "hidden": [16]},
        "strategy": {"name": "fedavg", "fraction": 1.0},
        "client": {"epochs": 1, "batch_size": 32, "lr": 0.01, "max_steps": 12},
        **over,
    }
    if secure is not None:
        data["secure"] = secure
    return parse_config(data)


def _run(secure: dict[str, Any] | None, engine: str = "sequential", rounds: int = 3, **over: Any) -> Run:
    run = {"engine": engine, **({"ray_workers": 2} if engine == "ray" else {}), **over.pop("run", {})}
    r = build_run(_config(secure, run=run, **over))
    try:
        r.federation.run(rounds)
    finally:
        r.engine.close()
    return r


SECURE = {"weight_scale": 12000.0, "clip": 50.0, "bits": 28}  # nothing clips: |n_i Δ_i| / 12000 < 50


def _reload_ray_auth() -> None:
    try:  # Ray caches its RAY_AUTH_* settings
        from ray._private.authentication_test_utils import reset_auth_token_state
    except ImportError:
        return
    reset_auth_token_state()


@pytest.fixture()
def ray_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
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


def test_one_secure_round_is_the_plain_round_within_the_quantization_bound() -> None:
    plain = _run(None, rounds=1)
    sec = _run(SECURE, rounds=1)
    rec = sec.federation.history[0]
    assert rec.status == "ok" and sorted(rec.clients) == ["hospital-A", "hospital-B", "hospital-C"]
    # the step is Σ n_i Δ_i / Σ n_i; each client's quantized input is off by < one step of weight_scale * 2 clip / (2^bits - 1)
    n = [len(sec.dataset.clients[c].train) for c in rec.clients]
    plan_step = 12000.0 * 2 * 50.0 / (2**28 - 1)
    bound = 3 * plan_step / sum(n)
    diff = (sec.federation.state.params - plain.federation.state.params).abs().max().item()
    assert 0 < diff <= bound
    # the masked vectors are 4 bytes per entry; keys, shares and the unmasking add a little
    numel = sec.spec.numel
    assert rec.bytes_up > 3 * 4 * numel
    assert rec.bytes_up < 3 * 4 * numel + 3 * 2000


@pytest.mark.slow
def test_every_simulation_engine_runs_the_same_secure_round(ray_env: None) -> None:
    seq = _run({**SECURE, "protocol": "secagg+", "neighbours": 2})
    vec = _run({**SECURE, "protocol": "secagg+", "neighbours": 2}, engine="vectorized")
    ray_run = _run({**SECURE, "protocol": "secagg+", "neighbours": 2}, engine="ray")
    ref = seq.federation
    for other in (vec.federation, ray_run.federation):
        torch.testing.assert_close(other.state.params, ref.state.params, rtol=1e-5, atol=1e-5)
        assert [(r.status, sorted(r.clients), r.bytes_down) for r in other.history] == [
            (r.status, sorted(r.clients), r.bytes_down) for r in ref.history
        ]


def test_an_aborted_round_leaves_the_model_unchanged_and_the_run_goes_on(tmp_path) -> None:
    # 3 hospitals, t = 2 of 2 neighbours: any dropout before the masked input aborts the round
    r = _run({**SECURE, "threshold": 2, "dropout": {"input": 0.25}}, rounds=6, run={"store": str(tmp_path / "s.db")})
    h = r.federation.history
    statuses = [x.status for x in h]
    assert "aborted" in statuses and "ok" in statuses, statuses
    for x in h:
        if x.status == "aborted":
            assert "fewer than t=2" in x.reason and x.clients == [] and x.num_examples == 0
    from fedloom.store import Store

    with Store.open(tmp_path / "s.db", read_only=True) as store:
        kept = store.history(store.find_run("secure"))
    assert [(x.status, x.reason) for x in kept] == [(x.status, x.reason) for x in h]


def test_a_round_that_aborts_before_training_trains_nobody() -> None:
    r = _run({**SECURE, "threshold": 2, "dropout": {"share": 1.0}}, rounds=2)
    assert [x.status for x in r.federation.history] == ["aborted", "aborted"]
    assert all("sent their shares" in x.reason for x in r.federation.history)
    assert torch.equal(r.federation.state.params, r.spec.module_vector(__import__("fedloom.run", fromlist=["x"]).initial_model(r.model_fn, 5)))


@pytest.mark.parametrize(
    "over,match",
    [
        ({"strategy": {"name": "krum", "fraction": 1.0, "f": 0}}, "needs every individual update"),
        ({"strategy": {"name": "median", "fraction": 1.0}}, "needs every individual update"),
        ({"strategy": {"name": "scaffold", "fraction": 1.0}}, "control_delta"),
        ({"pipeline": [{"name": "qsgd", "bits": 8}]}, "encodes the update"),
        ({"privacy": {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 1.0}, "strategy": {"name": "fedavg", "fraction": 1.0, "sampling": "poisson"}}, "central DP checks"),
    ],
)
def test_unsound_combinations_are_refused_at_config_time(over: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        build_run(_config(SECURE, **over))
    assert e.value.key == "secure"


def test_bad_secure_options_name_their_key() -> None:
    for sec, key in (
        ({"protocol": "secagg+", "neighbours": 3}, "secure.neighbours"),
        ({"neighbours": 4}, "secure.neighbours"),
        ({"threshold": 1.5}, "secure.threshold"),
        ({"dropout": {"train": 0.1}}, "secure.dropout.train"),
    ):
        with pytest.raises(ConfigError) as e:
            build_run(_config(sec))
        assert e.value.key == key, (sec, e.value)


def test_pruning_under_secagg_sends_the_dense_masked_delta() -> None:
    r = _run({**SECURE}, rounds=1, pruning={"sparsity": 0.5})
    assert r.federation.history[0].status == "ok"
    assert [st.name for st in r.federation.pipeline.stages] == ["weight_examples"]
    assert r.federation.pipeline.broadcast_stage is not None and r.federation.pipeline.broadcast_stage.name == "sparse"


CKKS = {**SECURE, "bits": 24, "protocol": "ckks"}


def test_a_ckks_run_equals_the_secagg_run_on_every_simulation_engine() -> None:
    pytest.importorskip("tenseal")
    from fedloom.secure import ckks
    sa = _run({**SECURE, "bits": 24}, rounds=2)
    seq = _run(CKKS, rounds=2)
    vec = _run(CKKS, engine="vectorized", rounds=2)
    assert torch.equal(seq.federation.state.params, sa.federation.state.params)  # the same levels, summed exactly
    torch.testing.assert_close(vec.federation.state.params, seq.federation.state.params, rtol=1e-5, atol=1e-5)
    for r in seq.federation.history:
        assert r.status == "ok" and len(r.clients) == 3
        # up: one ciphertext per client (4096 slots) and the key holder's public context;
        # down: the public context to each client and the summed ciphertext to the key holder
        ct, pub = ckks.ciphertext_bytes(8192), len(ckks.public_bytes(ckks.new_context(8192)))
        assert abs(r.bytes_up - (3 * ct + pub)) < 5000  # and the headers
        assert abs(r.bytes_down - (3 * pub + ct + 3 * 4 * seq.spec.numel)) < 5000  # and the model broadcast


def test_a_ckks_key_holder_dropping_aborts_its_round_only(tmp_path) -> None:
    pytest.importorskip("tenseal")
    r = _run({**CKKS, "dropout": {"decrypt": 0.5}}, rounds=6)
    h = r.federation.history
    assert {x.status for x in h} == {"ok", "aborted"}, [x.status for x in h]
    for x in h:
        if x.status == "aborted":
            assert "did not decrypt the sum" in x.reason and x.clients == []


def test_ckks_options_are_checked_with_their_keys() -> None:
    for sec, key in (
        ({"protocol": "ckks", "threshold": 2}, "secure.threshold"),
        ({"protocol": "ckks", "bits": 28}, "secure.bits"),
        ({"protocol": "ckks", "poly_modulus_degree": 2048}, "secure.poly_modulus_degree"),
        ({"protocol": "secagg", "poly_modulus_degree": 8192}, "secure.poly_modulus_degree"),
        ({"protocol": "ckks", "dropout": {"unmask": 0.1}}, "secure.dropout.unmask"),
    ):
        with pytest.raises(ConfigError) as e:
            build_run(_config(sec))
        assert e.value.key == key, (sec, e.value)
    with pytest.raises(ConfigError, match="needs every individual update"):
        build_run(_config(CKKS, strategy={"name": "median", "fraction": 1.0}))
