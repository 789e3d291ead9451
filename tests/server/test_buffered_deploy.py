"""Buffered asynchronous rounds deployed: `fedloom server` with a fast and a slow `fedloom client` process.

The slow client's update lands after the fast one has moved the model on several versions:
it is accepted with its staleness, and the fast client contributes most versions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_processes import _free_port, _logs, _spawn, _stop_all  # noqa: E402

pytestmark = pytest.mark.slow


def test_fedbuff_with_a_fast_and_a_slow_client_process(tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "fedbuff.toml"
    config.write_text(
        f"""
[run]
name = "fedbuff"
seed = 1
rounds = 12
[data]
name = "mnist"
num_clients = 2
[model]
name = "2nn"
[strategy]
name = "fedavg"
fraction = 1.0
[client]
batch_size = 10
lr = 0.05
max_steps = 5
[buffer]
size = 1
concurrency = 2
max_staleness = 50
[deploy]
address = "127.0.0.1:{port}"
insecure = true
min_clients = 2
wait_timeout = 120
round_timeout = 120
heartbeat_interval = 0.5
max_pull_wait = 0.5
"""
    )
    procs = [_spawn(["server", str(config), "--out", str(tmp_path / "out"), "-q"], tmp_path / "server.log")]
    try:
        for cid, delay in (("client-000", "0.25"), ("client-001", "1.5")):
            args = ["client", "--server", f"127.0.0.1:{port}", "--data", str(config), "--insecure", "--client-id", cid]
            procs.append(_spawn([*args, "--delay", delay], tmp_path / f"{cid}.log"))
        assert procs[0].wait(timeout=240) == 0, _logs(tmp_path)
        for p in procs[1:]:
            assert p.wait(timeout=60) == 0, _logs(tmp_path)
    finally:
        _stop_all(procs)
    rounds = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [r["round"] for r in rounds] == list(range(1, 13))
    assert all(r["status"] == "ok" and len(r["clients"]) == 1 for r in rounds), rounds
    fast = [r for r in rounds if r["clients"] == ["client-000"]]
    slow = [r for r in rounds if r["clients"] == ["client-001"]]
    # the fast client answers every ~0.25 s, the slow one every ~1.5 s: it cannot win most versions
    assert len(fast) > len(slow) >= 1, rounds
    # the slow client started from version 0 and the fast one applied at least once before it landed
    assert slow[0]["metrics"]["staleness_max"] >= 1, slow
    assert all(r["metrics"]["staleness_max"] == 0 for r in fast[:1])
    clocks = [r["metrics"]["clock_s"] for r in rounds]
    assert clocks == sorted(clocks) and clocks[-1] >= 1.5  # real seconds since the start


def test_a_stopped_buffered_deployment_resumes_and_re_dispatches_its_flights(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """In-process (the real gRPC server, agents in threads): stop after 3 applies with clients in
    flight, start again from the store: the in-flight work is sent again, the run goes on."""
    import logging

    from fedloom.core.config import parse_config
    from test_deploy import _deploy

    def go(rounds: int):  # type: ignore[no-untyped-def]
        cfg = parse_config(
            {
                "run": {"name": "buffered", "seed": 2, "rounds": rounds, "store": str(tmp_path / "store.db")},
                "data": {"name": "hospital"},
                "model": {"name": "mlp", "hidden": [16]},
                "strategy": {"name": "fedavg", "fraction": 1.0},
                "client": {"epochs": 1, "batch_size": 64, "lr": 0.01, "max_steps": 4},
                "buffer": {"size": 1, "concurrency": 3},
                "deploy": {"address": "127.0.0.1:0", "insecure": True, "min_clients": 3, "wait_timeout": 30,
                           "round_timeout": 30, "heartbeat_interval": 0.5, "max_pull_wait": 0.5},
            }
        )  # fmt: skip
        run, _ = _deploy(cfg)  # the three hospitals as agents in threads
        run.federation.store.close()  # type: ignore[union-attr]
        return run

    first = go(3)
    flying = first.federation.state.meta["schedule"]["flights"]
    assert len(flying) == 2  # concurrency 3 less the arrival that closed the last buffer
    with caplog.at_level(logging.INFO, logger="fedloom.federation"):
        second = go(6)
    assert second.federation.resumed_from == 3
    assert [r.round for r in second.federation.history] == [1, 2, 3, 4, 5, 6]
    assert all(r.status == "ok" for r in second.federation.history)
    assert any("re-dispatching" in m for m in caplog.messages)
    clocks = [r.metrics["clock_s"] for r in second.federation.history]
    assert clocks == sorted(clocks)  # the clock goes on from where the first run stopped
