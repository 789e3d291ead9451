"""The fedloom command line: a run writes its outputs; a bad config is one clear error."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from fedloom.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def test_run_writes_history_model_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", str(EXAMPLES / "equipment.toml"), "--set", "run.rounds=2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    history = json.loads((out / "history.json").read_text())
    assert [h["round"] for h in history] == [1, 2]
    for h in history:
        assert set(h) >= {"round", "metrics", "clients", "bytes"}
        assert sorted(h["clients"]) == ["line-A", "line-B", "line-C"]  # arrival order: by size in the vectorized engine
        assert h["bytes"]["down"] > 0 and h["bytes"]["up"] > 0
        assert "test_f1" in h["metrics"] and "test_auprc" in h["metrics"]
    state = load_file(str(out / "model.safetensors"))
    assert any(k.endswith("weight") for k in state)
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "round    2" in res.output


def test_same_config_same_history(tmp_path: Path) -> None:
    outs = []
    for name in ("a", "b"):
        res = runner.invoke(app, ["run", str(EXAMPLES / "fraud.toml"), "--set", "run.rounds=2", "--out", str(tmp_path / name), "-q"])
        assert res.exit_code == 0, res.output
        h = json.loads((tmp_path / name / "history.json").read_text())
        outs.append([(r["round"], r["metrics"], r["clients"]) for r in h])
    assert outs[0] == outs[1]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("client.lr=-1", "client.lr"),
        ("client.lr='fast'", "client.lr"),
        ("run.rounds=0", "run.rounds"),
        ("client.optimzer='sgd'", "client.optimzer: unknown key"),
        ("strategy.name='fedsomething'", "strategy.name"),
        ("strategy.fraction=1.5", "strategy.fraction"),
        ("strategy.mu=0.1", "strategy.mu"),
        ("model.name='resnet'", "model.name"),
        ("model.depth=3", "model.depth"),
        ("data.name='cifar'", "data"),
        ("data.partition='weird'", "data"),
    ],
)
def test_bad_config_is_one_clear_error(override: str, needle: str) -> None:
    res = runner.invoke(app, ["run", str(EXAMPLES / "equipment.toml"), "--set", override])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and needle in res.output
    assert "Traceback" not in res.output


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    res = runner.invoke(app, ["run", str(tmp_path / "missing.toml")])
    assert res.exit_code == 2 and "cannot read config file" in res.output
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nrounds = = 3\n")
    res = runner.invoke(app, ["run", str(bad)])
    assert res.exit_code == 2 and "invalid TOML" in res.output
    nodata = tmp_path / "nodata.toml"
    nodata.write_text("[run]\nrounds = 3\n[model]\nname='mlp'\n")
    res = runner.invoke(app, ["run", str(nodata)])
    assert res.exit_code == 2 and "data: required key is missing" in res.output


def test_scenarios_and_strategies_lists() -> None:
    res = runner.invoke(app, ["scenarios"])
    assert res.exit_code == 0
    for name in ("hospital", "fraud", "equipment", "mnist"):
        assert name in res.output
    res = runner.invoke(app, ["strategies"])
    assert res.exit_code == 0 and "scaffold" in res.output and "krum" in res.output
    assert "mu=0.01" in res.output and "server_momentum=0.9" in res.output  # each strategy's own parameters


def test_certs_commands_create_revoke_and_refuse(tmp_path: Path) -> None:
    from fedloom.server import certs

    d = tmp_path / "pki"
    res = runner.invoke(app, ["certs", "init", str(d), "--host", "10.1.2.3", "--client", "site-a"])
    assert res.exit_code == 0, res.output
    creds = certs.load_client_credentials(d / "clients" / "site-a")
    assert creds.client_id == "site-a"
    assert certs.verify_issued_by((d / "ca" / "ca.pem").read_bytes(), creds.cert_pem)
    assert runner.invoke(app, ["certs", "client", "site-b", "--dir", str(d)]).exit_code == 0
    res = runner.invoke(app, ["certs", "revoke", "site-b", "--dir", str(d)])
    assert res.exit_code == 0, res.output
    serial = certs.peer_identity((d / "clients" / "site-b" / "client.pem").read_bytes()).serial
    assert certs.load_revoked(d / "ca" / "revoked.txt") == frozenset({serial})
    again = runner.invoke(app, ["certs", "init", str(d)])  # never overwrites a CA
    assert again.exit_code == 2 and "error" in again.output
    bad = runner.invoke(app, ["certs", "client", "no spaces", "--dir", str(d)])
    assert bad.exit_code == 2 and "no spaces" in bad.output


def test_client_needs_exactly_one_of_credentials_or_insecure(tmp_path: Path) -> None:
    res = runner.invoke(app, ["client", "--server", "127.0.0.1:1", "--data", "x.npz"])
    assert res.exit_code == 2 and "exactly one of --credentials DIR or --insecure" in res.output


def test_server_without_credentials_explains_tls_default(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\nname = "hospital"\n[model]\nname = "linear"\n')
    res = runner.invoke(app, ["server", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "deploy.credentials" in res.output and "TLS is on by default" in res.output


def test_compressed_example_records_the_encoded_bytes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["run", str(EXAMPLES / "mnist_2nn_compressed.toml"), "--set", "run.rounds=1", "--out", str(out), "-q"]
    )
    assert res.exit_code == 0, res.output
    (h,) = json.loads((out / "history.json").read_text())
    p = 199_210  # the 2NN's parameters, all trainable, no buffers
    assert h["bytes"]["up"] == 10 * 8 * math.ceil(0.01 * p)  # 10 clients x k (int32 index + float32 value)
    assert h["bytes"]["down"] == 10 * 2 * p  # float16 broadcast
    assert h["metrics"]["test_accuracy"] > 0.2  # it learned something in one round


def test_private_example_reports_epsilon_every_round_within_80_columns(tmp_path: Path) -> None:
    from fedloom.client.dpsgd import dpsgd_sampling
    from fedloom.core.config import load_config
    from fedloom.data.registry import load_dataset
    from fedloom.privacy import accountant as acct

    out = tmp_path / "out"
    args = ["run", str(EXAMPLES / "hospital_dp.toml"), "--set", "run.rounds=2", "--set", "client.max_steps=5", "--out", str(out)]
    res = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert "privacy: sample-level DP-SGD" in res.output and "chosen for ε = 4 after 2 rounds" in res.output
    assert max(len(line) for line in res.output.splitlines()) <= 80
    assert "ε" in res.output.split("per-round metrics")[1].splitlines()[2]  # a column of the table
    history = json.loads((out / "history.json").read_text())
    cfg = load_config(EXAMPLES / "hospital_dp.toml", ["run.rounds=2", "client.max_steps=5"])
    sizes = [len(c.train) for c in load_dataset("hospital", seed=0).clients.values()]
    line = next(x for x in res.output.splitlines() if x.startswith("privacy:"))
    sigma = float(line.split("σ = ")[1].split()[0])
    train = cfg.client.train_config("huber")
    for h in history:  # the worst site's ε: its (q, steps) per round, composed over the rounds so far
        want = max(acct.epsilon(((sigma, q, h["round"] * s),), 1e-4) for q, s in (dpsgd_sampling(n, train) for n in sizes))
        assert h["metrics"]["dp_epsilon"] == pytest.approx(want, rel=1e-3)  # σ printed with 4 digits
        assert "train_loss" not in h["metrics"]


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.toml")))
def test_every_example_config_is_valid(example: str) -> None:
    from fedloom.core.config import load_config
    from fedloom.run import build_pipeline, build_pruner

    cfg = load_config(EXAMPLES / example)
    build_pipeline(cfg)
    build_pruner(cfg)
