"""Privacy-utility curves: test quality at ε ∈ {1, 2, 4, 8, ∞} for each DP mode, and the wall-time cost of DP.

Suites:

* ``mnist-2nn`` / ``mnist-cnn`` — user-level central DP (DP-FedAvg, McMahan et al. 2018, with
  adaptive quantile clipping, Andrew et al. 2021) on MNIST split IID over **1,000 clients of 60
  examples**, Poisson client sampling with rate q, δ = 1/N = 1e-3. Why 1,000 clients: the
  noise on the average is σ·C/(q·N), so user-level DP needs many clients per round; the
  McMahan 2017 split (100 clients of 600) would put ten times more noise on each round.
  Server momentum 0.9 (FedAvgM), as the DP-FedAvg paper used.
* ``hospital`` / ``fraud`` — sample-level DP-SGD (Abadi et al. 2016) in each site's local
  training (3 sites: user-level DP over three hospitals protects nobody's records), δ = 1/n
  with n the largest site's number of training records.

ε = ∞ is the same run without privacy (the same sampling; example weighting for FedAvg).
For each row: the noise multiplier the run chose for the target ε after its rounds (the
accountant is dp-accounting's RDP), the ε it reached, the final test metric, and the wall
time. ``overhead`` is the DP run's wall time over the non-private one's.

Usage:
    python bench/privacy.py --json bench/results/privacy_cpu.json [--suites mnist-2nn,hospital] \\
        [--eps 1,2,4,8,inf] [--rounds mnist-2nn=200] [--engine auto]

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
        "rounds": 200,
        "metric": "accuracy",
        "delta": 1e-3,
        "config": {
            "data": {"name": "mnist", "partition": "iid", "num_clients": 1000},
            "model": {"name": "2nn"},
            "strategy": {"name": "fedavgm", "fraction": 0.1, "sampling": "poisson", "server_momentum": 0.9, "server_lr": 1.0},
            "client": {"epochs": 1, "batch_size": 10, "lr": 0.1},
        },
        "privacy": {"clip_norm": 1.0, "adaptive_clipping": True, "target_quantile": 0.5},
    },
    "mnist-cnn": {
        "mode": "central",
        "rounds": 100,
        "metric": "accuracy",
        "delta": 1e-3,
        "config": {
            "data": {"name": "mnist", "partition": "iid", "num_clients": 1000},
            "model": {"name": "cnn"},
            "strategy": {"name": "fedavgm", "fraction": 0.1, "sampling": "poisson", "server_momentum": 0.9, "server_lr": 1.0},
            "client": {"epochs": 1, "batch_size": 10, "lr": 0.05},
        },
        "privacy": {"clip_norm": 1.0, "adaptive_clipping": True, "target_quantile": 0.5},
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
            "client": {"epochs": 1, "batch_size": 64, "lr": 0.001, "optimizer": "adam", "loss": "huber"},
        },
        "privacy": {"clip_norm": 1.0},
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
            "client": {"epochs": 1, "batch_size": 256, "lr": 0.001, "optimizer": "adam"},
        },
        "privacy": {"clip_norm": 1.0},
    },
}


def run_row(suite: str, eps: float, rounds: int, seed: int, engine: str) -> dict[str, Any]:
    s = SUITES[suite]
    cfg: dict[str, Any] = {
        "run": {"name": f"privacy-{suite}-{eps}", "seed": seed, "rounds": rounds, "engine": engine, "eval_every": max(1, rounds // 10)},
        **json.loads(json.dumps(s["config"])),
    }
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
    seconds = time.perf_counter() - t1
    last = h[-1].metrics
    key = f"test_{s['metric']}"
    return {
        "suite": suite,
        "mode": s["mode"] if math.isfinite(eps) else "none",
        "target_epsilon": eps if math.isfinite(eps) else None,
        "delta": s["delta"],
        "rounds": rounds,
        "noise_multiplier": r.privacy.noise_multiplier if r.privacy else None,
        "epsilon": last.get("dp_epsilon"),
        "metric": s["metric"],
        "value": last[key],
        "clip_norm_final": last.get("dp_clip_norm"),
        "seconds": seconds,
        "setup_seconds": setup,
        "engine": r.engine.name,
        "clients_per_round": sum(len(rec.clients) for rec in h) / len(h),
        "summary": r.privacy.summary if r.privacy else "no privacy",
    }


def _table(rows: list[dict[str, Any]]) -> str:
    base = {(r["suite"]): r for r in rows if r["target_epsilon"] is None}
    out = [
        "| suite | mode | target ε | ε reached | σ | metric | value | non-private | wall s | overhead |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["suite"], r["target_epsilon"] or math.inf)):
        b = base.get(r["suite"])
        over = f"{r['seconds'] / b['seconds']:.2f}x" if b and r is not b else ""
        eps = "" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        sigma = "" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.3f}"
        plain = "" if b is None else f"{b['value']:.4f}"
        target = r["target_epsilon"] if r["target_epsilon"] else "∞"
        out.append(
            f"| {r['suite']} | {r['mode']} | {target} | {eps} | {sigma} | {r['metric']} | {r['value']:.4f} | "
            f"{plain} | {r['seconds']:.0f} | {over} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--eps", default="1,2,4,8,inf")
    ap.add_argument("--rounds", default="", help="suite=R,... overrides")
    ap.add_argument("--seed", type=int, default=0)
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
    for suite in args.suites.split(","):
        for eps in eps_list:
            r = rounds.get(suite, SUITES[suite]["rounds"])
            row = run_row(suite, eps, r, args.seed, args.engine)
            print(json.dumps(row), flush=True)
            data["rows"] = [
                x for x in data["rows"] if not (x["suite"] == suite and x["target_epsilon"] == row["target_epsilon"])
            ] + [row]
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(data, indent=1))
            args.json.with_suffix(".md").write_text(_table(data["rows"]))


if __name__ == "__main__":
    main()
