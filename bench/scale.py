"""Scale: cohorts of 100, 1,000 and 3,400 clients out of 3,400 — memory and speed (issue 14 item 2).

MNIST's 60,000 training images over 3,400 clients with power-law sizes (``partition =
"power_law"``: every client >= 10 examples, the rest by LogNormal(0, 1) shares; mean 17.6,
a long tail — FEMNIST's client count, not its sizes: MNIST has only 60k images), the McMahan
2NN and CNN, E = 1, B = 10, plain SGD, the vectorized engine with its automatic chunk size.
Each (model, cohort) runs in a fresh process so that its peak RSS is its own: the process
builds the run (dataset, model, engine), records its RSS, runs ``--rounds`` rounds (the
cohort drawn with C = cohort / 3,400) and records the peak RSS (``ru_maxrss``) and the
samples/s of the last round (client samples trained / round seconds, evaluation excluded).

The claim under test: the server's memory is bounded by the engine's chunk and the
streaming aggregate, not by the cohort (``growth_mb`` = peak − RSS after setup should not
grow with the cohort beyond the updates' per-client bookkeeping).

Usage:
    OMP_NUM_THREADS=1 python bench/scale.py --json bench/results/scale_cpu.json [--models 2nn,cnn]
        [--cohorts 100,1000,3400] [--rounds 2]
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
from pathlib import Path

POPULATION = 3400


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(model: str, cohort: int, rounds: int, chunk: int | None = None) -> dict:
    import torch

    from fedloom.core.config import parse_config
    from fedloom.run import build_run

    lr = {"2nn": 0.1, "cnn": 0.05}[model]
    cfg = parse_config(
        {
            "run": {
                "name": f"scale-{model}-{cohort}", "seed": 0, "rounds": rounds, "engine": "vectorized",
                "eval_every": rounds, "chunk_size": chunk,
            },  # fmt: skip
            "data": {"name": "mnist", "partition": "power_law", "num_clients": POPULATION, "sigma": 1.0, "min_size": 10},
            "model": {"name": model},
            "strategy": {"name": "fedavg", "fraction": cohort / POPULATION},
            "client": {"epochs": 1, "batch_size": 10, "lr": lr},
        }
    )
    t0 = time.perf_counter()
    run = build_run(cfg)
    setup_s = time.perf_counter() - t0
    rss_setup = _rss_mb()
    eng = run.engine
    rows = []
    for _ in range(rounds):
        t = time.perf_counter()
        rec = run.federation.step()
        wall = time.perf_counter() - t
        samples = sum(len(run.dataset.clients[c].train) for c in rec.clients)
        rows.append({"round": rec.round, "clients": len(rec.clients), "samples": samples, "seconds": round(wall, 3)})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    last = rows[-1]
    return {
        "model": model,
        "cohort": cohort,
        "population": POPULATION,
        "engine": eng.name,
        "mode": getattr(eng, "mode", ""),
        "chunk_size": eng.chunk_size_for(run.strategy.train) if hasattr(eng, "chunk_size_for") else None,
        "setup_s": round(setup_s, 2),
        "rss_after_setup_mb": round(rss_setup, 1),
        "peak_rss_mb": round(peak, 1),
        "growth_mb": round(peak - rss_setup, 1),
        "samples_per_s": round(last["samples"] / last["seconds"], 1),
        "rounds": rows,
        "mean_client_examples": round(sum(len(c.train) for c in run.dataset.clients.values()) / POPULATION, 2),
        "torch_threads": torch.get_num_threads(),
        "test_accuracy": run.federation.history.records[-1].metrics.get("test_accuracy"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--models", default="2nn,cnn")
    ap.add_argument("--cohorts", default="100,1000,3400")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunk-sizes", default="auto", help="comma-separated clients per lockstep chunk (auto: the engine's)")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "COHORT", "CHUNK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        chunk = None if a.child[2] == "auto" else int(a.child[2])
        print(json.dumps(child(a.child[0], int(a.child[1]), a.rounds, chunk)))
        return
    rows = []
    runs = [(m, int(c), k) for m in a.models.split(",") for k in a.chunk_sizes.split(",") for c in a.cohorts.split(",")]
    for model, cohort, chunk in runs:
        out = subprocess.run(
            [sys.executable, __file__, "--json", "-", "--rounds", str(a.rounds), "--child", model, str(cohort), chunk],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["chunk_setting"] = chunk
        rows.append(row)
        print(
            f"{model} cohort {cohort}: peak {row['peak_rss_mb']} MB (+{row['growth_mb']} after setup), "
            f"{row['samples_per_s']} samples/s, chunk {row['chunk_size']} ({chunk})",
            flush=True,
        )
    result = {
        "benchmark": "scale",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "rows": rows,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
