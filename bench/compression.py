"""Communication compression on MNIST: bytes to a target accuracy and accuracy after R rounds.

FedAvg (McMahan et al. 2017 setup: 100 clients, C = 0.1, E = 1, B = 10, plain SGD) with the
McMahan 2NN and CNN, IID and non-IID (200 shards of 300 sorted by label, 2 per client), for
float32 updates against each compression stage of the update pipeline. For every row: the
round where the test accuracy first reaches the target (97% for the 2NN, 98.5% for the CNN),
the uplink and total (up + down) bytes spent until then, and the accuracy after a fixed
number of rounds. The bytes are the ones the run records (``history.json``'s bytes_up /
bytes_down: the payloads as encoded; in deployment the wire carries them plus framing).

Usage:
    python bench/compression.py --json bench/results/compression_cpu.json \\
        [--settings 2nn-iid,2nn-noniid,cnn-iid,cnn-noniid] [--codecs float32,qsgd4,topk1] [--rounds 2nn-iid=100,...]

Writes the JSON (and a Markdown table beside it) after every row; rows already in the JSON
are kept unless run again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import fedloom

SETTINGS: dict[str, dict[str, Any]] = {
    "2nn-iid": {"model": "2nn", "partition": "iid", "lr": 0.1, "target": 0.97, "rounds": 100},
    "2nn-noniid": {"model": "2nn", "partition": "shards", "lr": 0.1, "target": 0.97, "rounds": 300},
    "cnn-iid": {"model": "cnn", "partition": "iid", "lr": 0.05, "target": 0.985, "rounds": 60},
    "cnn-noniid": {"model": "cnn", "partition": "shards", "lr": 0.05, "target": 0.985, "rounds": 150},
}

CODECS: dict[str, dict[str, Any]] = {
    "float32": {"pipeline": []},
    "fp16": {"pipeline": [{"name": "fp16"}]},
    "bf16": {"pipeline": [{"name": "bf16"}]},
    "qsgd8": {"pipeline": [{"name": "qsgd", "bits": 8}]},
    "qsgd4": {"pipeline": [{"name": "qsgd", "bits": 4}]},
    "qsgd2": {"pipeline": [{"name": "qsgd", "bits": 2}]},
    "topk10": {"pipeline": [{"name": "topk", "fraction": 0.1}]},
    "topk1": {"pipeline": [{"name": "topk", "fraction": 0.01}]},
    "topk1-noef": {"pipeline": [{"name": "topk", "fraction": 0.01, "error_feedback": False}]},
    "qsgd4+down-fp16": {"pipeline": [{"name": "qsgd", "bits": 4}], "broadcast": {"name": "fp16"}},
    "topk1+down-qsgd8": {"pipeline": [{"name": "topk", "fraction": 0.01}], "broadcast": {"name": "qsgd", "bits": 8}},
}


def run_row(setting: str, codec: str, rounds: int, seed: int, engine: str) -> dict[str, Any]:
    s, c = SETTINGS[setting], CODECS[codec]
    cfg: dict[str, Any] = {
        "run": {"name": f"compression-{setting}-{codec}", "seed": seed, "rounds": rounds, "engine": engine},
        "data": {"name": "mnist", "partition": s["partition"], "num_clients": 100},
        # the committed CNN results were measured with He init (the CNN's default until it became PyTorch's)
        "model": {"name": s["model"], **({"init": "he"} if s["model"] == "cnn" else {})},
        "strategy": {"name": "fedavg", "fraction": 0.1},
        "client": {"epochs": 1, "batch_size": 10, "lr": s["lr"], "optimizer": "sgd"},
        "pipeline": c["pipeline"],
    }
    if "broadcast" in c:
        cfg["broadcast"] = c["broadcast"]
    run = fedloom.build_run(fedloom.parse_config(cfg))
    t0 = time.perf_counter()
    acc, up, down = [], 0, 0
    reached: dict[str, Any] | None = None
    for rec in (run.federation.step() for _ in range(rounds)):
        a = rec.metrics["test_accuracy"]
        acc.append(round(a, 5))
        up += rec.bytes_up
        down += rec.bytes_down
        if reached is None and a >= s["target"]:
            reached = {"round": rec.round, "bytes_up": up, "bytes_total": up + down}
        print(f"{setting} {codec} round {rec.round:4d} acc {a:.4f} up {rec.bytes_up:>10,d} B", flush=True)
    return {
        "setting": setting,
        "codec": codec,
        "config": {"pipeline": c["pipeline"], "broadcast": c.get("broadcast")},
        "engine": run.engine.name,
        "target": s["target"],
        "rounds": rounds,
        "reached": reached,
        "final_accuracy": acc[-1],
        "best_accuracy": max(acc),
        "bytes_up_per_round": up // rounds,
        "bytes_down_per_round": down // rounds,
        "accuracy": acc,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def markdown(out: dict[str, Any]) -> str:
    lines = [
        "| setting | codec | up B/round | round to target | uplink to target | total to target | "
        "uplink saving | acc after R | Δ vs float32 (pts) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = out["rows"]
    for key, r in rows.items():
        base = rows.get(f"{r['setting']}/float32")
        hit = r["reached"]
        saving = ""
        if hit and base and base["reached"]:
            saving = f"{base['reached']['bytes_up'] / hit['bytes_up']:.1f}x"
        delta = f"{100 * (r['final_accuracy'] - base['final_accuracy']):+.2f}" if base else ""
        lines.append(
            f"| {r['setting']} | {r['codec']} | {r['bytes_up_per_round']:,} | {hit['round'] if hit else '-'} | "
            f"{_mb(hit['bytes_up']) if hit else 'not reached'} | {_mb(hit['bytes_total']) if hit else '-'} | {saving} | "
            f"{100 * r['final_accuracy']:.2f}% (R={r['rounds']}) | {delta} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--rounds", default="", help="per-setting overrides, e.g. 2nn-iid=50,cnn-iid=30")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", default="auto")
    args = ap.parse_args()
    overrides = dict(item.split("=") for item in args.rounds.split(",") if item)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    out = json.loads(args.json.read_text()) if args.json.exists() else {"rows": {}}
    out["benchmark"] = "compression"
    out["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    out["command"] = "python bench/compression.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v)
    for setting in args.settings.split(","):
        rounds = int(overrides.get(setting, SETTINGS[setting]["rounds"]))
        for codec in args.codecs.split(","):
            out["rows"][f"{setting}/{codec}"] = run_row(setting, codec, rounds, args.seed, args.engine)
            args.json.write_text(json.dumps(out, indent=1))
            args.json.with_suffix(".md").write_text(markdown(out))


if __name__ == "__main__":
    main()
