"""A two-level deployment as real processes: `fedloom server` (the root), two `fedloom edge`
processes and four `fedloom client` processes reach the hierarchical simulation's model; an
edge refuses a client that is not in its roster, and the root refuses a plain client.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_processes import _final_params, _free_port, _logs, _simulated, _spawn, _stop_all  # noqa: E402

pytestmark = pytest.mark.slow


def test_root_two_edges_four_clients_equal_the_simulation(tmp_path: Path) -> None:
    root, edge_a, edge_b = _free_port(), _free_port(), _free_port()
    config = tmp_path / "hier.toml"
    config.write_text(
        f"""
[run]
name = "hier"
seed = 4
rounds = 3
[data]
name = "mnist"
num_clients = 4
[model]
name = "2nn"
[strategy]
name = "fedavg"
fraction = 0.5
[client]
batch_size = 10
lr = 0.05
max_steps = 8
[hierarchy]
kappa = 2
edges = {{ edge-a = ["client-000", "client-001"], edge-b = ["client-002", "client-003"] }}
[deploy]
address = "127.0.0.1:{root}"
insecure = true
min_clients = 2
wait_timeout = 120
round_timeout = 120
heartbeat_interval = 0.5
max_pull_wait = 0.5
"""
    )
    procs = [_spawn(["server", str(config), "--out", str(tmp_path / "out"), "-q"], tmp_path / "root.log")]
    try:
        for edge, port in (("edge-a", edge_a), ("edge-b", edge_b)):
            args = ["edge", str(config), "--edge", edge, "--server", f"127.0.0.1:{root}", "--listen", f"127.0.0.1:{port}"]
            procs.append(_spawn([*args, "--insecure"], tmp_path / f"{edge}.log"))
        clients = [("client-000", edge_a), ("client-001", edge_a), ("client-002", edge_b), ("client-003", edge_b)]
        for cid, port in clients:
            args = ["client", "--server", f"127.0.0.1:{port}", "--data", str(config), "--insecure", "--client-id", cid]
            procs.append(_spawn(args, tmp_path / f"{cid}.log"))
        # a client of edge-b knocking at edge-a, and a client at the root: both refused at registration
        stranger = ["client", "--server", f"127.0.0.1:{edge_a}", "--data", str(config), "--insecure", "--client-id", "client-003"]
        intruder = ["client", "--server", f"127.0.0.1:{root}", "--data", str(config), "--insecure", "--client-id", "client-000"]
        refused = [_spawn(stranger, tmp_path / "stranger.log"), _spawn(intruder, tmp_path / "intruder.log")]
        for p in refused:
            assert p.wait(timeout=120) != 0, _logs(tmp_path)
        assert procs[0].wait(timeout=300) == 0, _logs(tmp_path)
        for p in procs[1:]:
            assert p.wait(timeout=60) == 0, _logs(tmp_path)
    finally:
        _stop_all(procs)
    def said(name: str) -> str:  # the log, lines unwrapped
        return " ".join((tmp_path / name).read_text().split())

    assert "'client-003' is not in the roster of edge 'edge-a'" in said("stranger.log")
    assert "'client-000' is not in the roster of the root (its clients are the edges)" in said("intruder.log")
    assert "edge edge-a: 3 rounds forwarded" in said("edge-a.log")
    deployed = _final_params(tmp_path / "out")
    simulated = _simulated(config)
    for k in deployed:
        assert torch.equal(deployed[k], simulated[k]), k
