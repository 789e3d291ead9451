"""Chaos benchmark of a deployed fedloom run: a real server and clients killed at random, and hostile sites.

Method. Everything runs on loopback, as separate OS processes, with mutual TLS:

* a PKI (:mod:`fedloom.server.certs`): a CA, the server's credentials and one client
  certificate per site, honest or hostile, each its own identity;
* the **server**: ``fedloom server CONFIG`` with a run store (``run.store``), so that a
  killed server started again with the same command resumes from its latest checkpoint.
  The config is the hospital scenario (length-of-stay regression, the ``mlp`` of
  ``examples/hospital.toml``), FedAvg with every live client in every round (fraction 1.0),
  and short ``[deploy]`` timeouts (round, heartbeat, stream idle, long poll: seconds) so that
  the run takes minutes;
* **N honest clients**: ``fedloom client --data SITE.npz`` (the real agent). The three
  hospitals' training and test rows are split into N sites (``hospital-A-1``,
  ``hospital-B-1``, ... ``hospital-A-2``...), written as the ``.npz`` files a real site passes;
* **M hostile sites** (``bench/_hostile.py``, one process, a thread per site): authenticated
  sites that register like honest ones, so the sampler selects them, and attack the
  service with the raw gRPC stubs: stall, hammer, slowloris, drip, replay, forged, nan,
  oversized, inflate, malformed, churn (see that module; ``--attacks drip:4`` runs four
  sites, four identities, with one attack). Each push they make is tallied as accepted
  (``PushReply.accepted``) or refused, with the reason;
* **kills**: a seeded schedule SIGKILLs honest clients (``--client-kills``) and the server
  (``--server-kills``), each at a random moment inside a chosen round (a delay after the
  previous round was recorded), and starts the same command again after a random
  0.5-2 s. At most one kill per round, in rounds 2..R-1 (a restarted client has a round left).
  ``deploy.min_clients`` is N + M: a round starts only once every honest client is live.

While it runs, the bench samples the server's VmRSS, thread count and CPU time
(``/proc/<pid>/status`` and ``stat``, every 0.5 s, per server incarnation), polls the store
(read-only) for each round's record time (a round recorded again after a restart shows up as
a second time), and follows the honest clients' ``-v`` logs (when each registered, finished
training a round, had a result refused) and the server's round lines, all written with the
time it saw them to ``timeline.log`` in the work directory. Everything it started is killed
on exit, error or Ctrl-C, and a global ``--timeout`` bounds the whole run.

Afterwards it reads the store with its Python API (:class:`fedloom.store.Store`: the round
records, which clients' updates each round aggregated and which it rejected with what
reason) and the server's logs (per round, the clients whose task failed or was dropped
unanswered: with the store's accepted and rejected ones, the round's cohort). Measured:

* rounds recorded vs requested, each of 1..R exactly once, all ``ok``; rounds re-recorded;
* honest updates accepted / expected, where expected = the honest clients in a round's cohort
  that no kill disrupted (a kill of that client from ``heartbeat_timeout + heartbeat_interval
  + 1`` s before the round started to its end); a missed one is listed with what the server
  logged and what the client's log says (when it finished training, the server's answer);
  the disrupted ones, and honest clients registered and up but left out of a cohort, apart;
* per attack: pushes accepted by the service (``PushReply.accepted``) and refused, by reason;
  what each accepted push became (the store: aggregated, or rejected by the round's
  pipeline, e.g. the weighting stage); the rounds whose aggregate included an attack (target
  0: only a hostile site's legitimate or probe pushes may be aggregated);
* kills and restarts; per server incarnation its RSS (first, median, max, last, slope),
  threads, CPU and log volume; the longest round against its bound (``wait_timeout +
  (round_retries + 1) x round_timeout + 15`` s); the wall time.

The JSON gets a ``checks`` table; the exit status is 0 when every check passed, 2 when a
check failed (results still written: they are the finding), 1 when the bench could not run
(no results written; the work directory is kept, with every log).

Usage:
    python bench/chaos.py --json bench/results/chaos_cpu.json [--honest 4] [--attacks all]
        [--rounds 12] [--client-kills 2] [--server-kills 1] [--seed 0] [--round-timeout 15]
        [--timeout 900] [--keep]

    # four authenticated sites dripping one byte per 1.2 s into their uploads, honest sites idle:
    python bench/chaos.py --json /tmp/drip.json --honest 2 --attacks drip:4 --rounds 4 \
        --round-timeout 8 --round-retries 0 --client-kills 0 --server-kills 0

A Markdown table is written beside the JSON (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from _hostile import KINDS, REGISTERED_EXAMPLES, hostile_sites  # noqa: E402 - bench/ is not a package

FEDLOOM = str(Path(sys.executable).parent / "fedloom")
RUN_NAME = "chaos"
HOSPITALS = ("hospital-A", "hospital-B", "hospital-C")
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SAMPLE_EVERY = 0.5


class BenchError(RuntimeError):
    """The bench cannot go on (setup failed, a process crashed, the global timeout passed)."""


@dataclass(frozen=True)
class Settings:
    """One run's size, schedule and ``[deploy]`` timeouts (the command-line options)."""

    honest: int
    attacks: tuple[str, ...]  # attack specs: kind, or kind:count for that many sites running it
    rounds: int
    client_kills: int
    server_kills: int
    seed: int
    round_timeout: float
    idle_timeout: float
    heartbeat_interval: float
    heartbeat_timeout: float
    wait_timeout: float
    max_pull_wait: float
    round_retries: int
    max_workers: int
    timeout: float

    @property
    def hostile(self) -> list[tuple[str, str]]:
        """(client id, attack) of each hostile site."""
        return hostile_sites(self.attacks)

    @property
    def round_bound_s(self) -> float:
        """The longest a round may take: waiting for clients, every attempt's deadline, and 15 s for the rest."""
        return self.wait_timeout + (self.round_retries + 1) * self.round_timeout + 15.0


@dataclass
class Proc:
    """A process the bench started."""

    role: str  # server | honest | hostile
    name: str
    incarnation: int
    popen: subprocess.Popen[bytes]
    log: Path
    started: float
    ended: float | None = None
    exit_code: int | None = None
    killed: bool = False
    listening: float | None = None  # server: when it logged that it listens
    samples: list[tuple[float, int, int, float]] = field(default_factory=list)  # (time, VmRSS kB, threads, CPU s)
    log_offset: int = 0


@dataclass
class PlannedKill:
    target: str  # server | client
    round: int  # killed while this round is in flight
    delay: float  # seconds after the previous round was recorded
    restart_after: float
    victim: str | None = None  # the honest client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_status(pid: int) -> tuple[int, int, float] | None:
    """(VmRSS in kB, threads, CPU seconds) of a live process; None if it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rss = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    threads = re.search(r"^Threads:\s+(\d+)", text, re.M)
    if rss is None or threads is None:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state is field 3, utime and stime 14 and 15
    return int(rss.group(1)), int(threads.group(1)), (int(fields[11]) + int(fields[12])) / CLK_TCK


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


# ---------------------------------------------------------------------------- setup
def write_sites(directory: Path, n: int, seed: int) -> dict[str, Path]:
    """Split the hospital scenario's three sites into ``n`` ``.npz`` sites; return id -> file."""
    from fedloom.data.base import ClientData, Split
    from fedloom.data.local import save_npz
    from fedloom.data.registry import load_dataset

    dataset = load_dataset("hospital", seed=seed)
    owners = [HOSPITALS[j % len(HOSPITALS)] for j in range(n)]
    parts = Counter(owners)
    rng = np.random.default_rng(seed)
    perms: dict[tuple[str, str], np.ndarray] = {}
    for h in parts:
        data = dataset.clients[h]
        assert data.test is not None
        perms[h, "train"] = rng.permutation(len(data.train))
        perms[h, "test"] = rng.permutation(len(data.test))
    directory.mkdir(parents=True, exist_ok=True)
    taken: Counter[str] = Counter()
    sites: dict[str, Path] = {}
    for h in owners:
        k = taken[h]
        taken[h] += 1
        data = dataset.clients[h]
        assert data.test is not None

        def part(split: Split, which: str) -> Split:
            idx = np.array_split(perms[h, which], parts[h])[k]  # noqa: B023 - used at once
            t = np.sort(idx)
            return Split(split.x[t], split.y[t])

        site = f"{h}-{k + 1}"
        path = directory / f"{site}.npz"
        save_npz(path, ClientData(train=part(data.train, "train"), test=part(data.test, "test"), site=site))
        sites[site] = path
    return sites


def write_pki(directory: Path, client_ids: list[str]) -> None:
    from fedloom.server import certs

    certs.create_ca(directory / "ca")
    certs.issue_server(directory / "ca", directory / "server", hosts=["localhost", "127.0.0.1"])
    for cid in client_ids:
        certs.issue_client(directory / "ca", directory / "clients" / cid, cid)


def write_config(path: Path, s: Settings, *, port: int, store: Path, credentials: Path) -> None:
    # Every site: a round starts only once all honest clients are live (hostile sites cannot make up the
    # number for a missing one; churn counts only at the moments it is registered, which the wait notices).
    min_clients = s.honest + len(s.hostile)
    path.write_text(
        f"""# bench/chaos.py: the hospital scenario deployed with short timeouts
[run]
name = "{RUN_NAME}"
seed = {s.seed}
rounds = {s.rounds}
store = "{store}"

[data]
name = "hospital"

[model]
name = "mlp"
hidden = [64, 32]

[strategy]
name = "fedavg"
fraction = 1.0

[client]
epochs = 1
batch_size = 64
lr = 0.001
optimizer = "adam"
loss = "huber"
max_steps = 20

[deploy]
address = "127.0.0.1:{port}"
credentials = "{credentials}"
min_clients = {min_clients}
wait_timeout = {s.wait_timeout}
round_timeout = {s.round_timeout}
round_retries = {s.round_retries}
heartbeat_interval = {s.heartbeat_interval}
heartbeat_timeout = {s.heartbeat_timeout}
stream_idle_timeout = {s.idle_timeout}
max_pull_wait = {s.max_pull_wait}
max_workers = {s.max_workers}
"""
    )


# ---------------------------------------------------------------------------- log parsing
_WARNING = re.compile(r"^(?:WARNING|ERROR) (fedloom[\w.]*): (.*)$")
_ROUND_CLIENT = re.compile(r"^round (\d+): client '([^']+)': (.*)$")
_ROUND_DROPPED = re.compile(r"^round (\d+): dropped \d+ unanswered client\(s\) (\[[^\]]*\]): (.*?); late results")
_ROUND_REJECTED = re.compile(r"^round (\d+): rejected update from '([^']+)': (.*)$")
_RESUMED = re.compile(r"resumed from round (\d+)")
_TIMELINE_SERVER = re.compile(r"^(?:WARNING fedloom\.(?:server|federation): round \d+|│ +\d+ │|round +\d+ )|resumed|listening|Traceback")


def _warning_kind(message: str) -> str:
    """A server warning with its ids, peers and numbers blanked, so that warnings group."""
    m = re.sub(r"\((?:ipv4|ipv6|unix):[^)]*\)", "(peer)", message)
    m = re.sub(r"'[^']*'", "'…'", m)
    m = re.sub(r"\[[^\]]*\]", "[…]", m)
    m = re.sub(r"\b[0-9a-f]{8}\b", "…", m)
    return re.sub(r"\d+(\.\d+)?", "N", m)[:150]


@dataclass
class ServerLog:
    """What one server incarnation logged."""

    outcomes: dict[int, dict[str, str]] = field(default_factory=dict)  # round -> client -> why it gave no update
    resumed_from: int | None = None
    warnings: Counter[str] = field(default_factory=Counter)
    tracebacks: int = 0


def parse_server_log(path: Path) -> ServerLog:
    out = ServerLog()
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("Traceback"):
            out.tracebacks += 1
        m = _RESUMED.search(line)
        if m:
            out.resumed_from = int(m.group(1))
        w = _WARNING.match(line)
        if w is None:
            continue
        message = w.group(2)
        out.warnings[_warning_kind(message)] += 1
        if m := _ROUND_CLIENT.match(message):
            out.outcomes.setdefault(int(m.group(1)), {})[m.group(2)] = m.group(3)
        elif m := _ROUND_REJECTED.match(message):
            out.outcomes.setdefault(int(m.group(1)), {})[m.group(2)] = f"rejected: {m.group(3)}"
        elif m := _ROUND_DROPPED.match(message):
            for cid in ast.literal_eval(m.group(2)):
                out.outcomes.setdefault(int(m.group(1)), {}).setdefault(str(cid), f"dropped: {m.group(3)}")
    return out


def parse_client_log(path: Path) -> dict[str, Any]:
    text = path.read_text(errors="replace")
    refused = Counter(
        re.sub(r"\d+(\.\d+)?", "N", m.group(1)) for m in re.finditer(r"server refused our \w+: (.*)", text)
    )
    summary = re.search(r"client \S+: (\d+) training tasks, (\d+) evaluations, (\d+) reconnects, (\d+) results refused", text)
    return {
        "registrations": text.count("registered with"),
        "refused": dict(refused),
        "summary": None
        if summary is None
        else dict(zip(("tasks", "evaluations", "reconnects", "refused"), map(int, summary.groups()), strict=True)),
        "tracebacks": text.count("Traceback"),
    }


# ---------------------------------------------------------------------------- summaries
def series_summary(samples: list[tuple[float, int, int, float]], origin: float, until: float | None = None) -> dict[str, Any]:
    """RSS (MB), threads and CPU of one server incarnation: first, min, median, max, last; the RSS slope from
    10 s after its start to ``until`` (its last round, before it writes its outputs), when that spans at least
    60 s; and every 10th sample (time from the bench's start)."""
    if not samples:
        return {"samples": 0}
    t = [s[0] for s in samples]
    rss = [s[1] / 1024 for s in samples]
    threads = [s[2] for s in samples]
    out: dict[str, Any] = {
        "samples": len(samples),
        "seconds": round(t[-1] - t[0], 1),
        "rss_mb": {
            "first": round(rss[0], 1),
            "min": round(min(rss), 1),
            "median": round(statistics.median(rss), 1),
            "max": round(max(rss), 1),
            "last": round(rss[-1], 1),
        },
        "threads": {"min": min(threads), "median": statistics.median(threads), "max": max(threads), "last": threads[-1]},
        "cpu_s": round(samples[-1][3], 1),
        "cpu_utilization": round(samples[-1][3] / max(t[-1] - t[0], 1e-9), 2),
    }
    end = until if until is not None else t[-1]
    warm = [(ti, r) for ti, r in zip(t, rss, strict=True) if ti - t[0] >= 10.0 and ti <= end]
    if len(warm) >= 2 and warm[-1][0] - warm[0][0] >= 60.0:
        x = np.array([w[0] for w in warm])
        y = np.array([w[1] for w in warm])
        out["rss_slope_mb_per_min"] = round(float(np.polyfit(x - x[0], y, 1)[0]) * 60, 2)
        out["rss_slope_window_s"] = round(float(x[-1] - x[0]), 1)
    out["series_columns"] = ["t_s", "rss_mb", "threads"]
    out["series"] = [(round(ti - origin, 1), round(r, 1), th) for ti, r, th in list(zip(t, rss, threads, strict=True))[::10]]
    return out


# ---------------------------------------------------------------------------- the bench
class Chaos:
    """One chaos run (see the module docstring)."""

    def __init__(self, s: Settings, work: Path) -> None:
        self.s = s
        self.work = work
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.db = work / "fedloom.db"
        self.config = work / "chaos.toml"
        self.pki = work / "pki"
        self.port = _free_port()
        self.procs: list[Proc] = []
        self.server: Proc | None = None
        self.clients: dict[str, Proc] = {}
        self.hostile: Proc | None = None
        self.sites: dict[str, Path] = {}
        self.recorded: dict[int, float] = {}  # round -> its record's time, as the store has it now
        self.recordings: dict[int, list[float]] = {}  # round -> every record time seen
        self.registrations: list[tuple[float, str, int]] = []  # (time, honest client, its incarnation)
        self.timeline: list[tuple[float, str, str]] = []  # (time seen, process, line): honest logs, server round lines
        self.kills: list[dict[str, Any]] = []
        self.restarts: list[dict[str, Any]] = []
        self.unexpected_exits: list[dict[str, Any]] = []
        self.late_starters: list[tuple[str, int]] = []  # honest incarnations started too late to see the server
        self.hostile_cpu_s: float | None = None  # CPU seconds the hostile sites' process used (it shares the machine)
        self.plan: list[PlannedKill] = []
        self._sampling = threading.Event()
        self._lock = threading.Lock()
        self.t_start = 0.0
        self.t_end = 0.0
        self.load_at_start = [round(x, 2) for x in os.getloadavg()]

    # ------------------------------------------------------------ processes
    def _spawn(self, role: str, name: str, args: list[str]) -> Proc:
        incarnation = 1 + sum(1 for p in self.procs if p.role == role and p.name == name)
        log = self.logs / f"{name}-{incarnation}.log"
        with log.open("wb") as fh:
            popen = subprocess.Popen(
                args, stdout=fh, stderr=subprocess.STDOUT, env=CHILD_ENV, cwd=self.work, start_new_session=True
            )
        proc = Proc(role, name, incarnation, popen, log, started=time.time())
        with self._lock:
            self.procs.append(proc)
        return proc

    def _start_server(self) -> None:
        self.server = self._spawn("server", "server", [FEDLOOM, "server", str(self.config), "--out", str(self.work / "out")])

    def _start_client(self, site: str) -> None:
        args = [
            FEDLOOM, "client",
            "--server", f"localhost:{self.port}",
            "--data", str(self.sites[site]),
            "--credentials", str(self.pki / "clients" / site),
            "--give-up-after", "120",
            "-v",
        ]  # fmt: skip
        self.clients[site] = self._spawn("honest", site, args)

    def _start_hostile(self) -> None:
        args = [
            sys.executable, str(BENCH / "_hostile.py"),
            "--server", f"localhost:{self.port}",
            "--pki", str(self.pki),
            "--attacks", ",".join(self.s.attacks),
            "--out", str(self.work / "hostile.json"),
            "--heartbeat", str(self.s.heartbeat_interval),
            "--idle-timeout", str(self.s.idle_timeout),
            "--round-timeout", str(self.s.round_timeout),
            "--max-seconds", str(self.s.timeout),
        ]  # fmt: skip
        self.hostile = self._spawn("hostile", "hostile", args)

    @staticmethod
    def _signal(proc: Proc, sig: signal.Signals) -> None:
        try:
            os.killpg(proc.popen.pid, sig)  # its own session: the process and anything it started
        except ProcessLookupError:
            pass

    def _kill(self, proc: Proc) -> None:
        self._signal(proc, signal.SIGKILL)
        proc.exit_code = proc.popen.wait(timeout=30)
        proc.ended = time.time()
        proc.killed = True

    def write_timeline(self) -> None:
        """``timeline.log`` in the work directory: the honest clients' log lines and the server's round
        lines, each with the time the bench saw it (seconds from the start), and the kills."""
        events = [(t, proc, line) for t, proc, line in self.timeline]
        events += [(k["at"], "bench", f"SIGKILL {k['name']}-{k['incarnation']} (round {k['round_in_flight']} in flight)") for k in self.kills]
        events += [(p.started, "bench", f"started {p.name}-{p.incarnation} (pid {p.popen.pid})") for p in self.procs]
        with (self.work / "timeline.log").open("w") as fh:
            for t, proc, line in sorted(events, key=lambda e: e[0]):
                fh.write(f"{t - self.t_start:8.2f} {proc:>16} {line}\n")

    def cleanup(self) -> None:
        """Stop every process the bench started that still runs (TERM, then KILL)."""
        self._sampling.set()
        alive = [p for p in self.procs if p.popen.poll() is None]
        for p in alive:
            self._signal(p, signal.SIGTERM)
        end = time.monotonic() + 10
        for p in alive:
            try:
                p.popen.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(p, signal.SIGKILL)
                p.popen.wait(timeout=10)
            if p.ended is None:
                p.ended, p.exit_code = time.time(), p.popen.returncode
        if self.t_start:
            self.write_timeline()

    # ------------------------------------------------------------ watching
    def _sample_loop(self) -> None:
        while not self._sampling.wait(SAMPLE_EVERY):
            p = self.server
            if p is None or p.ended is not None:
                continue
            st = _proc_status(p.popen.pid)
            if st is not None:
                p.samples.append((time.time(), *st))

    def _poll_store(self) -> None:
        if not self.db.exists():
            return
        try:
            with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=1)) as con:
                rows = con.execute(
                    "SELECT r.round, r.recorded FROM rounds r JOIN runs u ON u.id = r.run_id WHERE u.name = ?", (RUN_NAME,)
                ).fetchall()
        except sqlite3.Error:
            return  # the server is creating the store, or writing: next time
        self.recorded = {int(r): float(t) for r, t in rows}
        for r, t in self.recorded.items():
            seen = self.recordings.setdefault(r, [])
            if not seen or seen[-1] != t:
                seen.append(t)

    def _scan_logs(self) -> None:
        for p in list(self.procs):
            if p.role == "hostile" or (p.ended is not None and p.log_offset >= p.log.stat().st_size):
                continue
            try:
                with p.log.open("rb") as fh:
                    fh.seek(p.log_offset)
                    chunk = fh.read()
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1
            p.log_offset += end
            now = time.time()
            for line in chunk[:end].decode(errors="replace").splitlines():
                if p.role == "server":
                    if "fedloom server listening on" in line:
                        p.listening = now
                    if _TIMELINE_SERVER.search(line):
                        self.timeline.append((now, f"{p.name}-{p.incarnation}", line))
                else:
                    self.timeline.append((now, f"{p.name}-{p.incarnation}", line))
                    if "registered with" in line:
                        self.registrations.append((now, p.name, p.incarnation))

    def _make_plan(self) -> list[PlannedKill]:
        rng = random.Random(self.s.seed)
        n = self.s.client_kills + self.s.server_kills
        candidates = list(range(2, max(3, self.s.rounds)))  # rounds 2..R-1: a restarted client has a round left
        rounds = rng.sample(candidates, n) if n <= len(candidates) else [rng.choice(candidates) for _ in range(n)]
        targets = ["server"] * self.s.server_kills + ["client"] * self.s.client_kills
        rng.shuffle(targets)
        sites = sorted(self.sites)
        plan = [
            PlannedKill(
                target=t,
                round=r,
                delay=round(rng.uniform(0.2, 0.8) * self.s.round_timeout, 2),
                restart_after=round(rng.uniform(0.5, 2.0), 2),
                victim=rng.choice(sites) if t == "client" else None,
            )
            for t, r in zip(targets, rounds, strict=True)
        ]
        return sorted(plan, key=lambda k: k.round)

    def _try_kill(self, k: PlannedKill, now: float, pending: list[tuple[float, PlannedKill]]) -> bool:
        """Carry out ``k`` if it is due and its target is up; True if done."""
        last = max(self.recorded, default=0)
        if last < k.round - 1 or last >= self.s.rounds:
            return False
        base = self.recorded.get(k.round - 1)
        if base is None or now - base < k.delay:
            return False
        if k.target == "server":
            target = self.server
            if target is None or target.listening is None or target.ended is not None:
                return False
        else:
            assert k.victim is not None
            target = self.clients[k.victim]
            if target.ended is not None:
                return False
        pid = target.popen.pid
        self._kill(target)
        self.kills.append(
            {
                "target": k.target,
                "name": target.name,
                "incarnation": target.incarnation,
                "pid": pid,
                "t": round(now - self.t_start, 2),
                "at": now,
                "round_in_flight": last + 1,
                "planned_round": k.round,
                "seconds_after_previous_round": round(now - base, 2),
            }
        )
        pending.append((time.time() + k.restart_after, k))
        return True

    def _restart(self, k: PlannedKill) -> None:
        if k.target == "server":
            self._start_server()
            name = "server"
        else:
            assert k.victim is not None
            self._start_client(k.victim)
            name = k.victim
        self.restarts.append({"target": k.target, "name": name, "t": round(time.time() - self.t_start, 2)})

    def run(self) -> None:
        """Set up, start everything, carry out the kill schedule until the server finishes the run."""
        s = self.s
        self.t_start = time.time()
        self.sites = write_sites(self.work / "sites", s.honest, s.seed)
        write_pki(self.pki, [*self.sites, *(cid for cid, _ in s.hostile)])
        write_config(self.config, s, port=self.port, store=self.db, credentials=self.pki / "server")
        self.plan = self._make_plan()
        threading.Thread(target=self._sample_loop, name="rss-sampler", daemon=True).start()
        deadline = self.t_start + s.timeout

        self._start_server()
        assert self.server is not None
        while self.server.listening is None:
            self._scan_logs()
            if self.server.popen.poll() is not None:
                raise BenchError(f"the server exited with code {self.server.popen.returncode} at start; see {self.server.log}")
            if time.time() > min(deadline, self.t_start + 180):
                raise BenchError(f"the server did not listen within 180 s; see {self.server.log}")
            time.sleep(0.1)
        for site in self.sites:
            self._start_client(site)
        if s.attacks:
            self._start_hostile()

        todo = list(self.plan)
        pending: list[tuple[float, PlannedKill]] = []
        while True:
            now = time.time()
            if now > deadline:
                raise BenchError(
                    f"global timeout: {s.timeout:.0f} s passed with {max(self.recorded, default=0)} of {s.rounds} rounds recorded"
                )
            self._poll_store()
            self._scan_logs()
            server = self.server
            assert server is not None
            if server.ended is None and server.popen.poll() is not None:  # it exited by itself
                server.ended, server.exit_code = now, server.popen.returncode
                if server.exit_code == 0:
                    break
                raise BenchError(f"the server exited with code {server.exit_code} (not killed by the bench); see {server.log}")
            for p in list(self.clients.values()):
                if p.ended is None and p.popen.poll() is not None:
                    p.ended, p.exit_code = now, p.popen.returncode
                    if p.exit_code == 0 and max(self.recorded, default=0) >= s.rounds:
                        continue  # told that the run is over, before the server itself exits
                    self.unexpected_exits.append(
                        {"name": p.name, "incarnation": p.incarnation, "exit_code": p.exit_code, "t": round(now - self.t_start, 1)}
                    )
            hostile = self.hostile
            if hostile is not None and hostile.ended is None and hostile.popen.poll() is not None:
                hostile.ended, hostile.exit_code = now, hostile.popen.returncode
                if hostile.exit_code != 0 or max(self.recorded, default=0) < s.rounds:  # else: told that the run is over
                    raise BenchError(f"the hostile sites' process exited with code {hostile.exit_code}; see {hostile.log}")
            for due, k in list(pending):
                if now >= due:
                    pending.remove((due, k))
                    self._restart(k)
            if todo and not any(pk.target == todo[0].target and pk.victim == todo[0].victim for _, pk in pending):
                if self._try_kill(todo[0], now, pending):
                    todo.pop(0)
            time.sleep(0.25)
        self._poll_store()
        self.t_end = time.time()
        self._finish()

    def _finish(self) -> None:
        """After the server finished: the honest clients stop by themselves; the hostile process is told to."""
        end = time.time() + 40
        for p in self.clients.values():
            if p.ended is not None:
                continue
            try:
                p.exit_code = p.popen.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                self._signal(p, signal.SIGKILL)
                p.exit_code = p.popen.wait(timeout=10)
                registered = any(name == p.name and i == p.incarnation for _, name, i in self.registrations)
                if registered:
                    self.unexpected_exits.append(
                        {"name": p.name, "incarnation": p.incarnation, "exit_code": None, "why": "still running 40 s after the server finished"}
                    )
                else:  # restarted too late to reach the server before it finished: not the client's fault
                    self.late_starters.append((p.name, p.incarnation))
            p.ended = time.time()
        if self.hostile is not None and self.hostile.ended is None:
            st = _proc_status(self.hostile.popen.pid)
            self.hostile_cpu_s = None if st is None else round(st[2], 1)
            self._signal(self.hostile, signal.SIGTERM)
            try:
                self.hostile.exit_code = self.hostile.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._signal(self.hostile, signal.SIGKILL)
                self.hostile.popen.wait(timeout=10)
                raise BenchError("the hostile sites' process did not stop within 30 s of SIGTERM") from None
            self.hostile.ended = time.time()
        self._sampling.set()

    # ------------------------------------------------------------ results
    def _store_rounds(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        from fedloom.store import RunHandle, Store

        with closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as con:
            row = con.execute("SELECT id, config_hash, checkpoint_dir FROM runs WHERE name = ?", (RUN_NAME,)).fetchone()
            if row is None:
                raise BenchError(f"run {RUN_NAME!r} is not in the store {self.db}")
            recorded = dict(con.execute("SELECT round, recorded FROM rounds WHERE run_id = ?", (row[0],)).fetchall())
        with Store.open(self.db, create=False) as store:
            handle = RunHandle(id=row[0], name=RUN_NAME, config_hash=row[1], checkpoint_dir=self.db.parent / row[2], resumed=True)
            history = store.history(handle)
            info = next(i for i in store.list_runs() if i.name == RUN_NAME)
            registry = {c.client_id: c.rounds_participated for c in store.clients()}
        rows = [
            {
                "round": r.round,
                "status": r.status,
                "seconds": r.seconds,
                "recorded": float(recorded[r.round]),
                "clients": list(r.clients),
                "rejected": dict(r.rejected),
                "num_examples": r.num_examples,
                "test_mae": r.metrics.get("test_mae"),
            }
            for r in history
        ]
        run = {
            "status": info.status,
            "rounds_done": info.rounds_done,
            "last_checkpoint": info.last_checkpoint,
            "rounds_participated": registry,
        }
        return rows, run

    def results(self) -> dict[str, Any]:
        s = self.s
        rows, run_info = self._store_rounds()
        servers = [p for p in self.procs if p.role == "server"]
        slogs = {p.incarnation: parse_server_log(p.log) for p in servers}
        honest = set(self.sites)
        hostile_ids = dict(s.hostile)

        incarnation_of = self._incarnation_at
        kills_of: dict[str, list[float]] = {}
        for k in self.kills:
            kills_of.setdefault(k["name"], []).append(k["at"])
        window_before = s.heartbeat_timeout + s.heartbeat_interval + 1.0
        per_round = []
        accepted = expected = accepted_expected = selected_honest = disrupted = accepted_disrupted = 0
        missed: list[dict[str, Any]] = []
        up_not_selected: list[dict[str, Any]] = []
        for row in rows:
            t1 = row["recorded"]
            t0 = t1 - row["seconds"]
            inc = incarnation_of(t1)
            outcomes = slogs[inc.incarnation].outcomes.get(row["round"], {})
            cohort = set(row["clients"]) | set(row["rejected"]) | set(outcomes)
            h_cohort = cohort & honest
            h_accepted = set(row["clients"]) & honest
            accepted += len(h_accepted)
            selected_honest += len(h_cohort)
            for c in sorted(h_cohort):
                hit = any(t0 - window_before <= k <= t1 for k in kills_of.get(c, []))
                if hit:
                    disrupted += 1
                    accepted_disrupted += c in h_accepted
                    continue
                expected += 1
                if c in h_accepted:
                    accepted_expected += 1
                else:
                    missed.append(
                        {
                            "round": row["round"],
                            "client": c,
                            "why": row["rejected"].get(c) or outcomes.get(c, "?"),
                            **self._client_view(c, row["round"], t0),
                        }
                    )
            for c in sorted(honest - h_cohort):
                regs = [
                    (t, i)
                    for t, name, i in self.registrations
                    if name == c and inc.started <= t <= t0 - 0.5 and not self._killed_before(c, i, t1)
                ]
                if regs:
                    up_not_selected.append({"round": row["round"], "client": c, "registered_s_before_round": round(t0 - regs[-1][0], 1)})
            per_round.append(
                {
                    "round": row["round"],
                    "status": row["status"],
                    "seconds": round(row["seconds"], 2),
                    "server_incarnation": inc.incarnation,
                    "cohort": len(cohort),
                    "honest_accepted": len(h_accepted),
                    "honest_in_cohort": len(h_cohort),
                    "hostile_accepted": sorted(set(row["clients"]) & set(hostile_ids)),
                    "rejected": {c: r[:120] for c, r in row["rejected"].items()},
                    "recorded_times": len(self.recordings.get(row["round"], [])),
                    "test_mae": row["test_mae"],
                }
            )

        hostile = self._hostile_results(rows, hostile_ids)
        rounds_list = [r["round"] for r in rows]
        max_round = max((r["seconds"] for r in rows), default=0.0)
        rerecorded = {r: len(t) for r, t in self.recordings.items() if len(t) > 1}
        origin = self.t_start
        incarnations = [
            {
                "incarnation": p.incarnation,
                "pid": p.popen.pid,
                "started_s": round(p.started - origin, 1),
                "ended_s": None if p.ended is None else round(p.ended - origin, 1),
                "killed": p.killed,
                "exit_code": p.exit_code,
                "resumed_from": slogs[p.incarnation].resumed_from,
                "rounds_recorded": sum(1 for r in rows if incarnation_of(r["recorded"]) is p),
                "tracebacks": slogs[p.incarnation].tracebacks,
                "log_bytes": p.log.stat().st_size,
                "warnings_logged": sum(slogs[p.incarnation].warnings.values()),
                **series_summary(
                    p.samples, origin, until=max((r["recorded"] for r in rows if incarnation_of(r["recorded"]) is p), default=None)
                ),
            }
            for p in servers
        ]
        warnings: Counter[str] = Counter()
        for lg in slogs.values():
            warnings.update(lg.warnings)
        clients = {
            site: [
                {
                    "incarnation": p.incarnation,
                    "killed": p.killed,
                    "exit_code": p.exit_code,
                    **parse_client_log(p.log),
                }
                for p in self.procs
                if p.role == "honest" and p.name == site
            ]
            for site in sorted(self.sites)
        }
        rss_max = max((i["rss_mb"]["max"] for i in incarnations if i.get("samples")), default=None)
        checks = {
            "every_round_recorded_once": rounds_list == list(range(1, s.rounds + 1)),
            "every_round_ok": all(r["status"] == "ok" for r in rows),
            "run_completed": run_info["status"] == "completed" and servers[-1].exit_code == 0,
            "no_hostile_attack_aggregated": all(not v["store"]["aggregated_attack_rounds"] for v in hostile.values()),
            "attack_pushes_accepted_by_the_service_rejected_by_their_round": all(
                f["fate"] != "aggregated" for v in hostile.values() for f in v["accepted_pushes"] if f["role"] == "attack"
            ),
            "no_honest_update_missed": not missed,
            "rounds_within_bound": max_round <= s.round_bound_s,
            "kills_carried_out": len(self.kills) == len(self.plan),
            "honest_clients_exited_cleanly": not self.unexpected_exits
            and all(c[-1]["exit_code"] == 0 or (site, c[-1]["incarnation"]) in self.late_starters for site, c in clients.items()),
            "no_server_tracebacks": all(i["tracebacks"] == 0 for i in incarnations),
            "no_bench_errors": all(not v["errors"] for v in hostile.values()),
        }
        return {
            "benchmark": "chaos",
            "ok": all(checks.values()),
            "checks": checks,
            "config": {
                **asdict(s),
                "attacks": list(s.attacks),
                "honest_sites": sorted(self.sites),
                "hostile_sites": sorted(hostile_ids),
                "hostile_registered_examples": REGISTERED_EXAMPLES,
                "scenario": "hospital (examples/hospital.toml model), sites split into .npz files",
                "round_bound_s": s.round_bound_s,
                "disruption_window_s_before_round": window_before,
                "machine": {
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                    "cpu_count": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(),
                    "load_average_at_start": self.load_at_start,
                },
                "fedloom_commit": _git_commit(),
                "command": " ".join(sys.argv),
            },
            "wall_s": round(self.t_end - self.t_start, 1),
            "rounds": {
                "requested": s.rounds,
                "recorded": len(rows),
                "ok": sum(1 for r in rows if r["status"] == "ok"),
                "recorded_list": rounds_list,
                "each_recorded_once": checks["every_round_recorded_once"],
                "rerecorded_during_run": rerecorded,
                "max_round_s": round(max_round, 2),
                "round_bound_s": s.round_bound_s,
                "store_run_status": run_info["status"],
                "last_checkpoint": run_info["last_checkpoint"],
                "per_round": per_round,
            },
            "honest": {
                "accepted": accepted,
                "expected": expected,
                "accepted_of_expected": accepted_expected,
                "in_cohorts": selected_honest,
                "disrupted_by_kills": disrupted,
                "accepted_though_disrupted": accepted_disrupted,
                "missed": missed,
                "up_but_not_in_cohort": up_not_selected,
                "rounds_participated_in_store": {c: run_info["rounds_participated"].get(c, 0) for c in sorted(self.sites)},
                "clients": clients,
                "unexpected_exits": self.unexpected_exits,
                "restarted_too_late_to_reach_the_server": [f"{n}-{i}" for n, i in self.late_starters],
            },
            "hostile": hostile,
            "hostile_process_cpu_s": self.hostile_cpu_s,
            "kills": {
                "planned": [asdict(k) for k in self.plan],
                "executed": [{k: v for k, v in e.items() if k != "at"} for e in self.kills],
                "server_kills": sum(1 for k in self.kills if k["target"] == "server"),
                "client_kills": sum(1 for k in self.kills if k["target"] == "client"),
                "server_restarts": sum(1 for r in self.restarts if r["target"] == "server"),
                "client_restarts": sum(1 for r in self.restarts if r["target"] == "client"),
                "restarts": self.restarts,
            },
            "server": {"rss_max_mb": rss_max, "incarnations": incarnations, "warnings": dict(warnings.most_common())},
        }

    def _client_view(self, client: str, rnd: int, t0: float) -> dict[str, Any]:
        """What the client's own log says of round ``rnd``: when it finished training (seconds after the
        round started, as the bench saw the line) and what the server answered to its push."""
        lines = [(t, line) for t, proc, line in self.timeline if proc.rsplit("-", 1)[0] == client]
        trained = [i for i, (_, line) in enumerate(lines) if f"round {rnd}: trained on" in line]
        if not trained:
            return {"client_trained": False}
        i = trained[-1]
        answer = None
        for _, line in lines[i + 1 :]:
            if "trained on" in line:
                break
            if "server refused our update: " in line:
                answer = line.split("server refused our update: ", 1)[1]
                break
        return {"client_trained": True, "trained_s_after_round_start": round(lines[i][0] - t0, 1), "server_answer": answer}

    def _incarnation_at(self, t: float) -> Proc:
        """The server incarnation that was running at time ``t``."""
        for p in self.procs:
            if p.role == "server" and p.started <= t <= (p.ended if p.ended is not None else float("inf")):
                return p
        raise BenchError(f"no server incarnation was running at {t} (a round recorded then?)")

    def _killed_before(self, name: str, incarnation: int, t: float) -> bool:
        for p in self.procs:
            if p.role == "honest" and p.name == name and p.incarnation == incarnation:
                return p.killed and p.ended is not None and p.ended < t
        return False

    def _hostile_results(self, rows: list[dict[str, Any]], hostile_ids: dict[str, str]) -> dict[str, Any]:
        """Per attack: the hostile process's tallies, and what the store says became of its accepted pushes.

        ``aggregated_attack_rounds`` lists the rounds whose aggregate included this site although
        no legitimate (or probe) push of it was accepted for that round: it must stay empty.
        """
        if not hostile_ids:
            return {}
        path = self.work / "hostile.json"
        if not path.exists():
            raise BenchError(f"the hostile sites wrote no tallies ({path}); see {self.logs / 'hostile-1.log'}")
        data = json.loads(path.read_text())
        if not data.get("final"):
            raise BenchError(f"the hostile sites' tallies in {path} are not final (the process was cut short)")
        by_round = {r["round"]: r for r in rows}
        out: dict[str, Any] = {}
        for cid in hostile_ids:
            t = data["sites"][cid]
            reasons: Counter[str] = Counter()
            for v in t["attack"]["variants"].values():
                reasons.update(v["refused"])
            fates = []
            for a in t["accepted_pushes"]:
                rec = by_round.get(a["round"])
                if rec is None:
                    fate = "round not recorded"
                elif a["t"] < self._incarnation_at(rec["recorded"]).started:
                    fate = "not aggregated: the server that took it was killed, and the round was rerun"
                elif cid in rec["clients"]:
                    fate = "aggregated"
                elif cid in rec["rejected"]:
                    fate = f"rejected by the round: {rec['rejected'][cid]}"
                else:
                    fate = "not aggregated (no reason recorded)"
                fates.append({**{k: v for k, v in a.items() if k != "t"}, "t": round(a["t"] - self.t_start, 2), "fate": fate})
            legit_rounds = {f["round"] for f in fates if f["role"] != "attack"}
            aggregated = [r["round"] for r in rows if cid in r["clients"]]
            effect = []
            for f in fates:
                if f["role"] == "probe" and f["fate"] == "aggregated":
                    rec, before = by_round[f["round"]], by_round.get(f["round"] - 1)
                    effect.append(
                        {
                            "round": f["round"],
                            "round_num_examples": rec["num_examples"],
                            "test_mae_before": None if before is None else before["test_mae"],
                            "test_mae_after": rec["test_mae"],
                        }
                    )
            out[cid] = {
                **{k: v for k, v in t.items() if k != "accepted_pushes"},
                "attack": {**t["attack"], "refused": t["attack"]["pushes"] - t["attack"]["accepted"], "reasons": dict(reasons.most_common())},
                "accepted_pushes": fates,
                "probe_effect": effect,
                "store": {
                    "aggregated_rounds": aggregated,
                    "aggregated_attack_rounds": [r for r in aggregated if r not in legit_rounds],
                    "rejected_rounds": sum(1 for r in rows if cid in r["rejected"]),
                },
            }
        return out


# ---------------------------------------------------------------------------- markdown
def _fate_label(fate: str) -> str:
    if fate.startswith("not aggregated: the server that took it was killed"):
        return "lost with the killed server (round rerun)"
    return fate.split(":")[0]


def markdown(res: dict[str, Any]) -> str:
    c = res["config"]
    r = res["rounds"]
    h = res["honest"]
    k = res["kills"]
    srv = res["server"]
    rss = ", ".join(
        f"#{i['incarnation']}: {i['rss_mb']['max']:.0f}" + (" (killed)" if i["killed"] else "")
        for i in srv["incarnations"]
        if i.get("samples")
    )
    cpu = ", ".join(
        f"#{i['incarnation']}: {i['cpu_s']:.0f} s ({i['cpu_utilization']:.2f})" for i in srv["incarnations"] if i.get("samples")
    )
    lines = [
        f"# fedloom chaos benchmark ({'all checks passed' if res['ok'] else 'CHECKS FAILED'})",
        "",
        f"{c['honest']} honest + {len(c['hostile_sites'])} hostile sites, {c['rounds']} rounds, seed {c['seed']}, "
        f"round_timeout {c['round_timeout']:g} s, stream_idle_timeout {c['idle_timeout']:g} s, "
        f"{c['machine']['cpu_count']} CPUs ({c['machine']['platform']}), load at start "
        f"{', '.join(f'{x:.1f}' for x in c['machine']['load_average_at_start'])}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| rounds recorded / requested | {r['recorded']} / {r['requested']} ({r['ok']} ok) |",
        f"| every round 1..R recorded exactly once | {'yes' if r['each_recorded_once'] else 'NO'} |",
        f"| rounds recorded again during the run | {len(r['rerecorded_during_run'])} |",
        f"| honest updates accepted / expected | {h['accepted_of_expected']} / {h['expected']} |",
        f"| honest updates in cohorts disrupted by a kill (accepted anyway) | {h['disrupted_by_kills']} ({h['accepted_though_disrupted']}) |",
        f"| honest clients up but left out of a cohort | {len(h['up_but_not_in_cohort'])} |",
        f"| server kills / restarts | {k['server_kills']} / {k['server_restarts']} |",
        f"| client kills / restarts | {k['client_kills']} / {k['client_restarts']} |",
        f"| longest round (bound) | {r['max_round_s']:.1f} s ({r['round_bound_s']:.0f} s) |",
        f"| server RSS max per incarnation (MB) | {rss} |",
        f"| server CPU per incarnation (s, cores) | {cpu} |",
        f"| server log written (warnings) | {sum(i['log_bytes'] for i in srv['incarnations']) / 1e6:.1f} MB "
        f"({sum(i['warnings_logged'] for i in srv['incarnations'])}) |",
        f"| wall time | {res['wall_s']:.0f} s |",
        "",
        "| attack (site) | pushes | accepted by the service | refused | top refusal reasons | other | rounds aggregating an attack (store) |",
        "|---|---:|---:|---:|---|---|---:|",
    ]
    for cid, v in res["hostile"].items():
        a, kind = v["attack"], v["kind"]
        top = "; ".join(f"{reason} ({n})" for reason, n in list(a["reasons"].items())[:3]).replace("|", "/")
        extra = []
        if a["accepted"]:
            fates = Counter(_fate_label(f["fate"]) for f in v["accepted_pushes"] if f["role"] == "attack")
            extra.append("the accepted ones: " + ", ".join(f"{fate} ({n})" for fate, n in fates.items()))
        for role in ("legit", "probe"):
            if v[role]["pushes"]:
                agg = sum(1 for f in v["accepted_pushes"] if f["role"] == role and f["fate"] == "aggregated")
                extra.append(f"{role} pushes: {v[role]['accepted']}/{v[role]['pushes']} accepted, {agg} aggregated")
        if kind in ("churn", "hammer"):
            ev = v["events"]
            if kind == "churn":
                extra.append(f"registrations ok {ev.get('register ok', 0)}, refused {ev.get('register refused: RESOURCE_EXHAUSTED', 0)}")
            else:
                extra.append(
                    f"pulls answered {ev.get('pulls answered', 0)}, refused {ev.get('pull refused: RESOURCE_EXHAUSTED', 0)}; "
                    f"its task downloaded {ev.get('task downloads', 0)} times ({ev.get('task bytes downloaded', 0) / 1e6:.0f} MB)"
                )
        lines.append(
            f"| {kind if cid == f'hostile-{kind}' else f'{kind} ({cid})'} | {a['pushes']} | {a['accepted']} | {a['refused']} | {top} | {'; '.join(extra)} | {len(v['store']['aggregated_attack_rounds'])} |"
        )
    mae = {x["round"]: x["test_mae"] for x in r["per_round"]}

    def change(rnd: int) -> str:
        return f"{mae[rnd] - mae[rnd - 1]:+.3f}" if rnd in mae and rnd - 1 in mae else "?"

    for cid, v in res["hostile"].items():
        for f, e in zip([f for f in v["accepted_pushes"] if f["role"] == "probe" and f["fate"] == "aggregated"], v["probe_effect"], strict=True):
            rnd = e["round"]
            lines += [
                "",
                f"Probe ({cid}, {f['variant']}): a zero update, aggregated in round {rnd}, which weighted "
                f"{e['round_num_examples']:,} examples in all; the test MAE changed by {change(rnd)} in that round, "
                f"{change(rnd - 1)} in the round before and {change(rnd + 1)} in the round after.",
            ]
    lines += ["", "| check | result |", "|---|---|"]
    lines += [f"| {name} | {'pass' if ok else 'FAIL'} |" for name, ok in res["checks"].items()]
    lines += ["", f"Command: `{c['command']}`. Per round, per variant, kills and RSS series: the JSON beside this file."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, required=True, help="results file (a Markdown table is written beside it)")
    ap.add_argument("--honest", type=int, default=4, help="honest client processes")
    ap.add_argument(
        "--attacks",
        default="all",
        help=f"comma-separated attacks, each kind or kind:count (that many sites), or all (one site each: "
        f"{','.join(KINDS)}), or none",
    )
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--client-kills", type=int, default=2)
    ap.add_argument("--server-kills", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--round-timeout", type=float, default=15.0)
    ap.add_argument("--idle-timeout", type=float, default=2.0, help="deploy.stream_idle_timeout")
    ap.add_argument("--heartbeat-interval", type=float, default=1.0)
    ap.add_argument("--heartbeat-timeout", type=float, default=4.0)
    ap.add_argument("--wait-timeout", type=float, default=30.0)
    ap.add_argument("--max-pull-wait", type=float, default=2.0)
    ap.add_argument("--round-retries", type=int, default=1)
    ap.add_argument("--max-workers", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=900.0, help="global limit in seconds: everything is stopped after it")
    ap.add_argument("--workdir", type=Path, help="work directory (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, store, PKI) after a successful run")
    args = ap.parse_args()

    attacks = tuple(KINDS) if args.attacks == "all" else tuple(a for a in args.attacks.split(",") if a and a != "none")
    try:
        hostile_sites(attacks)
    except ValueError as exc:
        ap.error(str(exc))
    if args.honest < 1 or args.rounds < 2 or min(args.client_kills, args.server_kills) < 0:
        ap.error("need --honest >= 1, --rounds >= 2 and kill counts >= 0")
    s = Settings(
        honest=args.honest,
        attacks=attacks,
        rounds=args.rounds,
        client_kills=args.client_kills,
        server_kills=args.server_kills,
        seed=args.seed,
        round_timeout=args.round_timeout,
        idle_timeout=args.idle_timeout,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
        wait_timeout=args.wait_timeout,
        max_pull_wait=args.max_pull_wait,
        round_retries=args.round_retries,
        max_workers=args.max_workers,
        timeout=args.timeout,
    )
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedloom-chaos-"))
    work.mkdir(parents=True, exist_ok=True)

    def terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    bench = Chaos(s, work)
    print(f"chaos: work directory {work}; plan and logs there", flush=True)
    try:
        bench.run()
        res = bench.results()
    except (BenchError, KeyboardInterrupt) as exc:
        bench.cleanup()
        why = "interrupted (Ctrl-C or SIGTERM); every process it started is stopped" if isinstance(exc, KeyboardInterrupt) else exc
        print(f"chaos: FAILED, no results written: {why}\n  logs: {bench.logs}", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    except BaseException:
        bench.cleanup()
        print(f"chaos: FAILED (bench error), no results written; logs: {bench.logs}", file=sys.stderr)
        raise
    bench.cleanup()
    res["config"]["workdir"] = str(work) if (args.keep or not res["ok"]) else None
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    md = args.json.with_suffix(".md")
    md.write_text(markdown(res))
    print(markdown(res))
    print(f"chaos: wrote {args.json} and {md}")
    if res["ok"] and not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    elif not res["ok"]:
        print(f"chaos: some checks failed; work directory kept: {work}", file=sys.stderr)
    return 0 if res["ok"] else 2


if __name__ == "__main__":
    sys.exit(main())
