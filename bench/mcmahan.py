"""Reproduce McMahan et al. 2017 (MNIST, 100 clients, C=0.1): rounds to reach a target accuracy.

Rows (paper, Table 2, FedAvg): 2NN with E=1, B=10 to 97% test accuracy (87 rounds IID,
664 non-IID); CNN with E=5, B=10 to 99% (20 rounds IID, 229 non-IID). Non-IID is the
pathological split (200 shards of 300 sorted by label, 2 per client).

Usage:
    python bench/mcmahan.py --json bench/results/mcmahan.json [--rows 2nn-iid,cnn-iid]
        [--max-rounds 300] [--time-budget 3600] [--engine sequential]

Writes the JSON after every round, so an interrupted run keeps what it reached.
The learning rates are fixed (not tuned per row as in the paper): 0.1 for the 2NN, 0.05
for the CNN, plain SGD (``--lr`` overrides). Rows already in the JSON are kept; a row that
is run again is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import time
from pathlib import Path

import torch

from fedloom.core.config import parse_config
from fedloom.run import Run, build_run

ROWS = {
    "2nn-iid": {"model": "2nn", "partition": "iid", "epochs": 1, "target": 0.97, "paper_rounds": 87, "lr": 0.1},
    "2nn-noniid": {"model": "2nn", "partition": "shards", "epochs": 1, "target": 0.97, "paper_rounds": 664, "lr": 0.1},
    "cnn-iid": {"model": "cnn", "partition": "iid", "epochs": 5, "target": 0.99, "paper_rounds": 20, "lr": 0.05},
    "cnn-noniid": {"model": "cnn", "partition": "shards", "epochs": 5, "target": 0.99, "paper_rounds": 229, "lr": 0.05},
}


def run_row(name: str, spec: dict, *, max_rounds: int, budget_s: float, engine: str, seed: int, out: dict, path: Path) -> None:
    cfg = parse_config(
        {
            "run": {"name": f"mcmahan-{name}", "seed": seed, "rounds": max_rounds, "engine": engine},
            "data": {"name": "mnist", "partition": spec["partition"], "num_clients": 100},
            "model": {"name": spec["model"]},
            "strategy": {"name": "fedavg", "fraction": 0.1},
            "client": {"epochs": spec["epochs"], "batch_size": 10, "lr": spec["lr"], "optimizer": "sgd"},
        }
    )
    t0 = time.perf_counter()
    run = build_run(cfg)
    setup_s = time.perf_counter() - t0
    row = {
        **spec,
        "engine": run.engine.name,
        "B": 10,
        "C": 0.1,
        "setup_s": round(setup_s, 2),
        "rounds_run": 0,
        "reached_round": None,
        "accuracy": [],
        "wall_s": 0.0,
        "stopped": "running",
    }
    out["rows"][name] = row
    t1 = time.perf_counter()
    try:
        _rounds(run, row, spec, max_rounds=max_rounds, budget_s=budget_s, out=out, path=path, name=name, t1=t1)
    except KeyboardInterrupt:
        row["stopped"] = f"interrupted after round {row['rounds_run']}"
        raise
    finally:
        row["best_accuracy"] = max(row["accuracy"]) if row["accuracy"] else None
        path.write_text(json.dumps(out, indent=1))


def _rounds(run: Run, row: dict, spec: dict, *, max_rounds: int, budget_s: float, out: dict, path: Path, name: str,
            t1: float) -> None:
    while run.federation.state.round < max_rounds:
        rec = run.federation.step()
        acc = rec.metrics["test_accuracy"]
        row["accuracy"].append(round(acc, 5))
        row["rounds_run"] = rec.round
        row["wall_s"] = round(time.perf_counter() - t1, 1)
        row["sec_per_round"] = round(row["wall_s"] / rec.round, 3)
        print(f"{name} round {rec.round:4d} acc {acc:.4f} ({rec.seconds:.1f} s)", flush=True)
        if acc >= spec["target"] and row["reached_round"] is None:
            row["reached_round"] = rec.round
            row["stopped"] = "target reached"
        path.write_text(json.dumps(out, indent=1))
        if row["reached_round"] is not None:
            break
        if time.perf_counter() - t1 > budget_s:
            row["stopped"] = f"time budget {budget_s:.0f} s"
            break
    else:
        row["stopped"] = f"max rounds {max_rounds}"


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--max-rounds", type=int, default=1000)
    ap.add_argument("--time-budget", type=float, default=3600.0, help="seconds per row")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None, help="override every row's client learning rate")
    args = ap.parse_args()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    out = json.loads(args.json.read_text()) if args.json.exists() else {}
    out.update(
        {
            "benchmark": "mcmahan2017",
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
        }
    )
    out.setdefault("rows", {})
    for name in args.rows.split(","):
        row = {**ROWS[name], **({"lr": args.lr} if args.lr is not None else {})}
        run_row(name, row, max_rounds=args.max_rounds, budget_s=args.time_budget, engine=args.engine,
                seed=args.seed, out=out, path=args.json)


if __name__ == "__main__":
    main()
