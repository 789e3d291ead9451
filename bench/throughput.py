"""Simulation throughput: client-samples trained per second, per engine and per framework.

Setting: MNIST over 100 IID clients (``fedloom.data.mnist_federated``), the McMahan et al.
2017 CNN and 2NN, cohorts of 10 and 100 clients, E=1, B=10, plain SGD. Rows:

* ``fedloom/sequential`` — clients one after another (the reference semantics);
* ``fedloom/vectorized`` — the cohort in lockstep (``fedloom.engines.VectorizedEngine``);
* ``centralized`` — the limit: ONE model trained on the cohort's pooled samples with batch
  cohort × B, the same number of steps per epoch as a client;
* ``flower`` — Flower's simulation engine (``flwr[simulation]``, Ray backend);
* ``pfl-research`` — Apple's pfl (``pfl`` on PyPI), its PyTorch simulation.

Each row runs in its own process, so its peak RSS (``resource.getrusage``) is its own. A row
reports the steady throughput (the fastest of ``--repeat`` rounds after the first), the time
to the first round (data loading + engine setup + first round) and the peak RSS.

Usage:
    python bench/throughput.py --json bench/results/throughput.json [--quick]
        [--models 2nn,cnn] [--cohorts 10,100] [--engines sequential,vectorized,centralized,flower,pfl-research]
        [--max-steps N] [--threads N] [--repeat N] [--chunk-size N]
        [--device cuda] [--precision fp32|tf32|bf16] [--cuda-graphs]
        [--setup-peers] [--flower-client-cpus N] [--peer-timeout S] [--markdown OUT.md]

The markdown table is printed, stored in the JSON (``table_md``) and, with ``--markdown``,
written to that file. ``--setup-peers`` alone only sets up the other frameworks' venvs.

``--quick`` caps local training at 10 steps per client (``--max-steps 10``): the same
per-step work, a fraction of the time. Timings on a shared machine are noisy. On Linux with
autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled`` = 1, the default on many
distributions) ``nice`` only orders processes of one session: a benchmark at ``nice -n -15``
still shares the cores equally with another session's jobs. Measure on an idle machine, or
(as root) ``echo 0 > /proc/sys/kernel/sched_autogroup_enabled`` so that nice values apply
across sessions.

Other frameworks plug in through :data:`EXTERNAL`: a runner takes ``(model, cohort,
settings)`` and returns a row like :func:`run_fedloom`'s (or one with ``"status": "not
measured"`` and the ``"reason"``). Each runs in its OWN virtual environment, set up (once,
idempotently) by ``--setup-peers`` or on first use: ``torch==2.13.0`` (the CPU wheel on this
machine's disk) is installed FIRST so that no CUDA torch is pulled, then the framework.

* ``flower`` — ``flwr[simulation]`` (Ray backend) in ``$FEDLOOM_FLWR_VENV`` (default
  ``/tmp/fedloom-flwr-venv``); ``bench/peers/flower/flower_throughput.py``: 100 virtual
  SuperNodes, FedAvg sampling ``cohort`` of them per round, ``--flower-client-cpus`` Ray CPUs
  per ClientApp actor (default 1: two single-threaded actors on two cores, the faster setting
  of ``shared/peers/flower``; Flower's own default is 2, one actor).
* ``pfl-research`` — ``pfl`` in ``$FEDLOOM_PFL_VENV`` (default ``/tmp/fedloom-pfl-venv``);
  ``bench/peers/pfl/pfl_throughput.py``: pfl's ``SimulatedBackend`` + ``FederatedAveraging``
  with a ``PyTorchModel``, in one process (no Horovod).

Both train fedloom's own model classes (loaded from ``src/fedloom/models/mnist.py``) from
fedloom's initial weights on fedloom's MNIST partition (written to a temporary directory by
:func:`_write_peer_data`) over the batches of fedloom's ``batch_order`` with plain SGD (Flower's
ClientApp runs ``bench/peers/peer_common.py``'s copy of fedloom's local loop, pfl its own
``PyTorchModel`` loop), and evaluate nothing. Their ``round_s`` is the training phase of a round (the cohort's updates
produced and back at the server, as a fedloom engine's ``run_cohort``), the fastest of the
timed rounds; ``round_full_s`` adds the framework's aggregation and model update. Their
``peak_rss_mb`` is the peak of the summed RSS of the framework's whole process tree (Flower:
driver, Ray daemons and actors), sampled every 0.5 s; ``peak_pss_mb`` counts shared pages once.
Their ``setup_s`` excludes imports (as fedloom's does), reported as ``imports_s``. Flower
dispatches round 1 while Ray and its actors are still starting, so its start-up cost shows in
``first_round_s`` (``details.ray_init_s``), not in ``setup_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LR = {"2nn": 0.1, "cnn": 0.05}

Row = dict[str, Any]
Runner = Callable[[str, int, dict[str, Any]], Row]



def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def run_fedloom(model: str, cohort: int, settings: dict[str, Any]) -> Row:
    """One row, in this process: fedloom's ``engine`` (or ``centralized``) on ``model`` and ``cohort``."""
    from fedloom.client.training import batch_order, train_local
    from fedloom.core.params import ParamSpec
    from fedloom.core.seeding import derive_seed
    from fedloom.core.types import ClientInstruction, TrainConfig
    from fedloom.data.base import Split
    from fedloom.data.mnist_federated import MNIST_TASK, mnist_federated
    from fedloom.models import build_model
    from fedloom.run import build_engine

    engine_name = settings["engine"]
    device = torch.device(settings.get("device") or "cpu")
    precision = settings.get("precision") or "fp32"
    cuda = device.type == "cuda"
    t_start = time.perf_counter()
    data = mnist_federated(num_clients=100, partition="iid", seed=0)

    def model_fn() -> torch.nn.Module:
        return build_model(model, MNIST_TASK)

    init = build_model(model, MNIST_TASK, seed=0)
    spec = ParamSpec.from_module(init)
    g = spec.module_vector(init)
    cohort_ids = data.client_ids[:cohort]
    cfg = TrainConfig(epochs=1, batch_size=10, lr=LR[model], max_steps=settings["max_steps"])

    def instructions(rnd: int) -> list[ClientInstruction]:
        return [ClientInstruction(round=rnd, client_id=c, train=cfg, seed=derive_seed(0, rnd, c)) for c in cohort_ids]

    if engine_name == "centralized":
        pooled = Split(
            torch.cat([data.clients[c].train.x for c in cohort_ids]), torch.cat([data.clients[c].train.y for c in cohort_ids])
        )
        steps = max(len(batch_order(len(data.clients[c].train), cfg, 0)) for c in cohort_ids)
        central = TrainConfig(epochs=1, batch_size=cfg.batch_size * cohort, lr=cfg.lr, max_steps=steps)
        samples = sum(len(b) for b in batch_order(len(pooled), central, 0))
        scratch = model_fn().to(device)
        pooled = Split(pooled.x.to(device), pooled.y.to(device))
        g_dev = g.to(device)
        autocast = precision == "bf16"  # the limit at the same precision: the whole step under bf16 autocast
        if cuda:  # tf32 (or not) for the centralized step as for the engine's
            torch.backends.cuda.matmul.fp32_precision = "tf32" if precision == "tf32" else "ieee"
            torch.backends.cudnn.conv.fp32_precision = "tf32" if precision == "tf32" else "ieee"
        setup_s = time.perf_counter() - t_start

        def one_round(rnd: int) -> None:
            ins = ClientInstruction(round=rnd, client_id="pooled", train=central, seed=rnd)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                train_local(scratch, spec, g_dev, pooled, ins)
            if cuda:
                torch.cuda.synchronize(device)

        mode = "centralized" if precision == "fp32" else f"centralized, {precision}"
    else:
        samples = sum(sum(len(b) for b in batch_order(len(data.clients[c].train), cfg, 0)) for c in cohort_ids)
        extra = {"precision": precision, "cuda_graphs": bool(settings.get("cuda_graphs"))}
        engine = build_engine(
            engine_name, model_fn=model_fn, dataset=data, spec=spec, device=str(device), chunk_size=settings["chunk_size"],
            **(extra if engine_name != "sequential" else {}),
        )  # fmt: skip
        setup_s = time.perf_counter() - t_start

        def one_round(rnd: int) -> None:
            for _ in engine.run_cohort(g, instructions(rnd)):
                pass
            if cuda:
                torch.cuda.synchronize(device)

        mode = getattr(engine, "mode", engine_name)
        if precision != "fp32" and engine_name != "sequential":
            mode += f", {precision}"
        if settings.get("cuda_graphs") and engine_name != "sequential":
            mode += ", cuda graphs"

    t0 = time.perf_counter()
    one_round(1)
    first_round_s = time.perf_counter() - t0
    times = []
    for rnd in range(2, 2 + settings["repeat"]):
        t1 = time.perf_counter()
        one_round(rnd)
        times.append(time.perf_counter() - t1)
    round_s = min(times)  # the least disturbed round: the machine may be shared
    return {
        "framework": "fedloom" if engine_name != "centralized" else "centralized",
        "engine": engine_name,
        "mode": mode,
        "model": model,
        "cohort": cohort,
        "samples": samples,
        "round_s": round(round_s, 3),
        "rounds_timed": len(times),
        "samples_per_s": round(samples / round_s, 1),
        "setup_s": round(setup_s, 3),
        "first_round_s": round(first_round_s, 3),
        "time_to_first_round_s": round(setup_s + first_round_s, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "precision": precision,
        **(
            {
                "gpu": torch.cuda.get_device_name(device),
                "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_gpu_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
                "chunk_size": (
                    engine.chunk_size_for(cfg) if engine_name == "vectorized" and hasattr(engine, "chunk_size_for") else None
                ),
                "graph_replays": getattr(engine, "graph_replays", None) if engine_name != "centralized" else None,
                "graph_failure": getattr(engine, "graph_failure", None) if engine_name != "centralized" else None,
            }
            if cuda
            else {}
        ),
    }


# ----------------------------------------------------------------------------- other frameworks
PEERS = Path(__file__).resolve().parent / "peers"
TORCH_PIN = "torch==2.13.0"  # the CPU wheel on this machine's disk; installed first, so no CUDA torch
PEER_VENVS = {
    "flower": Path(os.environ.get("FEDLOOM_FLWR_VENV", "/tmp/fedloom-flwr-venv")),
    "pfl-research": Path(os.environ.get("FEDLOOM_PFL_VENV", "/tmp/fedloom-pfl-venv")),
}
PEER_PACKAGES = {"flower": ["flwr[simulation]"], "pfl-research": ["pfl"]}
PEER_IMPORTS = {"flower": "import flwr, ray", "pfl-research": "import pfl.model.pytorch, pfl.algorithm"}
PEER_TIMEOUT_S = 3600


def _peer_env() -> dict[str, str]:
    """This environment minus what would leak fedloom's venv (or someone's Ray cluster) into a peer's."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "RAY_ADDRESS")}
    env.update(FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def setup_peer(name: str) -> tuple[Path | None, str | None]:
    """Create / complete ``name``'s venv (idempotent): ``(python, None)``, or ``(None, reason)``.

    The venv's python gets ``torch==2.13.0`` first, then the framework's packages; pip's
    output goes to ``<venv>.setup.log``. A venv that already imports torch 2.13.0 and the
    framework is left alone.
    """
    venv = PEER_VENVS[name]
    py = venv / "bin" / "python"
    check = f"import torch, sys; {PEER_IMPORTS[name]}; sys.exit(0 if torch.__version__.startswith('2.13.0') else 3)"
    env = _peer_env()

    def ok() -> bool:
        return py.exists() and subprocess.run([py, "-c", check], env=env, capture_output=True).returncode == 0

    if ok():
        return py, None
    log = venv.parent / f"{venv.name}.setup.log"
    steps = []
    if not py.exists():
        steps.append([getattr(sys, "_base_executable", None) or "python3", "-m", "venv", str(venv)])
    steps.append([str(py), "-m", "pip", "install", TORCH_PIN])
    steps.append([str(py), "-m", "pip", "install", *PEER_PACKAGES[name]])
    print(f"setting up {name} in {venv} (log: {log})", file=sys.stderr, flush=True)
    with open(log, "a") as f:
        for cmd in steps:
            f.write(f"$ {' '.join(map(str, cmd))}\n")
            f.flush()
            res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            f.write(res.stdout)
            if res.returncode != 0:
                errors = [ln for ln in res.stdout.splitlines() if "ERROR" in ln or "error:" in ln.lower()]
                detail = " | ".join(errors[-3:]) or res.stdout.strip().splitlines()[-1:]
                return None, f"`{' '.join(map(str, cmd[2:]))}` failed (exit {res.returncode}): {detail}"
    if not ok():
        res = subprocess.run([py, "-c", check], env=env, capture_output=True, text=True)
        return None, f"installed, but `{PEER_IMPORTS[name]}` with torch 2.13.0 fails: {res.stderr.strip()[-500:]}"
    return py, None


def _write_peer_data(directory: Path, model: str) -> None:
    """fedloom's data and initial model, for the peer scripts (format: bench/peers/peer_common.py)."""
    import numpy as np

    from fedloom.data.mnist_federated import MNIST_TASK, mnist_federated
    from fedloom.models import build_model

    data = mnist_federated(num_clients=100, partition="iid", seed=0)
    xs = [data.clients[c].train.x for c in data.client_ids]
    ys = [data.clients[c].train.y for c in data.client_ids]
    np.save(directory / "x.npy", torch.cat(xs).numpy())
    np.save(directory / "y.npy", torch.cat(ys).numpy())
    np.save(directory / "offsets.npy", np.cumsum([0] + [len(y) for y in ys]))
    torch.save(build_model(model, MNIST_TASK, seed=0).state_dict(), directory / f"init_{model}.pt")


def _proc_table() -> dict[int, tuple[int, int]]:
    """``{pid: (ppid, start time)}`` of every process on the machine."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    s = f.read().decode(errors="replace")
                fields = s[s.rfind(")") + 2 :].split()
                out[int(d)] = (int(fields[1]), int(fields[19]))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _status_kb(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class _TreeMonitor(threading.Thread):
    """Samples the process tree under ``root``: peak ΣRSS / ΣPSS, and every (pid, start time) seen."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.seen: dict[int, int] = {}
        self.peak_rss_kb = self.peak_pss_kb = self.peak_procs = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        table = _proc_table()
        kids: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            kids.setdefault(ppid, []).append(pid)
        tree, stack = [], [self.root]
        while stack:
            p = stack.pop()
            if p in table:
                tree.append(p)
                self.seen.setdefault(p, table[p][1])
            stack.extend(kids.get(p, []))
        rss = sum(_status_kb(f"/proc/{p}/status", "VmRSS:") for p in tree)
        pss = sum(_status_kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in tree)
        self.peak_rss_kb, self.peak_pss_kb = max(self.peak_rss_kb, rss), max(self.peak_pss_kb, pss)
        self.peak_procs = max(self.peak_procs, len(tree))

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def halt(self) -> None:
        self._halt.set()
        self.join()


def _end_processes(pgid: int, seen: dict[int, int], marker: str) -> list[int]:
    """End what a peer run left: its process group, every process seen in its tree (same pid AND
    start time), and any process whose command line names ``marker`` (the run's own temp dir).
    Returns the pids that had to be signalled."""

    def leftovers() -> list[int]:
        table = _proc_table()
        pids = {p for p, start in seen.items() if p in table and table[p][1] == start}
        for p in table:
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.add(p)
            except OSError:
                continue
        pids.discard(os.getpid())
        return sorted(pids)

    signalled: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        left = leftovers()
        for p in left:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        signalled += [p for p in left if p not in signalled]
        deadline = time.monotonic() + 5
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = leftovers()
        if not left:
            break
    return signalled


def _run_peer(cmd: list[str], workdir: Path, timeout: float) -> tuple[dict[str, Any] | None, dict[str, Any], str]:
    """Run a peer script in its own session with its tree sampled; ``(summary or None, memory, log tail)``."""
    log_path = workdir / "run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_peer_env(), start_new_session=True)
    mon = _TreeMonitor(proc.pid)
    mon.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        try:
            mon.halt()
        finally:
            leftover = _end_processes(proc.pid, mon.seen, str(workdir))
            proc.wait()
    text = log_path.read_text(errors="replace")
    summary = None
    for line in text.splitlines():
        if line.startswith("SUMMARY_JSON "):
            summary = json.loads(line[len("SUMMARY_JSON ") :])
    memory = {
        "peak_rss_mb": round(mon.peak_rss_kb / 1024, 1),
        "peak_pss_mb": round(mon.peak_pss_kb / 1024, 1),
        "peak_processes": mon.peak_procs,
        "processes_ended_after_run": len(leftover),
        "returncode": proc.returncode,
        "timed_out": timed_out,
    }
    return summary, memory, "\n".join(text.splitlines()[-40:])


def _not_measured(framework: str, model: str, cohort: int, reason: str, status: str = "not measured") -> Row:
    return {
        "framework": framework, "engine": framework, "mode": framework, "model": model, "cohort": cohort,
        "status": status, "reason": reason,
    }  # fmt: skip


def _peer_row(framework: str, mode: str, model: str, cohort: int, summary: dict[str, Any], memory: dict[str, Any]) -> Row:
    """A row like run_fedloom's from a peer script's per-round times (round 1 untimed, as fedloom's)."""
    rounds = summary["rounds"]
    first, timed = rounds[0], rounds[1:] or rounds[:1]
    samples = timed[0]["samples"]
    if any(r["samples"] != samples for r in rounds):
        raise RuntimeError(f"{framework}: samples per round differ: {[r['samples'] for r in rounds]}")
    round_s = min(r["train_s"] for r in timed)  # the least disturbed round, as fedloom's rows
    full_s = min(r["round_s"] for r in timed)
    median = sorted(r["train_s"] for r in timed)[len(timed) // 2]
    setup_s = summary["setup_s"]
    return {
        "framework": framework,
        "engine": framework,
        "mode": mode,
        "model": model,
        "cohort": cohort,
        "samples": samples,
        "round_s": round(round_s, 3),
        "rounds_timed": len(rounds) - 1,
        "samples_per_s": round(samples / round_s, 1),
        "round_median_s": round(median, 3),
        "round_full_s": round(full_s, 3),
        "samples_per_s_full_round": round(samples / full_s, 1),
        "round_includes": "training + transport of the updates (full round: + aggregation + model update); no evaluation",
        "setup_s": round(setup_s, 3),
        "first_round_s": round(first["round_s"], 3),
        "time_to_first_round_s": round(setup_s + first["round_s"], 3),
        "imports_s": summary.get("imports_s"),
        "peak_rss_mb": memory["peak_rss_mb"],
        "peak_pss_mb": memory["peak_pss_mb"],
        "peak_processes": memory["peak_processes"],
        "threads": summary.get("threads"),
        "versions": summary.get("versions"),
        "per_round": rounds,
        "details": {k: v for k, v in summary.items() if k not in ("rounds", "versions", "threads")} | memory,
    }


def _peer_args(model: str, cohort: int, settings: dict[str, Any], workdir: Path) -> list[str]:
    return [
        "--model", model, "--cohort", str(cohort), "--rounds", str(1 + settings["repeat"]),
        "--lr", str(LR[model]), "--epochs", "1", "--batch-size", "10",
        "--max-steps", str(settings["max_steps"] or 0), "--threads", str(settings.get("threads") or 0),
        "--data-dir", str(workdir), "--models-src", str(Path(sys.modules["fedloom.models.mnist"].__file__)),
    ]  # fmt: skip


def _run_external(framework: str, script: Path, extra: list[str], mode: str, model: str, cohort: int,
                  settings: dict[str, Any]) -> Row:  # fmt: skip
    py, reason = setup_peer(framework)
    if py is None:
        return _not_measured(framework, model, cohort, reason or "setup failed")
    import fedloom.models.mnist  # noqa: F401  (its file is the peers' model source)

    # A short, unique directory: Ray's socket paths live under it, and it marks the run's processes.
    with tempfile.TemporaryDirectory(prefix="flb-", dir="/tmp") as tmp:
        workdir = Path(tmp)
        _write_peer_data(workdir, model)
        cmd = [str(py), str(script), *_peer_args(model, cohort, settings, workdir), *extra]
        summary, memory, tail = _run_peer(cmd, workdir, settings.get("timeout") or PEER_TIMEOUT_S)
    if summary is None or not summary.get("rounds"):
        last = " / ".join(ln.strip() for ln in tail.strip().splitlines()[-4:])
        why = f"timed out after {settings.get('timeout') or PEER_TIMEOUT_S:g} s (--peer-timeout)" if memory["timed_out"] else (
            f"run failed (exit {memory['returncode']})"
        )
        return _not_measured(framework, model, cohort, f"{why}: {last}", "failed")
    return _peer_row(framework, mode, model, cohort, summary, memory)


def run_flower(model: str, cohort: int, settings: dict[str, Any]) -> Row:
    """Flower's simulation engine (Ray backend), in its own venv and process tree."""
    cpus = float(settings.get("flower_client_cpus") or 1.0)
    actors = max(1, int((os.cpu_count() or 1) // cpus))
    mode = f"ray, {actors} actor{'s' if actors > 1 else ''} × {cpus:g} CPU"
    script = PEERS / "flower" / "flower_throughput.py"  # Ray's temp dir: <the run's workdir>/ray
    return _run_external(framework="flower", script=script, extra=["--client-cpus", f"{cpus:g}"], mode=mode,
                         model=model, cohort=cohort, settings=settings)  # fmt: skip


def run_pfl(model: str, cohort: int, settings: dict[str, Any]) -> Row:
    """pfl-research's simulation (SimulatedBackend, PyTorch), in its own venv, one process."""
    script = PEERS / "pfl" / "pfl_throughput.py"
    return _run_external(framework="pfl-research", script=script, extra=[], mode="SimulatedBackend, 1 process",
                         model=model, cohort=cohort, settings=settings)  # fmt: skip


EXTERNAL: dict[str, Runner] = {
    "flower": run_flower,  # flwr simulation (Ray backend), same model / data / cohort
    "pfl-research": run_pfl,  # pfl's PyTorch simulation, same model / data / cohort
}
"""Runners for other frameworks, keyed by framework name."""


def _child(args: argparse.Namespace) -> None:
    model, cohort, engine = args.single.split(":")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {
        "engine": engine,
        "max_steps": args.max_steps,
        "chunk_size": args.chunk_size,
        "repeat": args.repeat,
        "threads": args.threads,
        "device": args.device,
        "precision": args.precision,
        "cuda_graphs": args.cuda_graphs,
        "flower_client_cpus": args.flower_client_cpus,
        "timeout": args.peer_timeout,
    }
    runner = EXTERNAL.get(engine)
    row = runner(model, int(cohort), settings) if runner else run_fedloom(model, int(cohort), settings)
    print(json.dumps(row))


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _notes(r: Row) -> str:
    if r.get("status"):
        return _cell(f"**{r['status']}**: {r.get('reason', '')}")
    if r["framework"] not in EXTERNAL:
        return ""
    v = r.get("versions") or {}
    name = {"flower": "flwr", "pfl-research": "pfl"}.get(r["framework"], r["framework"])
    extra = f", ray {v['ray']}" if "ray" in v else ""
    ray_init = (r.get("details") or {}).get("ray_init_s")
    ray = f"; Ray start-up ({ray_init:.1f} s) and actors inside round 1" if ray_init is not None else ""
    return (
        f"{name} {v.get(name, '?')}{extra}; full round (+ aggregation): {r['samples_per_s_full_round']:.0f} samples/s; "
        f"RSS summed over {r['peak_processes']} processes (PSS {r['peak_pss_mb']:.0f} MB); "
        f"imports {r['imports_s']:.1f} s{ray}"
    )


def _table(rows: list[Row]) -> str:
    base = {(r["model"], r["cohort"]): r["samples_per_s"] for r in rows if r["engine"] == "sequential" and not r.get("status")}
    lines = [
        "| model | cohort | engine | samples/s | × sequential | first round (s) | time to first round (s) | peak RSS (MB) | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        engine = r["engine"] if r["mode"] in (r["engine"], "centralized") else f"{r['engine']} ({r['mode']})"
        if r.get("status"):
            lines.append(f"| {r['model']} | {r['cohort']} | {engine} | – | – | – | – | – | {_notes(r)} |")
            continue
        ref = base.get((r["model"], r["cohort"]))
        speed = f"{r['samples_per_s'] / ref:.2f}" if ref else "–"
        lines.append(
            f"| {r['model']} | {r['cohort']} | {engine} | {r['samples_per_s']:.0f} | {speed} | "
            f"{r['first_round_s']:.2f} | {r['time_to_first_round_s']:.2f} | {r['peak_rss_mb']:.0f} | {_notes(r)} |"
        )
    if any(r["framework"] in EXTERNAL and not r.get("status") for r in rows):
        lines.append("")
        lines.append(
            "samples/s: samples of the round / the fastest timed round (round 1 untimed); no evaluation anywhere. "
            "fedloom rows time `run_cohort` (every client update produced); flower / pfl-research rows time the "
            "training phase (updates produced and back at the server), their full round with aggregation is in "
            "the notes. Peak RSS: fedloom rows, the process's own; flower / pfl-research, summed over their "
            "process tree (shared pages counted per process; PSS counts them once). Time to first round excludes "
            "imports everywhere."
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", type=Path, help="also write the markdown table here")
    p.add_argument("--quick", action="store_true", help="cap local training at 10 steps per client")
    p.add_argument("--models", default="2nn,cnn")
    p.add_argument("--cohorts", default="10,100")
    p.add_argument("--engines", default="sequential,vectorized,centralized,flower,pfl-research")
    p.add_argument("--max-steps", type=int, default=None, help="cap on local steps per client (default: a full epoch)")
    p.add_argument("--chunk-size", type=int, default=None, help="the vectorized engine's chunk size (default: automatic)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="fedloom rows' device: cpu, cuda, cuda:1 (peers run on CPU)")
    p.add_argument("--precision", default="fp32", help="fedloom rows' precision: fp32, tf32, bf16 (run.precision)")
    p.add_argument("--cuda-graphs", action="store_true", help="the vectorized engine replays full steps from CUDA graphs")
    p.add_argument("--repeat", type=int, default=2, help="timed rounds after the first; the fastest counts")
    p.add_argument("--setup-peers", action="store_true", help="set up the other frameworks' venvs (then go on if --json)")
    p.add_argument("--flower-client-cpus", type=float, default=1.0, help="Ray CPUs per Flower ClientApp actor")
    p.add_argument("--peer-timeout", type=float, default=PEER_TIMEOUT_S, help="seconds per flower / pfl-research row")
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick and args.max_steps is None:
        args.max_steps = 10
    if args.single:
        _child(args)
        return
    engines = args.engines.split(",")
    if args.setup_peers:
        for name in [e for e in engines if e in EXTERNAL] or list(EXTERNAL):
            py, reason = setup_peer(name)
            print(f"{name}: {py}" if py else f"{name}: not set up: {reason}", flush=True)
        if args.json is None:
            return
    if args.json is None:
        p.error("--json is required")

    out: dict[str, Any] = {
        "benchmark": "throughput",
        "setting": {
            "data": "mnist iid, 100 clients",
            "E": 1,
            "B": 10,
            "max_steps": args.max_steps,
            "lr": LR,
            "threads": args.threads or "default",
            "device": args.device,
            "precision": args.precision,
            "cuda_graphs": args.cuda_graphs,
            "repeat": args.repeat,
            "flower_client_cpus": args.flower_client_cpus,
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "external": {name: None for name in EXTERNAL},  # filled in from the EXTERNAL runners' rows
        "rows": [],
    }

    def save() -> None:
        out["table_md"] = _table(out["rows"])
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        if args.markdown:
            args.markdown.write_text(out["table_md"] + "\n")

    for model in args.models.split(","):
        for cohort in (int(c) for c in args.cohorts.split(",")):
            for engine in engines:
                cmd = [sys.executable, __file__, "--single", f"{model}:{cohort}:{engine}"]
                cmd += ["--threads", str(args.threads), "--repeat", str(args.repeat)]
                cmd += ["--flower-client-cpus", str(args.flower_client_cpus), "--peer-timeout", str(args.peer_timeout)]
                if args.max_steps is not None:
                    cmd += ["--max-steps", str(args.max_steps)]
                if args.chunk_size is not None:
                    cmd += ["--chunk-size", str(args.chunk_size)]
                cmd += ["--device", args.device, "--precision", args.precision]
                if args.cuda_graphs:
                    cmd += ["--cuda-graphs"]
                t = time.perf_counter()
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    print(f"{model}/{cohort}/{engine} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                    if engine not in EXTERNAL:
                        continue
                    last = " / ".join(res.stderr.strip().splitlines()[-3:])
                    row = _not_measured(engine, model, cohort, f"runner crashed: {last}", "failed")
                else:
                    row = json.loads(res.stdout.strip().splitlines()[-1])
                row["row_wall_s"] = round(time.perf_counter() - t, 1)
                out["rows"].append(row)
                fw = row["framework"]
                if fw in out["external"] and (out["external"][fw] is None or "status" in out["external"][fw]):
                    out["external"][fw] = (
                        {"status": row["status"], "reason": row["reason"]}
                        if row.get("status")
                        else {"versions": row.get("versions"), "mode": row["mode"]}
                    )
                speed = f"{row['samples_per_s']:.0f} samples/s" if not row.get("status") else row["status"]
                print(f"{model} cohort {cohort} {engine}: {speed} ({row['row_wall_s']:.0f} s)", flush=True)
                save()
    save()
    print(out["table_md"])


if __name__ == "__main__":
    main()
