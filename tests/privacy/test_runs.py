"""Private runs end to end: ε every round equals the library's, calibration, resume, budget stop, refusals."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedloom.core.config import parse_config
from fedloom.core.errors import ConfigError
from fedloom.core.types import ClientInstruction, ClientUpdate
from fedloom.privacy import accountant as acct
from fedloom.run import build_run


def _cfg(privacy: dict | None, *, strategy: dict | None = None, **sections: dict) -> dict:
    cfg = {
        "run": {"rounds": 3, "seed": 5, "engine": "sequential"},
        "data": {"name": "mnist", "partition": "iid", "num_clients": 20},
        "model": {"name": "2nn"},
        "strategy": {"name": "fedavg", "fraction": 0.25, "sampling": "poisson", **(strategy or {})},
        "client": {"epochs": 1, "batch_size": 10, "lr": 0.1, "max_steps": 2},
    }
    if privacy is not None:
        cfg["privacy"] = privacy
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    return cfg


def test_central_dp_reports_the_libraries_epsilon_every_round() -> None:
    r = build_run(parse_config(_cfg({"mode": "central", "noise_multiplier": 1.2, "clip_norm": 0.5, "delta": 0.01})))
    assert "σ = 1.2" in r.privacy.summary and "Poisson q = 0.25" in r.privacy.summary
    h = r.federation.run(3)
    for rec in h:
        assert rec.metrics["dp_epsilon"] == acct.epsilon(((1.2, 0.25, rec.round),), 0.01, "rdp")
        assert "train_loss" not in rec.metrics  # not noised, so not reported
    assert r.federation.state.meta["stage.0.dp_central"]["ledger"] == [[1.2, 0.25, 3]]


def test_target_epsilon_chooses_sigma_and_the_run_ends_at_that_epsilon() -> None:
    r = build_run(parse_config(_cfg({"mode": "central", "target_epsilon": 3.0, "delta": 0.01}, run={"rounds": 4})))
    sigma = r.privacy.noise_multiplier
    assert r.privacy.calibrated and "chosen for ε = 3 after 4 rounds" in r.privacy.summary
    h = r.federation.run(4)
    assert h[-1].metrics["dp_epsilon"] <= 3.0
    assert h[-1].metrics["dp_epsilon"] == pytest.approx(3.0, rel=1e-3)
    assert acct.epsilon(((sigma, 0.25, 4),), 0.01) == h[-1].metrics["dp_epsilon"]


def test_resume_gives_the_same_epsilon_and_model(tmp_path: Path) -> None:
    priv = {"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.5, "delta": 0.01, "adaptive_clipping": True}
    full = build_run(parse_config(_cfg(priv, run={"rounds": 4})))
    full.federation.run(4)
    cfg = _cfg(priv, run={"rounds": 4, "store": str(tmp_path / "s.db")})
    first = build_run(parse_config(cfg))
    first.federation.run(2)
    first.federation.store.close()
    second = build_run(parse_config(cfg))
    assert second.federation.resumed_from == 2
    second.federation.run(4)
    second.federation.store.close()
    assert torch.equal(second.federation.state.params, full.federation.state.params)
    assert [r.metrics["dp_epsilon"] for r in second.federation.history] == [r.metrics["dp_epsilon"] for r in full.federation.history]
    assert [r.metrics["dp_clip_norm"] for r in second.federation.history] == [r.metrics["dp_clip_norm"] for r in full.federation.history]


def test_budget_stops_before_the_round_that_would_exceed_it_and_saves_the_model(tmp_path: Path) -> None:
    from fedloom.store import Store

    sigma, q, delta, budget = 1.0, 0.25, 0.01, 2.0
    last_ok = max(n for n in range(1, 50) if acct.epsilon(((sigma, q, n),), delta) <= budget)
    cfg = _cfg(
        {"mode": "central", "noise_multiplier": sigma, "delta": delta, "max_epsilon": budget},
        run={"rounds": 50, "store": str(tmp_path / "s.db")},
    )
    r = build_run(parse_config(cfg))
    h = r.federation.run(50)
    assert len(h) == last_ok and r.federation.state.round == last_ok
    assert "max_epsilon 2" in r.federation.stop_reason
    with Store.open(tmp_path / "s.db") as st:
        [info] = st.list_runs()
        assert info.status == "budget_exhausted" and info.last_checkpoint == last_ok
        ckpt = st.latest_checkpoint(r.federation.run_handle, spec=r.spec)
        assert torch.equal(ckpt.state.params, r.federation.state.params)


class _Hostile:
    """Wraps an engine; client client-000's update arrives unclipped (x100) as a broken or hostile client would send it."""

    def __init__(self, engine) -> None:  # type: ignore[no-untyped-def]
        self.engine = engine

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.engine, name)

    def run_cohort(self, g: torch.Tensor, instructions: Sequence[ClientInstruction], **kw) -> Iterator[ClientUpdate]:  # type: ignore[no-untyped-def]
        for u in self.engine.run_cohort(g, instructions, **kw):
            yield replace(u, delta=u.delta * 100) if u.client_id == "client-000" else u


def test_an_unclipped_update_is_rejected_and_the_ledger_stays_right() -> None:
    r = build_run(parse_config(_cfg({"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.1, "delta": 0.01}, strategy={"fraction": 1.0})))
    r.federation.engine = _Hostile(r.federation.engine)
    h = r.federation.run(2)
    for rec in h:
        assert "client-000" not in rec.clients and "exceeds the clip norm" in rec.rejected["client-000"]
        assert len(rec.clients) == 19
        assert rec.metrics["dp_epsilon"] == acct.epsilon(((1.0, 1.0, rec.round),), 0.01)


def test_an_empty_poisson_cohort_still_releases_a_noised_step() -> None:
    r = build_run(parse_config(_cfg({"mode": "central", "noise_multiplier": 1.0, "delta": 0.01}, strategy={"fraction": 0.01})))
    before = r.federation.state.params.clone()
    h = r.federation.run(3)
    empty = [rec for rec in h if not rec.clients]
    assert empty, "with q = 0.01 over 20 clients most rounds are empty"
    assert all(rec.status == "ok" and "dp_epsilon" in rec.metrics for rec in h)
    assert not torch.equal(before, r.federation.state.params)


def test_local_dp_reports_per_round_and_composed_epsilon() -> None:
    r = build_run(parse_config(_cfg({"mode": "local", "noise_multiplier": 4.0, "delta": 0.01}, strategy={"fraction": 0.5, "sampling": "fixed"})))
    h = r.federation.run(3)
    one = acct.epsilon(((2.0, 1.0, 1),), 0.01)
    counts: dict[str, int] = {}
    for rec in h:
        for c in rec.clients:
            counts[c] = counts.get(c, 0) + 1
        assert rec.metrics["dp_epsilon_round"] == one
        assert rec.metrics["dp_epsilon"] == acct.epsilon(((2.0, 1.0, max(counts.values())),), 0.01)


def test_local_dp_with_a_median_is_allowed() -> None:
    r = build_run(parse_config(_cfg({"mode": "local", "noise_multiplier": 1.0}, strategy={"name": "median", "sampling": "fixed"})))
    assert r.federation.run(1)[-1].metrics["dp_epsilon"] > 0


@pytest.mark.parametrize(
    ("privacy", "extra", "needle"),
    [
        ({"mode": "central", "noise_multiplier": 1.0}, {"strategy": {"name": "krum", "f": 1}}, "averages"),
        ({"mode": "central", "noise_multiplier": 1.0}, {"strategy": {"name": "median"}}, "averages"),
        ({"mode": "central", "noise_multiplier": 1.0}, {"strategy": {"name": "contribution"}}, "averages"),
        ({"mode": "central", "noise_multiplier": 1.0}, {"strategy": {"name": "scaffold"}}, "control_delta"),
        ({"mode": "local", "noise_multiplier": 1.0}, {"strategy": {"name": "scaffold"}}, "control_delta"),
        ({"mode": "central", "noise_multiplier": 1.0}, {"strategy": {"sampling": "fixed"}}, "Poisson"),
        ({"mode": "central", "noise_multiplier": 1.0}, {"run": {"min_updates": 2}}, "run.min_updates"),
        ({"mode": "central", "noise_multiplier": 1.0}, {"pipeline": [{"name": "qsgd", "bits": 2}]}, "qsgd"),
        ({"mode": "central", "noise_multiplier": 1.0, "target_epsilon": 1.0}, {}, "exactly one"),
        ({"mode": "central"}, {}, "exactly one"),
        ({"mode": "local", "noise_multiplier": 1.0, "adaptive_clipping": True}, {}, "adaptive"),
        ({"mode": "central", "noise_multiplier": 1.0}, {"pipeline": [{"name": "dp_local"}]}, "[privacy] table"),
        ({"mode": "central", "noise_multiplier": 1.0, "delta": 1.0}, {}, "privacy.delta"),
        ({"mode": "central", "noise_multiplier": -1.0}, {}, "privacy.noise_multiplier"),
        ({"mode": "central", "noise_multiplier": 1.0, "clip_norm": 0.0}, {}, "privacy.clip_norm"),
        ({"mode": "central", "target_epsilon": 1e-6}, {}, "cannot be reached"),
    ],
)
def test_unsound_or_bad_settings_are_refused_with_the_reason(privacy: dict, extra: dict, needle: str) -> None:
    cfg = _cfg(privacy)
    for k, v in extra.items():
        cfg[k] = v if isinstance(v, list) else {**cfg.get(k, {}), **v}
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        build_run(parse_config(cfg))


def test_a_model_with_buffers_is_refused() -> None:
    cfg = {
        "data": {"name": "hospital"},
        "model": {"name": "mlp", "hidden": [8], "batchnorm": True},
        "privacy": {"mode": "sample", "noise_multiplier": 1.0},
    }
    with pytest.raises(ConfigError, match="buffers"):
        build_run(parse_config(cfg))
