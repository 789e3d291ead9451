"""Byzantine robustness on non-IID MNIST: every attack x attacker share x defence.

Setting: the McMahan 2NN on MNIST split over 100 clients non-IID (200 label-sorted shards
of 300, 2 per client: McMahan et al. 2017), 20 clients per round (C = 0.2), E = 1, B = 10,
SGD lr 0.1, R rounds (40 by default), seed 0, the vectorized engine. The attackers are a
seeded share p ∈ {10, 20, 30}% of the population (so a round holds a varying number of
them), the same clients for every defence. Attacks (``fedloom.attacks``; omniscient where
they collude):

* ``sign_flip`` (−Δ), ``scale`` (10·Δ), ``gaussian`` (N(0, 1) entries), ``label_flip``
  (c → 9 − c in the attackers' data), ``alie`` (Baruch et al. 2019, z from n and f),
  ``ipm`` (Xie et al. 2020, ε = 0.5), ``inflate`` (100x the example count, with −Δ).

Defences, each tuned for the row's share p as a defender who knows a bound on it would be
(the 0% rows use the 10% settings), with m = 20 clients a round and f = ⌈p·m⌉ + 1:

* ``fedavg`` (example-weighted mean, no defence), ``median``, ``trimmed_mean`` (β = f/m),
  ``krum`` and ``multikrum`` (f; Multi-Krum averages n − f), ``norm_bound`` (FedAvg whose
  server bounds each update's norm at M, Sun et al. 2019; M is the median over rounds of the
  honest updates' mean norm in the attack-free run, measured first), ``centered_clip``
  (Karimireddy et al. 2021/2022: buckets of 2, 3 iterations, radius τ = M around the previous
  round's aggregate) and ``fedavg_capped``
  (FedAvg with example weights capped at the honest count, 600: the weight-robust option
  against inflated counts; run for the attack-free and ``inflate`` rows only, elsewhere it
  is plain FedAvg: every honest client holds 600 examples).

For every row: test accuracy after R rounds and the mean over the last 5 rounds (non-IID
accuracy moves from round to round), against the attack-free FedAvg. The target: at 20%
attackers the best defence loses under 2 points against attack-free FedAvg, for every attack.

Usage:
    python bench/robustness.py --json bench/results/robustness_cpu.json \\
        [--attacks sign_flip,alie] [--shares 0.1,0.2,0.3] [--defences fedavg,median] [--rounds 50]

Writes the JSON (and a Markdown table beside it) after every row; rows already in the JSON
are kept unless run again (``--redo``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import fedloom

ATTACKS: dict[str, dict[str, Any]] = {
    "sign_flip": {"name": "sign_flip"},
    "scale": {"name": "scale", "factor": 10.0},
    "gaussian": {"name": "gaussian", "sigma": 1.0},
    "label_flip": {"name": "label_flip"},
    "alie": {"name": "alie"},
    "ipm": {"name": "ipm", "epsilon": 0.5},
    "inflate": {"name": "inflate", "factor": 100.0, "delta_scale": -1.0},
}
DEFENCES = ("fedavg", "median", "trimmed_mean", "krum", "multikrum", "norm_bound", "centered_clip", "fedavg_capped")
SHARES = (0.1, 0.2, 0.3)
COHORT = 20
HONEST_EXAMPLES = 600  # 60,000 / 100 clients


def _defence(name: str, share: float, max_norm: float | None) -> dict[str, Any]:
    """The config tables (strategy, pipeline) of a defence tuned for attacker share ``share``."""
    f = math.ceil(max(share, 0.1) * COHORT) + 1
    strategy: dict[str, Any] = {"name": "fedavg", "fraction": COHORT / 100}
    pipeline: list[dict[str, Any]] = []
    if name in ("median", "krum", "multikrum", "trimmed_mean", "centered_clip"):
        strategy["name"] = name
    if name == "centered_clip":
        assert max_norm is not None
        strategy.update(tau=max_norm, bucket=2, iterations=3)
    if name in ("krum", "multikrum"):
        strategy["f"] = f
    if name == "trimmed_mean":
        strategy["beta"] = f / COHORT
    if name == "norm_bound":
        assert max_norm is not None
        pipeline = [{"name": "norm_bound", "max_norm": max_norm}]
    if name == "fedavg_capped":
        pipeline = [{"name": "weight_examples", "cap": HONEST_EXAMPLES}]
    return {"strategy": strategy, "pipeline": pipeline}


def run_row(attack: str | None, share: float, defence: str, *, rounds: int, seed: int, max_norm: float | None) -> dict[str, Any]:
    d = _defence(defence, share, max_norm)
    cfg: dict[str, Any] = {
        "run": {"name": f"robust-{attack}-{share}-{defence}", "seed": seed, "rounds": rounds, "engine": "vectorized"},
        "data": {"name": "mnist", "partition": "shards", "num_clients": 100},
        "model": {"name": "2nn"},
        "strategy": d["strategy"],
        "client": {"epochs": 1, "batch_size": 10, "lr": 0.1},
        "pipeline": d["pipeline"],
    }
    if attack is not None:
        cfg["attack"] = {**ATTACKS[attack], "fraction": share}
    run = fedloom.build_run(fedloom.parse_config(cfg))
    t0 = time.perf_counter()
    hist = run.federation.run(rounds)
    wall = time.perf_counter() - t0
    acc = [r.metrics.get("test_accuracy", float("nan")) for r in hist]
    norms = [r.metrics["train_update_norm"] for r in hist if "train_update_norm" in r.metrics]
    attackers = run.federation.adversary.attackers if run.federation.adversary is not None else frozenset()
    per_round = [sum(c in attackers for c in r.clients) for r in hist]
    return {
        "attack": attack or "none",
        "share": share if attack is not None else 0.0,
        "defence": defence,
        "defence_config": d,
        "rounds": rounds,
        "final_accuracy": acc[-1],
        "last5_accuracy": statistics.fmean(acc[-5:]),
        "accuracy": acc,
        "statuses": {s: sum(r.status == s for r in hist) for s in {r.status for r in hist}},
        "attackers_per_round": per_round,
        "rejected": sum(len(r.rejected) for r in hist),
        "update_norms": norms,
        "wall_seconds": wall,
    }


def _key(row: dict[str, Any]) -> tuple[str, float, str]:
    return row["attack"], row["share"], row["defence"]


def markdown(out: dict[str, Any]) -> str:
    rows = {_key(r): r for r in out["rows"]}
    base = rows.get(("none", 0.0, "fedavg"))
    ref = base["last5_accuracy"] if base else float("nan")
    lines = [
        "# Byzantine robustness, MNIST 2NN non-IID (shards), 100 clients, 20 a round",
        "",
        f"Test accuracy (mean of the last 5 of {out['rounds']} rounds, %); attack-free FedAvg: {100 * ref:.2f}%. "
        f"Machine: {out['machine']['platform']}, {out['machine']['cpu_count']} CPUs. M (norm bound) = {out.get('max_norm', float('nan')):.3f}.",
        "",
    ]
    defs = [d for d in DEFENCES if any(k[2] == d for k in rows)]
    lines.append("| attack | attackers | " + " | ".join(defs) + " | best − clean FedAvg |")
    lines.append("|---|---:|" + "---:|" * len(defs) + "---:|")
    for attack in ["none", *ATTACKS]:
        for share in ([0.0] if attack == "none" else SHARES):
            cells = [rows.get((attack, share, d)) for d in defs]
            if not any(cells):
                continue
            vals = [c["last5_accuracy"] if c else float("nan") for c in cells]
            best = max((v for v in vals if not math.isnan(v)), default=float("nan"))
            txt = [f"{100 * v:.2f}" if not math.isnan(v) else "" for v in vals]
            gap = f"{100 * (best - ref):+.2f}" if attack != "none" else ""
            lines.append(f"| {attack} | {int(share * 100)}% | " + " | ".join(txt) + f" | {gap} |")
    lines.append("")
    lines.append("Final-round accuracy and per-round curves are in the JSON.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--shares", default=",".join(map(str, SHARES)))
    ap.add_argument("--defences", default=",".join(DEFENCES))
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--redo", action="store_true", help="run rows again even if the JSON has them")
    args = ap.parse_args()
    path = Path(args.json)
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    if out.get("rounds") not in (None, args.rounds) or out.get("seed") not in (None, args.seed):
        raise SystemExit(f"{path} holds rows for other rounds/seed; use another --json")
    out.update(
        rounds=args.rounds,
        seed=args.seed,
        machine={"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        command="python bench/robustness.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in (False, None)),
    )
    out.setdefault("rows", [])
    done = {_key(r): r for r in out["rows"]}

    def save() -> None:
        out["rows"] = sorted(done.values(), key=lambda r: (r["attack"], r["share"], r["defence"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        path.with_suffix(".md").write_text(markdown(out))

    defences = [d for d in args.defences.split(",") if d]
    # M for norm bounding: the honest updates' norms in the attack-free run (measured with an unreachable bound)
    if "max_norm" not in out:
        probe = run_row(None, 0.0, "norm_bound", rounds=args.rounds, seed=args.seed, max_norm=1e30)
        out["max_norm"] = statistics.median(probe["update_norms"])
        out["max_norm_probe"] = {"update_norms": probe["update_norms"], "last5_accuracy": probe["last5_accuracy"]}
        print(f"norm bound M = {out['max_norm']:.4f} (median of the honest mean update norm over rounds)", flush=True)
        save()
    max_norm = out["max_norm"]
    todo: list[tuple[str | None, float]] = [(None, 0.0)]
    todo += [(a, float(s)) for a in args.attacks.split(",") if a for s in args.shares.split(",") if s]
    for attack, share in todo:
        for defence in defences:
            key = (attack or "none", share if attack else 0.0, defence)
            if defence == "fedavg_capped" and attack not in (None, "inflate"):
                continue  # the same run as fedavg: no client declares more than the cap
            if key in done and not args.redo:
                continue
            row = run_row(attack, share, defence, rounds=args.rounds, seed=args.seed, max_norm=max_norm)
            done[key] = row
            print(
                f"{key[0]:>10} {int(100 * key[1]):>3}% {defence:>13}: last-5 {100 * row['last5_accuracy']:6.2f}%  "
                f"final {100 * row['final_accuracy']:6.2f}%  ({row['wall_seconds']:.0f} s)",
                flush=True,
            )
            save()


if __name__ == "__main__":
    main()
