"""Driver traffic of the Ray engine: every update to the driver vs one partial sum per worker.

Usage:
    python bench/ray_partials.py --json bench/results/ray_partials_cpu.json [--cohorts 20,100] [--workers 2] [--rounds 3]

MNIST 2NN (McMahan et al. 2017), 100 IID clients, E=1, B=10, lr 0.1, FedAvg with C = cohort/100.
For each cohort size the same run is done twice on the same Ray workers' settings: with
``partials`` off (each worker streams every client's update to the driver, the path before
partial sums) and on (each worker checks and sums its shard and sends one float64 partial).
Reported per round: tensor bytes the driver received (``RayEngine.driver_bytes``), wall
seconds, and the final test accuracy (the two must agree up to float rounding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from fedloom.core.config import parse_config
from fedloom.run import build_run


def one(cohort: int, workers: int, rounds: int, partials: bool) -> dict:
    cfg = parse_config(
        {
            "run": {"name": "ray-partials", "seed": 0, "rounds": rounds, "engine": "ray", "ray_workers": workers},
            "data": {"name": "mnist", "partition": "iid", "num_clients": 100},
            "model": {"name": "2nn"},
            "strategy": {"name": "fedavg", "fraction": cohort / 100},
            "client": {"epochs": 1, "batch_size": 10, "lr": 0.1},
        }
    )
    run = build_run(cfg)
    eng = run.engine
    try:
        eng.partials = partials  # type: ignore[misc]
        run.federation.step()  # warm-up round (workers' first call), not timed
        b0, t0 = eng.driver_bytes, time.perf_counter()  # type: ignore[attr-defined]
        for _ in range(rounds - 1):
            run.federation.step()
        secs = (time.perf_counter() - t0) / (rounds - 1)
        per_round = (eng.driver_bytes - b0) / (rounds - 1)  # type: ignore[attr-defined]
        acc = run.federation.history[-1].metrics.get("test_accuracy")
    finally:
        eng.close()
    return {
        "cohort": cohort,
        "workers": workers,
        "mode": "partials" if partials else "updates",
        "driver_bytes_per_round": int(per_round),
        "seconds_per_round": round(secs, 3),
        "final_test_accuracy": acc,
        "numel": run.spec.numel,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--cohorts", default="20,100")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    rows = []
    for cohort in (int(c) for c in a.cohorts.split(",")):
        for partials in (False, True):
            row = one(cohort, a.workers, a.rounds, partials)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {
        "bench": "ray_partials",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "rows": rows,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
