"""Simulation throughput: client-samples trained per second, per engine (and, later, per framework).

Setting: MNIST over 100 IID clients (``fedloom.data.mnist_federated``), the McMahan et al.
2017 CNN and 2NN, cohorts of 10 and 100 clients, E=1, B=10, plain SGD. Rows:

* ``fedloom/sequential`` — clients one after another (the reference semantics);
* ``fedloom/vectorized`` — the cohort in lockstep (``fedloom.engines.VectorizedEngine``);
* ``centralized`` — the limit: ONE model trained on the cohort's pooled samples with batch
  cohort × B, the same number of steps per epoch as a client.

Each row runs in its own process, so its peak RSS (``resource.getrusage``) is its own. A row
reports the steady throughput (the fastest of ``--repeat`` rounds after the first), the time
to the first round (data loading + engine setup + first round) and the peak RSS.

Usage:
    python bench/throughput.py --json bench/results/throughput.json [--quick]
        [--models 2nn,cnn] [--cohorts 10,100] [--engines sequential,vectorized,centralized]
        [--max-steps N] [--threads N] [--repeat N] [--chunk-size N]

``--quick`` caps local training at 10 steps per client (``--max-steps 10``): the same
per-step work, a fraction of the time. Timings on a shared machine are noisy.

Other frameworks (Flower simulation, pfl-research) plug in through :data:`EXTERNAL`: a
runner takes ``(model, cohort, settings)`` and returns a row like :func:`run_fedloom`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

LR = {"2nn": 0.1, "cnn": 0.05}

Row = dict[str, Any]
Runner = Callable[[str, int, dict[str, Any]], Row]

EXTERNAL: dict[str, Runner] = {
    # "flower": run_flower,          # flwr simulation (Ray backend), same model / data / cohort
    # "pfl-research": run_pfl,       # pfl's PyTorch simulation, same model / data / cohort
}
"""Runners for other frameworks, keyed by framework name (to be added)."""


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
    from fedloom.federation.builder import build_engine
    from fedloom.models import build_model

    engine_name = settings["engine"]
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
        scratch = model_fn()
        setup_s = time.perf_counter() - t_start

        def one_round(rnd: int) -> None:
            train_local(scratch, spec, g, pooled, ClientInstruction(round=rnd, client_id="pooled", train=central, seed=rnd))

        mode = "centralized"
    else:
        samples = sum(sum(len(b) for b in batch_order(len(data.clients[c].train), cfg, 0)) for c in cohort_ids)
        engine = build_engine(
            engine_name, model_fn=model_fn, dataset=data, spec=spec, device="cpu", chunk_size=settings["chunk_size"]
        )
        setup_s = time.perf_counter() - t_start

        def one_round(rnd: int) -> None:
            for _ in engine.run_cohort(g, instructions(rnd)):
                pass

        mode = getattr(engine, "mode", engine_name)

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
    }


def _child(args: argparse.Namespace) -> None:
    model, cohort, engine = args.single.split(":")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {"engine": engine, "max_steps": args.max_steps, "chunk_size": args.chunk_size, "repeat": args.repeat}
    runner = EXTERNAL.get(engine)
    row = runner(model, int(cohort), settings) if runner else run_fedloom(model, int(cohort), settings)
    print(json.dumps(row))


def _table(rows: list[Row]) -> str:
    base = {(r["model"], r["cohort"]): r["samples_per_s"] for r in rows if r["engine"] == "sequential"}
    lines = [
        "| model | cohort | engine | samples/s | × sequential | first round (s) | time to first round (s) | peak RSS (MB) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = base.get((r["model"], r["cohort"]))
        speed = f"{r['samples_per_s'] / ref:.2f}" if ref else "–"
        engine = r["engine"] if r["mode"] in (r["engine"], "centralized") else f"{r['engine']} ({r['mode']})"
        lines.append(
            f"| {r['model']} | {r['cohort']} | {engine} | {r['samples_per_s']:.0f} | {speed} | "
            f"{r['first_round_s']:.2f} | {r['time_to_first_round_s']:.2f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--quick", action="store_true", help="cap local training at 10 steps per client")
    p.add_argument("--models", default="2nn,cnn")
    p.add_argument("--cohorts", default="10,100")
    p.add_argument("--engines", default="sequential,vectorized,centralized")
    p.add_argument("--max-steps", type=int, default=None, help="cap on local steps per client (default: a full epoch)")
    p.add_argument("--chunk-size", type=int, default=None, help="the vectorized engine's chunk size (default: automatic)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default: torch's choice)")
    p.add_argument("--repeat", type=int, default=2, help="timed rounds after the first; the fastest counts")
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick and args.max_steps is None:
        args.max_steps = 10
    if args.single:
        _child(args)
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
            "repeat": args.repeat,
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "external": {name: None for name in ("flower", "pfl-research")},  # filled in by EXTERNAL runners
        "rows": [],
    }
    for model in args.models.split(","):
        for cohort in (int(c) for c in args.cohorts.split(",")):
            for engine in args.engines.split(","):
                cmd = [sys.executable, __file__, "--single", f"{model}:{cohort}:{engine}"]
                cmd += ["--threads", str(args.threads), "--repeat", str(args.repeat)]
                if args.max_steps is not None:
                    cmd += ["--max-steps", str(args.max_steps)]
                if args.chunk_size is not None:
                    cmd += ["--chunk-size", str(args.chunk_size)]
                res = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if res.returncode != 0:
                    print(f"{model}/{cohort}/{engine} failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(res.stdout.strip().splitlines()[-1])
                out["rows"].append(row)
                print(f"{model} cohort {cohort} {engine}: {row['samples_per_s']:.0f} samples/s", flush=True)
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(out, indent=2))
    print(_table(out["rows"]))


if __name__ == "__main__":
    main()
