"""A deployment across network namespaces: one host per process, faulty links, a client killed mid-round.

Topology (all of it in namespaces this test creates; nothing touches the host's network)::

    ns srv 10.77.0.1   fedloom server (TLS, mutual auth)
    ns prx 10.77.0.2   one fault proxy per client link (delay, jitter, random resets)
    ns c1  10.77.0.11  hospital-A ─┐  (the victim: its uplink shaped with tbf)
    ns c2  10.77.0.12  hospital-B  ├─ each via its own proxy port 10.77.0.2:900N
    ns c3  10.77.0.13  hospital-C ─┘

Every host namespace has one veth to a bridge in a sixth namespace. The kernel here has no
``netem``, so latency and losses come from the fault proxy (tests/server/faultproxy.py);
the victim's uplink is rate-shaped with ``tbf`` (or by its proxy where tc is missing), so
its upload takes seconds: it is SIGKILLed while it uploads its second update. Later the
proxies reset every connection at once. The server must finish every round without the
victim, and the survivors must reconnect and keep contributing.

Needs root and ``ip netns``; skipped otherwise.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

PREFIX = f"flnt{os.getpid()}"
SERVER_IP, PROXY_IP = "10.77.0.1", "10.77.0.2"
SERVER_PORT = 8765
SERVER_NAME = "fedloom-server"  # a SAN of the server certificate: clients dial the proxy, not the server
ROUNDS = 6
VICTIM = "hospital-A"  # stays in [5, 15] days: B and C still cover the whole range without it
# per client: its namespace, address, proxy port and link faults (proxy options)
CLIENTS = {
    "hospital-A": ("c1", "10.77.0.11", 9001, ["--delay", "0.03"]),
    "hospital-B": ("c2", "10.77.0.12", 9002, ["--delay", "0.04", "--cut-prob", "0.005"]),
    "hospital-C": ("c3", "10.77.0.13", 9003, ["--delay", "0.02", "--jitter", "0.01"]),
}
VICTIM_RATE = "256kbit"  # its ~80 kB update then takes ~2.5 s to upload (< heartbeat_timeout)
PROXY = Path(__file__).with_name("faultproxy.py")
ROUND_LINE = re.compile(r"^round\s+(\d+)\s+\d+ cl\b", re.MULTILINE)  # report.round_line
TRAINED = re.compile(r"round (\d+): trained on")


def _fedloom() -> list[str]:
    script = Path(sys.executable).with_name("fedloom")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedloom.cli"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_namespace(name: str) -> None:
    """Kill what runs in namespace ``name`` (only namespaces this test module created) and delete it."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    for _ in range(50):
        if not _ip("netns", "pids", name, check=False).stdout.split():
            break
        time.sleep(0.1)
    _ip("netns", "del", name, check=False)


def _sweep_stale() -> None:
    """Remove namespaces left by an earlier run of this test that was killed before its cleanup."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = re.match(r"^(flnt(\d+)-\w+)", line)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            _delete_namespace(m.group(1))


def _unavailable() -> str | None:
    """Why this machine cannot run the test (None if it can)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe_a, probe_b = f"{PREFIX}-pa", f"{PREFIX}-pb"
    try:
        for cmd in (
            ["netns", "add", probe_a],
            ["netns", "add", probe_b],
            ["-n", probe_b, "link", "add", "br0", "type", "bridge"],
            ["link", "add", "eth0", "netns", probe_a, "type", "veth", "peer", "name", "p0", "netns", probe_b],
        ):
            res = _ip(*cmd, check=False)
            if res.returncode != 0:
                return f"`ip {' '.join(cmd)}` failed: {res.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` does not work here: {exc}"
    finally:
        for ns in (probe_a, probe_b):
            _ip("netns", "del", ns, check=False)
    return None


def _tbf_works(ns: str) -> bool:
    if shutil.which("tc") is None:
        return False
    res = subprocess.run(
        ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
         "rate", VICTIM_RATE, "burst", "4kb", "latency", "2s"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return res.returncode == 0


class Network:
    """The namespaces, links and processes of one test; :meth:`close` removes all of them."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.namespaces: list[str] = []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.bridge = self.namespace("br")
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "COLUMNS": "240",
            "TERM": "dumb",
        }

    def namespace(self, role: str) -> str:
        name = f"{PREFIX}-{role}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def host(self, role: str, address: str) -> str:
        """A namespace with ``eth0`` at ``address``/24, cabled to the bridge."""
        ns = self.namespace(role)
        port = f"p-{role}"
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.bridge)
        _ip("-n", self.bridge, "link", "set", port, "master", "br0")
        _ip("-n", self.bridge, "link", "set", port, "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        return ns

    def start(self, name: str, ns: str, argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` in namespace ``ns``, its stdout and stderr in logs/NAME.out and .err."""
        out = open(self.logs / f"{name}.out", "wb")  # noqa: SIM115  (closed with the process)
        err = open(self.logs / f"{name}.err", "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=err, cwd=cwd, env=self.env)
        finally:
            out.close()
            err.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str, stream: str = "out") -> str:
        try:
            return (self.logs / f"{name}.{stream}").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def dump_logs(self) -> None:
        for path in sorted(self.logs.iterdir()):
            text = path.read_text(errors="replace")
            print(f"\n===== {path.name} ({len(text)} chars, last 6000) =====\n{text[-6000:]}")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.namespaces):
            _delete_namespace(ns)
        self.namespaces.clear()


@pytest.fixture()
def network(tmp_path: Path) -> Iterator[Network]:
    why = _unavailable()
    if why is not None:
        pytest.skip(why)
    _sweep_stale()
    logs = tmp_path / "logs"
    logs.mkdir()
    net = None
    try:
        net = Network(logs)
        yield net
    finally:
        if net is not None:
            net.close()
        else:  # failed while building: remove whatever was made
            for line in _ip("netns", "list", check=False).stdout.splitlines():
                if line.startswith(f"{PREFIX}-"):
                    _delete_namespace(line.split()[0])
    leftovers = [ln for ln in _ip("netns", "list", check=False).stdout.splitlines() if ln.startswith(f"{PREFIX}-")]
    assert not leftovers, f"namespaces left behind: {leftovers}"


def _config(tmp_path: Path, pki: Path, *, store: bool = True, name: str = "netns") -> Path:
    cfg = tmp_path / f"{name}.toml"
    store_line = f'store = "{tmp_path / "store.db"}"' if store else ""
    cfg.write_text(
        f"""
[run]
name = "{name}"
rounds = {ROUNDS}
seed = 1
{store_line}

[data]
name = "hospital"

[model]
name = "mlp"
hidden = [128, 128]

[strategy]
name = "fedavg"
fraction = 1.0

[client]
epochs = 5
batch_size = 32
lr = 0.01

[deploy]
address = "{SERVER_IP}:{SERVER_PORT}"
credentials = "{pki / 'server'}"
insecure = false
min_clients = 2
wait_timeout = 120
round_timeout = 20
heartbeat_interval = 1
heartbeat_timeout = 6
over_selection = 0.0
round_retries = 2
"""
    )
    return cfg


def _proxy_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class _Clock:
    def __init__(self, budget: float) -> None:
        self.end = time.monotonic() + budget

    def wait_for(self, what: str, cond, procs: dict[str, subprocess.Popen[bytes]]) -> None:  # type: ignore[no-untyped-def]
        """Poll ``cond`` until it holds; fail if the budget runs out or the server dies first."""
        while not cond():
            server = procs.get("server")
            if server is not None and server.poll() is not None and not cond():
                raise AssertionError(f"the server exited ({server.returncode}) while waiting for {what}")
            if time.monotonic() > self.end:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.1)


def test_deployment_survives_a_killed_client_and_cut_links(network: Network, tmp_path: Path) -> None:
    net = network
    try:
        _run_scenario(net, tmp_path)
    except BaseException:
        net.dump_logs()
        raise


def _run_scenario(net: Network, tmp_path: Path) -> None:
    t_start = time.monotonic()
    fedloom = _fedloom()
    pki = tmp_path / "pki"
    subprocess.run(
        [*fedloom, "certs", "init", str(pki), "--host", SERVER_IP, "--host", SERVER_NAME,
         *[a for cid in CLIENTS for a in ("--client", cid)]],
        check=True, capture_output=True, timeout=120, cwd=tmp_path, env=net.env,
    )  # fmt: skip
    cfg = _config(tmp_path, pki)
    out = tmp_path / "out"

    srv = net.host("srv", SERVER_IP)
    prx = net.host("prx", PROXY_IP)
    hosts = {cid: net.host(role, addr) for cid, (role, addr, _, _) in CLIENTS.items()}
    shaped = _tbf_works(hosts[VICTIM])
    print(f"victim uplink shaped by {'tbf' if shaped else 'its proxy'} ({VICTIM_RATE})")

    # one fault proxy per client link, in the proxy host
    stats = {cid: tmp_path / f"proxy-{cid}.json" for cid in CLIENTS}
    for i, (cid, (_, _, port, faults)) in enumerate(CLIENTS.items()):
        extra = [] if shaped or cid != VICTIM else ["--rate", "32000"]
        net.start(
            f"proxy-{cid}", prx,
            [sys.executable, str(PROXY), "--listen", f"{PROXY_IP}:{port}", "--target", f"{SERVER_IP}:{SERVER_PORT}",
             "--seed", str(100 + i), "--stats", str(stats[cid]), *faults, *extra],
            tmp_path,
        )  # fmt: skip
    clock = _Clock(budget=300)
    for cid in CLIENTS:
        clock.wait_for(f"proxy {cid}", lambda cid=cid: "listening" in net.log(f"proxy-{cid}"), net.procs)

    net.start("server", srv, [*fedloom, "server", str(cfg), "--out", str(out)], tmp_path)
    for cid, (_, _, port, _) in CLIENTS.items():
        net.start(
            cid, hosts[cid],
            [*fedloom, "client", "--server", f"{PROXY_IP}:{port}", "--data", str(cfg),
             "--credentials", str(pki / "clients" / cid), "--server-name", SERVER_NAME, "--give-up-after", "20", "-v"],
            tmp_path,
        )  # fmt: skip

    def rounds_done() -> int:
        return len(ROUND_LINE.findall(net.log("server")))

    def trained_rounds(cid: str) -> list[int]:
        return [int(r) for r in TRAINED.findall(net.log(cid, "err"))]

    def victim_trained() -> list[int]:
        return trained_rounds(VICTIM)

    # 1. kill the victim while it uploads its second update (its shaped uplink makes that take seconds)
    clock.wait_for("the victim's second local training", lambda: len(victim_trained()) >= 2, net.procs)
    net.procs[VICTIM].send_signal(signal.SIGKILL)
    trained = victim_trained()
    kill_round = trained[1]
    assert net.procs[VICTIM].wait(timeout=30) == -signal.SIGKILL
    print(f"killed {VICTIM} in round {kill_round} after {time.monotonic() - t_start:.1f} s (it trained in {trained})")

    # 2. while that round waits for the dead victim (heartbeat_timeout), the survivors sit in long
    #    polls: reset every link under them
    survivors = [cid for cid in CLIENTS if cid != VICTIM]
    clock.wait_for(
        f"the survivors' round-{kill_round} updates",
        lambda: all(kill_round in trained_rounds(cid) for cid in survivors) or rounds_done() >= kill_round,
        net.procs,
    )
    time.sleep(1.0)  # let them push and go back to pulling
    before = {cid: _proxy_stats(stats[cid]).get("connections", 0) for cid in survivors}
    registrations = {cid: net.log(cid, "err").count("registered with") for cid in survivors}
    for cid in CLIENTS:
        net.procs[f"proxy-{cid}"].send_signal(signal.SIGUSR1)
    cut_round = rounds_done() + 1
    print(f"cut all links in round {cut_round} after {time.monotonic() - t_start:.1f} s")

    # 3. the run ends; the survivors are told so and exit
    clock.wait_for("the server to finish", lambda: net.procs["server"].poll() is not None, net.procs)
    server_rc = net.procs["server"].returncode
    print(f"server exited {server_rc} after {time.monotonic() - t_start:.1f} s")
    for cid in survivors:
        try:
            net.procs[cid].wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    for cid in CLIENTS:
        net.procs[f"proxy-{cid}"].send_signal(signal.SIGTERM)
    for cid in CLIENTS:
        net.procs[f"proxy-{cid}"].wait(timeout=30)
    final = {cid: _proxy_stats(stats[cid]) for cid in CLIENTS}
    print("proxy stats:", json.dumps(final, indent=1))

    assert server_rc == 0, "the server failed"
    history = json.loads((out / "history.json").read_text())
    records = history["rounds"] if isinstance(history, dict) else history
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
    for r in records:
        print(f"round {r['round']}: {r['status']} clients={r['clients']} rejected={r['rejected']} "
              f"test_rmse={r['metrics'].get('test_rmse')}")  # fmt: skip
    assert all(r["status"] == "ok" and r["clients"] for r in records)

    # the victim contributed before its death and never after
    by_round = {r["round"]: set(r["clients"]) for r in records}
    assert any(VICTIM in by_round[rnd] for rnd in range(1, kill_round)), "the victim never contributed"
    assert all(VICTIM not in by_round[rnd] for rnd in range(kill_round, ROUNDS + 1))
    server_log = net.log("server", "err")
    assert re.search(rf"{VICTIM}.*stopped answering heartbeats", server_log), "the victim was not counted out"

    # the survivors reconnected after the cut and kept contributing
    assert sum(final[cid]["forced_cuts"] for cid in survivors) >= 1, "the cut found no live connection"
    reregistered = [cid for cid in survivors if net.log(cid, "err").count("registered with") > registrations[cid]]
    assert reregistered, "no survivor noticed the cut (its long poll should have failed)"
    for cid in survivors:
        assert final[cid]["connections"] > before[cid], f"{cid} never reconnected after the cut"
        assert any(cid in by_round[rnd] for rnd in range(cut_round + 1, ROUNDS + 1)), f"{cid} absent after the cut"
        rc = net.procs[cid].returncode
        # 0: told that the run is over; a random reset may make it miss that and give up later instead
        assert rc == 0 or (rc == 1 and "giving up" in net.log(cid)), f"{cid} exited {rc}:\n{net.log(cid, 'err')[-3000:]}"

    # the model still learned: far better than the untrained one. (Not "better than round 1": which
    # clients made round 1 depends on who registered first, and the survivors alone plateau.)
    rmse = [r["metrics"]["test_rmse"] for r in records if r["metrics"].get("test_rmse") is not None]
    assert len(rmse) == ROUNDS and all(math.isfinite(v) for v in rmse)
    initial = _initial_rmse(_config(tmp_path, pki, store=False, name="reference"))
    print(f"test_rmse: untrained {initial:.3f}, rounds {[round(v, 3) for v in rmse]}")
    assert rmse[-1] < initial / 2, f"test_rmse {rmse[-1]} is not much better than the untrained model's {initial}"
    print(f"scenario took {time.monotonic() - t_start:.1f} s")


def _initial_rmse(cfg_path: Path) -> float:
    """The server-side test RMSE of the config's initial (untrained) model, computed here."""
    from fedloom.core.config import load_config
    from fedloom.run import build_run

    run = build_run(load_config(cfg_path), engine="sequential")
    assert run.federation.evaluate is not None
    return float(run.federation.evaluate(run.federation.state.params)["rmse"])
