"""Real processes on loopback: `fedloom server` and `fedloom client` as separate OS processes.

* Five TLS clients, each on its own MNIST partition, reach exactly the simulation's result.
* ``kill -9`` of the server mid-run, then the same command again: it resumes from the last
  completed round, the clients reconnect, and the final model equals an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedloom.core.config import load_config
from fedloom.run import build_run
from fedloom.server import certs

pytestmark = pytest.mark.slow
FEDLOOM = str(Path(sys.executable).parent / "fedloom")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([FEDLOOM, *args], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def _stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def _logs(tmp: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tmp.glob("*.log")))


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def _simulated(config: Path) -> dict[str, torch.Tensor]:
    """The same config simulated in this process, single-threaded like the client processes (so bit-comparable)."""
    cfg = load_config(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = build_run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"store": None})}), engine="sequential")
        run.federation.run(cfg.run.rounds)
    finally:
        torch.set_num_threads(threads)
    return dict(run.global_model().state_dict())


def test_five_tls_client_processes_match_the_simulation(tmp_path: Path) -> None:
    port = _free_port()
    pki = tmp_path / "pki"
    ids = [f"client-{i:03d}" for i in range(5)]
    certs.create_ca(pki / "ca")
    certs.issue_server(pki / "ca", pki / "server", hosts=["127.0.0.1"])
    for cid in ids:
        certs.issue_client(pki / "ca", pki / "clients" / cid, cid)
    config = tmp_path / "mnist5.toml"
    config.write_text(
        f"""
[run]
name = "mnist5"
seed = 5
rounds = 3
[data]
name = "mnist"
num_clients = 5
[model]
name = "2nn"
[strategy]
name = "fedavg"
fraction = 1.0
[client]
batch_size = 10
lr = 0.1
max_steps = 40
[deploy]
address = "127.0.0.1:{port}"
credentials = "{pki / 'server'}"
min_clients = 5
wait_timeout = 120
round_timeout = 120
"""
    )
    procs = [_spawn(["server", str(config), "--out", str(tmp_path / "out"), "-q"], tmp_path / "server.log")]
    try:
        for cid in ids:
            procs.append(
                _spawn(
                    ["client", "--server", f"localhost:{port}", "--data", str(config), "--credentials", str(pki / "clients" / cid)],
                    tmp_path / f"{cid}.log",
                )
            )
        assert procs[0].wait(timeout=300) == 0, _logs(tmp_path)
        for p in procs[1:]:
            assert p.wait(timeout=60) == 0, _logs(tmp_path)
    finally:
        _stop_all(procs)
    deployed = _final_params(tmp_path / "out")
    simulated = _simulated(config)
    assert deployed.keys() == simulated.keys()
    for k in deployed:
        assert torch.equal(deployed[k], simulated[k]), k
    for cid in ids:
        assert f"client {cid}: 3 training tasks" in (tmp_path / f"{cid}.log").read_text()


def _rounds_recorded(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return int(con.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_server_killed_mid_run_resumes_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    port = _free_port()
    db = tmp_path / "store.db"
    config = tmp_path / "hospital.toml"
    config.write_text(
        f"""
[run]
name = "resume"
seed = 2
rounds = 6
store = "{db}"
[data]
name = "hospital"
[model]
name = "mlp"
[strategy]
name = "fedavg"
fraction = 1.0
[client]
epochs = 2
batch_size = 16
lr = 0.01
[deploy]
address = "127.0.0.1:{port}"
insecure = true
min_clients = 3
wait_timeout = 120
round_timeout = 120
heartbeat_interval = 1
"""
    )
    server_args = ["server", str(config), "--out", str(tmp_path / "out"), "-q"]
    procs = [_spawn(server_args, tmp_path / "server1.log")]
    try:
        for cid in ("hospital-A", "hospital-B", "hospital-C"):
            procs.append(
                _spawn(
                    ["client", "--server", f"127.0.0.1:{port}", "--data", str(config), "--insecure", "--client-id", cid],
                    tmp_path / f"{cid}.log",
                )
            )
        deadline = time.monotonic() + 180
        while _rounds_recorded(db) < 3:
            assert time.monotonic() < deadline and procs[0].poll() is None, _logs(tmp_path)
            time.sleep(0.05)
        procs[0].send_signal(signal.SIGKILL)  # mid-run: round 4 is in flight
        procs[0].wait(timeout=10)
        killed_at = _rounds_recorded(db)
        assert 3 <= killed_at < 6
        procs[0] = _spawn(server_args, tmp_path / "server2.log")  # the same command again
        assert procs[0].wait(timeout=300) == 0, _logs(tmp_path)
        for p in procs[1:]:
            assert p.wait(timeout=60) == 0, _logs(tmp_path)
    finally:
        _stop_all(procs)
    assert "resumed from round" in (tmp_path / "server2.log").read_text()
    with sqlite3.connect(db) as con:
        rounds = [r[0] for r in con.execute("SELECT round FROM rounds ORDER BY round")]
    assert rounds == [1, 2, 3, 4, 5, 6]  # every round recorded exactly once
    deployed = _final_params(tmp_path / "out")
    simulated = _simulated(config)
    for k in deployed:
        assert torch.equal(deployed[k], simulated[k]), k


def _simulated_history(config: Path) -> list[dict]:
    cfg = load_config(config)
    run = build_run(cfg.model_copy(update={"run": cfg.run.model_copy(update={"store": None})}), engine="sequential")
    return [r.to_dict() for r in run.federation.run(cfg.run.rounds)]


@pytest.mark.parametrize("mode", ["central", "sample"])
def test_deployed_private_run_reports_the_simulations_epsilon(tmp_path: Path, mode: str) -> None:
    """Server and client processes: clipping (or DP-SGD) in the clients, noise from OS entropy, the same ε."""
    import json

    port = _free_port()
    privacy = (
        'mode = "central"\nnoise_multiplier = 1.0\nclip_norm = 0.5\nadaptive_clipping = true\ncount_stddev = 1.0'
        if mode == "central"
        else 'mode = "sample"\ntarget_epsilon = 3.0\nclip_norm = 1.0'
    )
    config = tmp_path / "private.toml"
    config.write_text(
        f"""
[run]
name = "private"
seed = 2
rounds = 3
[data]
name = "hospital"
[model]
name = "mlp"
hidden = [16]
[strategy]
name = "fedavg"
fraction = 1.0
sampling = "poisson"
[client]
batch_size = 64
lr = 0.003
optimizer = "adam"
max_steps = 15
[privacy]
{privacy}
[deploy]
address = "127.0.0.1:{port}"
insecure = true
min_clients = 3
round_retries = 0
wait_timeout = 120
round_timeout = 120
"""
    )
    if mode == "sample":  # a deployed server cannot calibrate on example counts it does not know: give σ
        config.write_text(config.read_text().replace("target_epsilon = 3.0", "noise_multiplier = 1.3"))
    sites = ["hospital-A", "hospital-B", "hospital-C"]
    procs = [_spawn(["server", str(config), "--out", str(tmp_path / "out"), "--insecure"], tmp_path / "server.log")]
    try:
        for cid in sites:
            procs.append(
                _spawn(["client", "--server", f"127.0.0.1:{port}", "--data", str(config), "--insecure", "--client-id", cid], tmp_path / f"{cid}.log")
            )
        assert procs[0].wait(timeout=300) == 0, _logs(tmp_path)
        for p in procs[1:]:
            assert p.wait(timeout=60) == 0, _logs(tmp_path)
    finally:
        _stop_all(procs)
    server_log = (tmp_path / "server.log").read_text()
    assert "noise os" in server_log, server_log  # a deployment draws its noise from OS entropy
    deployed = json.loads((tmp_path / "out" / "history.json").read_text())
    simulated = _simulated_history(config)
    assert [r["metrics"]["dp_epsilon"] for r in deployed] == [r["metrics"]["dp_epsilon"] for r in simulated]
    assert all(sorted(d["clients"]) == sites for d in deployed)
    assert all("train_loss" not in d["metrics"] for d in deployed)
    # the noise was not the seeded simulation's: the models differ
    assert [r["metrics"]["test_mae"] for r in deployed] != [r["metrics"]["test_mae"] for r in simulated]
