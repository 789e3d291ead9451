"""Asynchronous rounds: wall-clock to a target accuracy, synchronous FedAvg vs FedBuff, long-tailed latencies.

Issue 12 item 1. Two parts, one JSON (and a Markdown table beside it).

**Simulation** (default): the McMahan 2NN on MNIST, 100 clients, IID and non-IID (``shards``:
2 label-sorted shards of 300 per client), E = 1, B = 10, SGD lr 0.1 (as bench/strategies.py),
the vectorized engine, seed 0 (``--seeds``). Every run starts from
``examples/mnist_2nn_fedbuff.toml`` with its ``[latency]`` table: each client has a persistent
duration median · exp(sigma · z_c) (median 1 s, per-dispatch jitter exp(0.2 · z)), sigma in
{0 (the control: no tail, jitter only), 1, 1.5}; durations are drawn from the run seed, so every
method of one (seed, sigma) sees the same clients' speeds. Methods:

* ``fedavg-c10``: synchronous FedAvg, C = 0.1 (10 clients a round); a round lasts as long as
  its slowest client (the loop's simulated clock);
* ``fedavg-c30``: the same with C = 0.3 (30 clients a round: the concurrency of fedbuff-k10-c30);
* ``fedbuff-k10-c10``, ``fedbuff-k10-c30``, ``fedbuff-k5-c10``: FedBuff (Nguyen et al. 2022) with
  K updates per server apply and that many clients training at once, with the example's
  staleness weighting (polynomial, s(tau) = (1 + tau)^-0.5) and bound (max_staleness 20: staler
  updates are refused and their compute is wasted).

A "round" of FedBuff is one server apply (K updates); the test set is evaluated after every
round (apply) of every method. Reported per run: simulated seconds, rounds (applies) and
client updates (accepted; the refused ones and the updates trained but still in flight are
counted apart) to the first evaluation at or above the target — IID: 97% (also 95%, 96%),
shards: 95% (also 90%, 93%; the 2NN needs ~180 synchronous rounds for 97% on shards) — and the
test accuracy of the model in effect at a fixed simulated time budget T (IID: 60 s, shards:
150 s: the last evaluation with clock <= T). A run stops once it has reached its target and
passed T, or at ``--max-clock`` simulated seconds / ``--max-updates`` accepted updates.

**Deployment** (``--deploy``): real processes on loopback, as tests/server/test_buffered_deploy.py:
``fedloom server CONFIG`` and N = 10 ``fedloom client`` processes (insecure mode), MNIST IID
over 10 clients, the 2NN, B = 10, lr 0.1, ``max_steps`` = 10 (compute is small: the time is the
delay), server-side test evaluation after every round. Client i gets ``--delay`` d_i (seconds
added to every training task) drawn from a lognormal with median 0.5 s and sigma 1
(``--deploy-seed``; the delays are in the JSON). Methods, each with the same budget of
``--deploy-updates`` (150) accepted client updates: synchronous FedAvg with fraction 1.0 and
0.5, and FedBuff with K = 5 and concurrency 10. Reported: real seconds to the target
(``--deploy-target``, 90%) counted from the moment the last client registered (the bench
timestamps the processes' output lines as it reads them: the server's per-round line and
each client's "registered" log line), rounds and updates to the target, and the accuracy after
the budget; the server's own ``clock_s`` (FedBuff only: the loop records it for buffered or
latency-simulated runs, and it starts before the wait for ``min_clients``) and round
``seconds`` are in the JSON.

Usage:
    OMP_NUM_THREADS=1 nice -n 5 python bench/async.py --json bench/results/async_cpu.json \\
        [--partitions iid,shards] [--sigmas 0,1,1.5] [--methods fedavg-c10,fedbuff-k10-c30] \\
        [--seeds 0,1,2] [--no-sim] [--deploy] [--redo]

Writes the JSON and the Markdown after every run; runs already in the JSON are kept unless
``--redo``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fedloom

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "mnist_2nn_fedbuff.toml"
FEDLOOM = str(Path(sys.executable).parent / "fedloom")

PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"target": 0.97, "others": (0.95, 0.96), "budget_s": 60.0},
    "shards": {"target": 0.95, "others": (0.90, 0.93), "budget_s": 150.0},
}
METHODS: dict[str, dict[str, Any]] = {
    "fedavg-c10": {"kind": "sync", "fraction": 0.1},
    "fedavg-c30": {"kind": "sync", "fraction": 0.3},
    "fedbuff-k10-c10": {"kind": "buffer", "size": 10, "concurrency": 10},
    "fedbuff-k10-c30": {"kind": "buffer", "size": 10, "concurrency": 30},
    "fedbuff-k5-c10": {"kind": "buffer", "size": 5, "concurrency": 10},
}
SIGMAS = (0.0, 1.0, 1.5)


# --- simulation ------------------------------------------------------------------------------


def sim_config(partition: str, sigma: float, method: str, seed: int) -> dict[str, Any]:
    cfg = tomllib.loads(EXAMPLE.read_text())
    m = METHODS[method]
    cfg["run"].update(name=f"async-{partition}-s{sigma:g}-{method}", seed=seed, rounds=100_000, engine="vectorized", eval_every=1)
    cfg["data"]["partition"] = partition
    cfg["latency"]["sigma"] = sigma
    if m["kind"] == "sync":
        del cfg["buffer"]
        cfg["strategy"]["fraction"] = m["fraction"]
    else:
        cfg["buffer"].update(size=m["size"], concurrency=m["concurrency"])
    return cfg


def run_sim(partition: str, sigma: float, method: str, seed: int, max_clock: float, max_updates: int) -> dict[str, Any]:
    p = PARTITIONS[partition]
    cfg = sim_config(partition, sigma, method, seed)
    run = fedloom.build_run(fedloom.parse_config(cfg))
    fed = run.federation
    engine = run.engine
    trained = [0]
    plain = engine.run_cohort

    def counting(base, instructions, *a, **kw):  # type: ignore[no-untyped-def]
        trained[0] += len(instructions)  # the simulation trains every dispatched client once (lazily)
        return plain(base, instructions, *a, **kw)

    engine.run_cohort = counting  # type: ignore[method-assign]
    initial = float(fed.evaluate(fed.state.params)["accuracy"]) if fed.evaluate else float("nan")
    targets = sorted({*p["others"], p["target"]})
    hits: dict[str, dict[str, Any] | None] = {f"{t:g}": None for t in targets}
    budget = p["budget_s"]
    at_budget: dict[str, Any] | None = None
    prev: dict[str, Any] = {"round": 0, "clock_s": 0.0, "updates": 0, "accuracy": initial}
    updates = rejected = 0
    curve: list[list[float]] = []
    stale_sum = stale_n = 0.0
    stale_max = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    stop = ""
    while True:
        rec = fed.step()
        m = rec.metrics
        clock = float(m["clock_s"])
        acc = float(m["test_accuracy"])
        updates += len(rec.clients)
        rejected += len(rec.rejected)
        if "staleness_mean" in m:
            stale_sum += m["staleness_mean"] * len(rec.clients)
            stale_n += len(rec.clients)
            stale_max = max(stale_max, m["staleness_max"])
        curve.append([rec.round, round(clock, 3), updates, round(acc, 4)])
        now = {"round": rec.round, "clock_s": round(clock, 3), "updates": updates, "rejected": rejected,
               "trained": trained[0], "in_flight": int(m.get("in_flight", 0)), "accuracy": acc}
        for t in targets:
            if hits[f"{t:g}"] is None and acc >= t:
                hits[f"{t:g}"] = now
        if at_budget is None and clock > budget:
            at_budget = {**prev, "budget_s": budget}  # the model in effect at T: the last one applied by then
        prev = now
        if rec.round % 25 == 0:
            print(f"  {partition} sigma={sigma:g} {method} seed {seed}: round {rec.round} clock {clock:.1f} s "
                  f"updates {updates} acc {acc:.4f}", flush=True)
        if hits[f"{p['target']:g}"] is not None and at_budget is not None:
            stop = "target reached and budget passed"
        elif clock >= max_clock:
            stop = f"max clock {max_clock:g} s"
        elif updates >= max_updates:
            stop = f"max updates {max_updates}"
        if stop:
            break
    return {
        "partition": partition, "sigma": sigma, "method": method, "seed": seed, "status": "ok",
        "config": {k: cfg[k] for k in ("strategy", "buffer", "latency") if k in cfg},
        "engine": f"{engine.name}" + (f" ({engine.mode})" if getattr(engine, "mode", None) else ""),
        "initial_accuracy": initial,
        "target": p["target"],
        "hits": hits,
        "at_budget": at_budget,
        "stopped": stop,
        "last": prev,
        "staleness_mean": stale_sum / stale_n if stale_n else 0.0,
        "staleness_max": stale_max,
        "curve": curve,
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(time.process_time() - c0, 1),
    }


# --- deployment ------------------------------------------------------------------------------

DEPLOY_METHODS: dict[str, dict[str, Any]] = {
    "fedavg-f1.0": {"kind": "sync", "fraction": 1.0},
    "fedavg-f0.5": {"kind": "sync", "fraction": 0.5},
    "fedbuff-k5-c10": {"kind": "buffer", "size": 5, "concurrency": 10},
}
ROUND_LINE = re.compile(r"^round\s+(\d+)\s")
REGISTERED = re.compile(r"client '([^']+)' registered with")
TASKS_LINE = re.compile(r"client (\S+): (\d+) training tasks")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A client process is `fedloom client ...` (the same entry point, fedloom.cli:app) after one SGD step on a
# tiny model: torch initialises itself lazily on a process's first optimiser step (~1.3 s of CPU), which
# with 10 client processes on 2 shared cores would add ~7 s to round 1 of every method. A device that has
# been running has paid it long ago, so the clients pay it before they register.
WARM_CLIENT = (
    "import sys, torch; m = torch.nn.Linear(4, 2); o = torch.optim.SGD(m.parameters(), lr=0.1); "
    "torch.nn.functional.cross_entropy(m(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward(); o.step(); "
    "from fedloom.cli import app; sys.argv[0] = 'fedloom'; app()"
)


class Proc:
    """A child process whose output lines are timestamped (time.monotonic) as this process reads them."""

    def __init__(self, name: str, args: list[str], log: Path, *, warm: bool = False) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.name = name
        self.lines: list[tuple[float, str]] = []
        cmd = [sys.executable, "-c", WARM_CLIENT, *args] if warm else [FEDLOOM, *args]
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        self._log = log.open("w")
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for raw in self.p.stdout:
            t = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append((t, line))
            self._log.write(f"{t:.3f} {line}\n")
            self._log.flush()

    def finish(self, timeout: float) -> int | None:
        try:
            rc = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(timeout=10)
            rc = None
        self._t.join(timeout=5)
        self._log.close()
        return rc


def deploy_config(method: str, port: int, updates: int, steps: int, seed: int, n: int) -> tuple[str, int]:
    m = DEPLOY_METHODS[method]
    per_round = m["size"] if m["kind"] == "buffer" else max(1, round(m["fraction"] * n))
    rounds = math.ceil(updates / per_round)
    text = f"""
[run]
name = "async-deploy-{method}"
seed = {seed}
rounds = {rounds}
eval_every = 1
[data]
name = "mnist"
partition = "iid"
num_clients = {n}
[model]
name = "2nn"
[strategy]
name = "fedavg"
fraction = {m.get("fraction", 1.0)}
[client]
epochs = 1
batch_size = 10
lr = 0.1
max_steps = {steps}
[deploy]
address = "127.0.0.1:{port}"
insecure = true
min_clients = {n}
wait_timeout = 120
round_timeout = 120
heartbeat_interval = 0.5
max_pull_wait = 0.5
"""
    if m["kind"] == "buffer":
        text += f"""[buffer]
size = {m["size"]}
concurrency = {m["concurrency"]}
staleness = "polynomial"
exponent = 0.5
max_staleness = 20
"""
    return text, rounds


def run_deploy(method: str, delays: dict[str, float], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    n = len(delays)
    port = _free_port()
    text, rounds = deploy_config(method, port, args.deploy_updates, args.deploy_steps, args.deploy_seed, n)
    d = work / method
    d.mkdir(parents=True, exist_ok=True)
    config = d / "config.toml"
    config.write_text(text)
    t_start = time.monotonic()
    server = Proc("server", ["server", str(config), "--out", str(d / "out")], d / "server.log")
    clients = []
    for cid, delay in delays.items():
        cargs = ["client", "--server", f"127.0.0.1:{port}", "--data", str(config), "--insecure", "--client-id", cid,
                 "--delay", f"{delay:.3f}", "-v", "--give-up-after", "60"]
        clients.append(Proc(cid, cargs, d / f"{cid}.log", warm=not args.cold_clients))
    procs = [server, *clients]
    try:
        rc = server.finish(timeout=args.deploy_timeout)
        crc = [c.finish(timeout=60) for c in clients]
    finally:
        for p in procs:
            if p.p.poll() is None:
                p.p.kill()
    t_end = time.monotonic()
    row: dict[str, Any] = {"method": method, "config": DEPLOY_METHODS[method], "rounds": rounds, "server_rc": rc, "client_rc": crc}
    hist_path = d / "out" / "history.json"
    if rc != 0 or not hist_path.exists():
        tail = "\n".join(line for _, line in server.lines[-30:])
        return {**row, "status": "failed", "error": f"server exited {rc}", "server_log_tail": tail}
    history = json.loads(hist_path.read_text())
    reg = {}
    tasks = {}
    for c in clients:
        for t, line in c.lines:
            if (mm := REGISTERED.search(line)) and c.name not in reg:
                reg[c.name] = t
            if mm := TASKS_LINE.search(line):
                tasks[c.name] = int(mm.group(2))
    ends: dict[int, float] = {}
    for t, line in server.lines:
        if mm := ROUND_LINE.match(line.strip()):
            ends.setdefault(int(mm.group(1)), t)
    if len(reg) < n or len(ends) < len(history):
        return {**row, "status": "failed", "error": f"{len(reg)} registrations, {len(ends)} round lines seen for {len(history)} records"}
    t0 = max(reg.values())
    per_round = []
    updates = 0
    for r in history:
        updates += len(r["clients"])
        mt = r["metrics"]
        per_round.append({
            "round": r["round"], "t_s": round(ends[r["round"]] - t0, 3), "updates": updates,
            "accuracy": mt.get("test_accuracy"), "seconds": round(r["seconds"], 3),
            "clock_s": round(mt["clock_s"], 3) if "clock_s" in mt else None,
            "staleness_mean": mt.get("staleness_mean"), "staleness_max": mt.get("staleness_max"),
            "in_flight": mt.get("in_flight"), "clients": r["clients"], "rejected": r.get("rejected", {}), "status": r["status"],
        })
    hit = next((x for x in per_round if x["accuracy"] is not None and x["accuracy"] >= args.deploy_target), None)
    stale = [(x["staleness_mean"], len(x["clients"])) for x in per_round if x["staleness_mean"] is not None]
    return {
        **row,
        "status": "ok",
        "target": args.deploy_target,
        "hit": None if hit is None else {k: hit[k] for k in ("round", "t_s", "updates", "accuracy", "clock_s")},
        "final": {k: per_round[-1][k] for k in ("round", "t_s", "updates", "accuracy", "clock_s")},
        "tasks_trained": sum(tasks.values()) if len(tasks) == n else None,
        "tasks_per_client": tasks,
        "rejected": sum(len(x["rejected"]) for x in per_round),
        "staleness_mean": sum(s * k for s, k in stale) / max(1, sum(k for _, k in stale)) if stale else 0.0,
        "registration_s": round(t0 - t_start, 2),
        "first_registration_s": round(min(reg.values()) - t_start, 2),
        "process_wall_s": round(t_end - t_start, 1),
        "rounds_detail": per_round,
    }


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --- summary ---------------------------------------------------------------------------------


def _key(partition: str, sigma: float, method: str, seed: int) -> str:
    return f"{partition}/sigma={sigma:g}/{method}/seed={seed}"


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def summarize(out: dict[str, Any]) -> None:
    rows: list[dict[str, Any]] = []
    runs = [r for r in out["runs"].values() if r["status"] == "ok"]
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["partition"], r["sigma"], r["method"]), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    for (part, sigma, method), rs in sorted(groups.items(), key=lambda kv: (list(PARTITIONS).index(kv[0][0]), kv[0][1], order.get(kv[0][2], 99))):
        rs = sorted(rs, key=lambda r: r["seed"])
        tgt = f"{PARTITIONS[part]['target']:g}"
        reached = [r["hits"][tgt] for r in rs if r["hits"][tgt] is not None]
        row = {
            "partition": part, "sigma": sigma, "method": method, "seeds": [r["seed"] for r in rs],
            "target": PARTITIONS[part]["target"], "reached": f"{len(reached)}/{len(rs)}",
            "clock_s": _mean([h["clock_s"] for h in reached]) if len(reached) == len(rs) else None,
            "rounds": _mean([h["round"] for h in reached]) if len(reached) == len(rs) else None,
            "updates": _mean([h["updates"] for h in reached]) if len(reached) == len(rs) else None,
            "rejected": _mean([h["rejected"] for h in reached]) if len(reached) == len(rs) else None,
            "per_seed_clock_s": [None if r["hits"][tgt] is None else r["hits"][tgt]["clock_s"] for r in rs],
            "others": {t: _mean([r["hits"][t]["clock_s"] for r in rs]) if all(r["hits"][t] for r in rs) else None
                       for t in rs[0]["hits"] if t != tgt},
            "budget_s": PARTITIONS[part]["budget_s"],
            "acc_at_budget": _mean([r["at_budget"]["accuracy"] for r in rs]) if all(r["at_budget"] for r in rs) else None,
            "staleness_mean": _mean([r["staleness_mean"] for r in rs]),
            "wall_s": sum(r["wall_s"] for r in rs), "cpu_s": sum(r["cpu_s"] for r in rs),
        }
        rows.append(row)
    for row in rows:  # speed-up against synchronous FedAvg C = 0.1 in the same (partition, sigma)
        base = next((b for b in rows if (b["partition"], b["sigma"], b["method"]) == (row["partition"], row["sigma"], "fedavg-c10")), None)
        row["speedup_vs_fedavg_c10"] = (base["clock_s"] / row["clock_s"]) if base and base["clock_s"] and row["clock_s"] else None
        row["updates_vs_fedavg_c10"] = (row["updates"] / base["updates"]) if base and base["updates"] and row["updates"] else None
    out["rows"] = rows
    out["sum_run_wall_s"] = round(sum(r["wall_s"] for r in runs), 1)
    out["sum_run_cpu_s"] = round(sum(r["cpu_s"] for r in runs), 1)


def _f(v: Any, fmt: str = "{:.1f}", none: str = "—") -> str:
    return none if v is None else fmt.format(v)


def markdown(out: dict[str, Any]) -> str:
    m = out["machine"]
    lines = [
        "# Asynchronous rounds: time to target accuracy, synchronous FedAvg vs FedBuff, long-tailed latencies",
        "",
        f"{m['platform']}, {m['cpu_count']} CPUs (shared), torch {m['torch']}, {out.get('threads', 1)} thread(s). "
        "Command(s): " + "; ".join(f"`{i['command']}`" for i in out.get("invocations", [])) + ".",
    ]
    if out.get("rows"):
        lines += [
            "",
            "## Simulation (simulated seconds)",
            "",
            "MNIST 2NN, 100 clients, E = 1, B = 10, lr 0.1, vectorized engine; latency: each client has a persistent "
            "duration 1 s · exp(sigma · z_c), times a per-dispatch jitter exp(0.2 · z) (sigma 0: no tail). FedAvg-cM: "
            "synchronous, M clients a round (a round lasts as long as its slowest client). FedBuff-kK-cM: apply every K "
            "updates, M clients training at once, s(tau) = (1 + tau)^-0.5, updates staler than 20 versions refused. "
            "Rounds = server applies (FedBuff) or synchronous rounds; updates = accepted client updates (each one local "
            "epoch of compute); refused = updates that arrived too stale (compute wasted). "
            f"Targets: IID {PARTITIONS['iid']['target']:.0%}, shards {PARTITIONS['shards']['target']:.0%} "
            "(the first evaluation at or above; evaluated after every round/apply). Accuracy at T: the model in effect "
            f"after T simulated seconds (IID T = {PARTITIONS['iid']['budget_s']:g} s, shards T = {PARTITIONS['shards']['budget_s']:g} s). "
            "Values are means over the seeds listed (with several seeds, the range of the time to target in "
            "brackets); per-seed numbers and curves are in the JSON.",
            "",
            "| data | sigma | method | seeds | sim s to target | speed-up vs FedAvg-c10 | rounds to target | updates to target (x FedAvg-c10) | refused | sim s to lower targets | acc at T | mean staleness |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for r in out["rows"]:
            others = ", ".join(f"{float(t):.0%}: {_f(v)}" for t, v in r["others"].items())
            upd = _f(r["updates"], "{:.0f}")
            if r["updates_vs_fedavg_c10"] is not None and r["method"] != "fedavg-c10":
                upd += f" ({r['updates_vs_fedavg_c10']:.2f}x)"
            hit = _f(r["clock_s"]) if r["clock_s"] is not None else f"not reached ({r['reached']})"
            if r["clock_s"] is not None and len(r["seeds"]) > 1:
                hit += f" ({min(r['per_seed_clock_s']):.1f}–{max(r['per_seed_clock_s']):.1f})"
            lines.append(
                f"| {r['partition']} | {r['sigma']:g} | {r['method']} | {','.join(map(str, r['seeds']))} | {hit} | "
                f"{_f(r['speedup_vs_fedavg_c10'], '{:.1f}x')} | {_f(r['rounds'], '{:.0f}')} | {upd} | {_f(r['rejected'], '{:.0f}')} | "
                f"{others} | {_f(r['acc_at_budget'], '{:.2%}')} | {_f(r['staleness_mean'], '{:.2f}')} |"
            )
        lines += ["", f"Sum over simulation runs: {out['sum_run_wall_s'] / 60:.1f} min wall, {out['sum_run_cpu_s'] / 60:.1f} min CPU."]
    dep = out.get("deploy")
    if dep and dep.get("rows"):
        s = dep["setting"]
        lines += [
            "",
            "## Deployment (real seconds, processes on loopback)",
            "",
            f"`fedloom server` + {s['clients']} `fedloom client` processes (insecure, one machine with {m['cpu_count']} shared CPUs), "
            f"MNIST IID over {s['clients']} clients, 2NN, B = 10, lr 0.1, max_steps = {s['max_steps']}; client `--delay` "
            f"(s, lognormal median {s['delay_median']:g}, sigma {s['delay_sigma']:g}, seed {s['delay_seed']}): "
            + ", ".join(f"{v:.2f}" for v in s["delays"].values())
            + f". Each method has a budget of {s['updates']} accepted updates; target {s['target']:.0%} test accuracy. "
            "Seconds count from the moment the last client registered (bench-side timestamps of the processes' output); "
            "the client processes run one SGD step on a tiny model before `fedloom client` starts, so that torch's "
            "one-time initialisation (~1.3 s of CPU per process) is not charged to round 1. Rounds = synchronous rounds or "
            "FedBuff applies; tasks trained = training tasks the clients completed (those in flight when the run "
            "ended included). The server's own `clock_s` (FedBuff only) starts before the wait for the clients to "
            "register: in the JSON, not in this table.",
            "",
            "| method | s to target | rounds to target | updates to target | accuracy after budget | s for the budget | rounds | tasks trained | refused | mean staleness |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in dep["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['method']} | failed: {r.get('error', '')} | | | | | | | | |")
                continue
            h, f = r["hit"], r["final"]
            lines.append(
                f"| {r['method']} | {_f(h and h['t_s'])} | {_f(h and h['round'], '{:d}')} | {_f(h and h['updates'], '{:d}')} | "
                f"{f['accuracy']:.2%} | {f['t_s']:.1f} | {f['round']} | {_f(r['tasks_trained'], '{:d}')} | {r['rejected']} | {r['staleness_mean']:.2f} |"
            )
        ok = [r for r in dep["rows"] if r["status"] == "ok"]
        lines += ["", f"Deployment part: {sum(r['process_wall_s'] for r in ok):.0f} s wall for these {len(ok)} runs, of which "
                  f"{sum(r['registration_s'] for r in ok):.0f} s was starting the 11 processes until the last client registered."]
    if out.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in out["notes"]]
    return "\n".join(lines) + "\n"


# --- main ------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--partitions", default=",".join(PARTITIONS))
    ap.add_argument("--sigmas", default=",".join(f"{s:g}" for s in SIGMAS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--max-clock", type=float, default=4000.0, help="simulated seconds after which a run stops")
    ap.add_argument("--max-updates", type=int, default=6000, help="accepted updates after which a run stops")
    ap.add_argument("--no-sim", action="store_true", help="skip the simulation part")
    ap.add_argument("--deploy", action="store_true", help="run the deployment part (real processes on loopback)")
    ap.add_argument("--deploy-methods", default=",".join(DEPLOY_METHODS))
    ap.add_argument("--deploy-clients", type=int, default=10)
    ap.add_argument("--deploy-median", type=float, default=0.5)
    ap.add_argument("--deploy-sigma", type=float, default=1.0)
    ap.add_argument("--deploy-seed", type=int, default=0)
    ap.add_argument("--deploy-steps", type=int, default=10, help="client max_steps")
    ap.add_argument("--deploy-updates", type=int, default=150, help="accepted updates per method")
    ap.add_argument("--deploy-target", type=float, default=0.90)
    ap.add_argument("--deploy-timeout", type=float, default=300.0, help="seconds one method's server may run")
    ap.add_argument("--cold-clients", action="store_true", help="plain `fedloom client` processes, without the torch warm-up")
    ap.add_argument("--keep", type=Path, default=None, help="keep the deployment's logs and outputs here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the JSON; run nothing")
    args = ap.parse_args()
    if args.markdown_only:
        out = json.loads(args.json.read_text())
        summarize(out)
        args.json.with_suffix(".md").write_text(markdown(out))
        return
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = json.loads(args.json.read_text()) if args.json.exists() else {}
    out.setdefault("runs", {})
    invocations = out.setdefault("invocations", [])
    command = "OMP_NUM_THREADS=1 nice -n 5 python bench/async.py " + " ".join(
        f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
        for k, v in vars(args).items()
        if v not in (False, None, "") and (k == "json" or v != ap.get_default(k))
    )
    out.update(
        benchmark="async",
        threads=args.threads,
        machine={"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                 "python": platform.python_version()},
        partitions=PARTITIONS,
        methods=METHODS,
        base_config=str(EXAMPLE.relative_to(ROOT)),
    )

    def save() -> None:
        summarize(out)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
        args.json.with_suffix(".md").write_text(markdown(out))

    t_all = time.perf_counter()
    ran = 0
    if not args.no_sim:
        for seed in [int(s) for s in args.seeds.split(",") if s]:
            for partition in [p for p in args.partitions.split(",") if p]:
                for sigma in [float(s) for s in args.sigmas.split(",") if s]:
                    for method in [m for m in args.methods.split(",") if m]:
                        if method not in METHODS or partition not in PARTITIONS:
                            raise SystemExit(f"unknown method {method!r} or partition {partition!r}")
                        key = _key(partition, sigma, method, seed)
                        if key in out["runs"] and not args.redo:
                            continue
                        r = run_sim(partition, sigma, method, seed, args.max_clock, args.max_updates)
                        out["runs"][key] = r
                        ran += 1
                        tg = r["hits"][f"{r['target']:g}"]
                        print(f"== {key}: " + (f"target at {tg['clock_s']:.1f} sim s, round {tg['round']}, {tg['updates']} updates"
                                               if tg else "target not reached")
                              + f"; acc at T {r['at_budget']['accuracy'] if r['at_budget'] else float('nan'):.4f}; "
                              f"stopped: {r['stopped']} ({r['wall_s']} s wall, {r['cpu_s']} s CPU)", flush=True)
                        save()
    if args.deploy:
        t_dep = time.perf_counter()
        rng = np.random.default_rng(args.deploy_seed)
        z = rng.standard_normal(args.deploy_clients)
        width = max(3, len(str(args.deploy_clients - 1)))
        delays = {f"client-{i:0{width}d}": round(float(args.deploy_median * math.exp(args.deploy_sigma * z[i])), 3)
                  for i in range(args.deploy_clients)}
        setting = {"clients": args.deploy_clients, "max_steps": args.deploy_steps, "delay_median": args.deploy_median,
                   "delay_sigma": args.deploy_sigma, "delay_seed": args.deploy_seed, "delays": delays,
                   "updates": args.deploy_updates, "target": args.deploy_target}
        dep = out.get("deploy") or {}
        if dep.get("setting") != setting:
            dep = {"setting": setting, "rows": []}
        done = {r["method"]: r for r in dep["rows"]}
        work = args.keep or Path(tempfile.mkdtemp(prefix="fedloom-async-"))
        try:
            for method in [m for m in args.deploy_methods.split(",") if m]:
                if method in done and done[method]["status"] == "ok" and not args.redo:
                    continue
                print(f"== deploy {method}: server + {args.deploy_clients} clients", flush=True)
                r = run_deploy(method, delays, args, work)
                done[method] = r
                print(f"== deploy {method}: {r['status']} " + (
                    f"target at {r['hit']['t_s'] if r['hit'] else None} s, final acc {r['final']['accuracy']:.4f} "
                    f"at {r['final']['t_s']:.1f} s" if r["status"] == "ok" else r.get("error", "")), flush=True)
                dep["rows"] = [done[m] for m in DEPLOY_METHODS if m in done]
                dep["wall_s"] = dep.get("wall_s_before", 0.0) + time.perf_counter() - t_dep
                out["deploy"] = dep
                save()
        finally:
            if args.keep is None:
                shutil.rmtree(work, ignore_errors=True)
        dep["wall_s_before"] = dep.get("wall_s", 0.0)
    invocations.append({"command": command, "runs": ran, "wall_s": round(time.perf_counter() - t_all, 1), "commit": _commit(),
                        "deploy_methods": args.deploy_methods.split(",") if args.deploy else []})
    save()


if __name__ == "__main__":
    main()
