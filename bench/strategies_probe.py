"""Probe single (setting, strategy, parameters) runs beyond bench/strategies.py's fixed grids.

bench/strategies.py scores every strategy on a fixed grid of one key parameter. This script
runs any other combination on the same settings (``strategies.SETTINGS``, the same config
builder, seed 0, one torch thread) to look for a setting where a strategy needs half of
FedAvg's rounds: joint client/server learning rates, server momentum (FedAvgM), other FedDyn
alphas, more local epochs. It is exploration, scored on the test set like the grids; its
results are evidence for what does *not* reach the goal, never a replacement for the table.

A job is ``SETTING STRATEGY JSON``; JSON holds strategy parameters plus the client keys
``lr`` and ``epochs``. On the MNIST settings a run stops 10 rounds after it first reaches the
setting's fixed target (or at ``--cap``, or at a non-finite metric); on the scenarios it runs
``--cap`` rounds and keeps the whole curve.

Usage:
    nice -n 5 python bench/strategies_probe.py --json bench/results/strategies_probe_cpu.json \\
        --cap 400 --job 'mnist-shards fedavgm {"server_momentum": 0.7, "server_lr": 0.5}' \\
        --job 'mnist-shards feddyn {"alpha": 0.01, "epochs": 5}' [--parallel 2]

Results are appended to the JSON (a list under ``runs``) as each job ends.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ACCURACIES = (0.95, 0.96, 0.97)


def parse_job(text: str) -> tuple[str, str, dict[str, Any]]:
    """``SETTING STRATEGY JSON`` → its three parts (a clear error for anything else)."""
    parts = text.split(maxsplit=2)
    if len(parts) != 3:
        raise SystemExit(f"--job {text!r}: expected 'SETTING STRATEGY JSON'")
    try:
        params = json.loads(parts[2])
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--job {text!r}: parameters are not JSON ({exc})") from None
    if not isinstance(params, dict):
        raise SystemExit(f"--job {text!r}: parameters must be a JSON object")
    return parts[0], parts[1], params


def run_job(setting: str, strategy: str, params: dict[str, Any], cap: int) -> dict[str, Any]:
    """One run in this process; the caller runs it in a child (one thread each)."""
    import torch

    sys.path.insert(0, str(HERE))
    import fedloom
    import strategies as S  # noqa: N812  (bench/strategies.py)

    torch.set_num_threads(1)
    s = S.SETTINGS[setting]
    params = dict(params)
    epochs = params.pop("epochs", None)
    cfg = S.config(setting, strategy, params, cap, 0, "auto")
    if epochs is not None:
        cfg["client"]["epochs"] = epochs
    run = fedloom.build_run(fedloom.parse_config(cfg))
    fed = run.federation
    metric = s["metric"]
    t0 = time.perf_counter()
    curve: list[float] = []
    hit: dict[str, int] = {}
    for r in range(1, cap + 1):
        v = float(fed.step().metrics.get(metric, float("nan")))
        curve.append(round(v, 6))
        if not math.isfinite(v):
            break
        if "target" in s:
            for t in ACCURACIES:
                if v >= t and str(t) not in hit:
                    hit[str(t)] = r
            if str(s["target"]) in hit and r >= hit[str(s["target"])] + 10:
                break
    out = {"setting": setting, "strategy": strategy,
           "params": {**params, **({"epochs": epochs} if epochs is not None else {})},
           "rounds_run": len(curve), "curve": curve, "wall_s": round(time.perf_counter() - t0, 1)}
    if "target" in s:
        out["first_round"] = hit
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--job", action="append", default=[], help="'SETTING STRATEGY JSON' (repeat)")
    ap.add_argument("--cap", type=int, default=400, help="rounds at most per run")
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (one process and one thread each)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one job, print its JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_job(*parse_job(args.one), args.cap)), flush=True)
        return
    jobs = [parse_job(j) for j in args.job]
    if not jobs:
        raise SystemExit("no --job given")
    sys.path.insert(0, str(HERE))
    import strategies as S  # noqa: N812

    for setting, _, _ in jobs:
        if setting not in S.SETTINGS:
            raise SystemExit(f"unknown setting {setting!r}; known: {', '.join(S.SETTINGS)}")

    def child(job: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
        text = f"{job[0]} {job[1]} {json.dumps(job[2])}"
        p = subprocess.run([sys.executable, __file__, "--json", str(args.json), "--cap", str(args.cap), "--one", text],
                           capture_output=True, text=True)
        if p.returncode:
            return {"job": text, "error": p.stderr[-2000:]}
        return json.loads(p.stdout.strip().splitlines()[-1])

    with cf.ThreadPoolExecutor(args.parallel) as ex:
        for res in ex.map(child, jobs):
            data = json.loads(args.json.read_text()) if args.json.exists() else {"runs": []}
            data["runs"].append({**res, "cap": args.cap, "seed": 0})
            args.json.write_text(json.dumps(data, indent=1))
            print(json.dumps({k: v for k, v in res.items() if k != "curve"}), flush=True)


if __name__ == "__main__":
    main()
