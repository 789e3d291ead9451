"""Model cutting trade-offs: size, CPU latency and quality at 0/50/80/90/95% sparsity, float32 and int8.

For the MNIST CNN and each scenario (hospital MAE, fraud AUPRC, equipment F1) a federated
run trains with magnitude pruning during training (Zhu & Gupta's schedule: from round
``start`` ≈ 20% of the rounds to ``end`` ≈ 70%, then the mask stays and training goes on);
sparsity 0 is the same run without pruning. Each trained model is measured:

* ``metric`` — the task's headline test metric on the server's held-out split (float32),
  and again for the int8 and fp16 models (:mod:`fedloom.cutting.quantize`);
* ``bytes`` — the file ``fedloom export`` writes: dense float32 safetensors, the sparse
  float32 file (zeros as bits), and the sparse int8 file; ``x`` is dense float32 over it;
* ``latency`` — p50 milliseconds of one forward pass at batch 1 and 64 on one CPU thread
  (torch; onnxruntime for the float32 model), over ``--repeats`` calls after a warm-up.
  Unstructured sparsity does not speed up dense kernels, so latency is measured on the
  dense model, int8, fp16 and the *structured* model: the sparsest model with its all-zero
  units removed, and with 50% of each layer's neurons/channels removed (all-zero ones first,
  then by norm; no fine-tuning), reported with its metric.

Usage:
    python bench/cutting.py --json bench/results/cutting_cpu.json [--suites cnn,hospital] [--rounds cnn=30]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import fedloom
from fedloom.client.evaluate import evaluate_model
from fedloom.core.config import parse_config
from fedloom.cutting.quantize import build_model_from_cut, cut_state, save_cut
from fedloom.cutting.structured import cut
from fedloom.run import build_run

SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95)

SUITES: dict[str, dict[str, Any]] = {
    "cnn": {
        "rounds": 30,
        "config": {
            "data": {"name": "mnist", "partition": "iid", "num_clients": 100},
            "model": {"name": "cnn", "init": "torch"},
            "strategy": {"name": "fedavg", "fraction": 0.1},
            "client": {"epochs": 1, "batch_size": 10, "lr": 0.05},
        },
    },
    "hospital": {
        "rounds": 40,
        "config": {
            "data": {"name": "hospital"},
            "model": {"name": "mlp", "hidden": [64, 32]},
            "strategy": {"name": "fedavg", "fraction": 1.0},
            "client": {"epochs": 1, "batch_size": 64, "lr": 0.001, "optimizer": "adam", "loss": "huber"},
        },
    },
    "fraud": {
        "rounds": 20,
        "config": {
            "data": {"name": "fraud"},
            "model": {"name": "mlp", "hidden": [64, 32]},
            "strategy": {"name": "fedavg", "fraction": 1.0},
            "client": {"epochs": 1, "batch_size": 128, "lr": 0.002, "optimizer": "adam"},
        },
    },
    "equipment": {
        "rounds": 20,
        "config": {
            "data": {"name": "equipment"},
            "model": {"name": "mlp", "hidden": [64, 32]},
            "strategy": {"name": "fedavg", "fraction": 1.0},
            "client": {"epochs": 1, "batch_size": 64, "lr": 0.002, "optimizer": "adam"},
        },
    },
}


def _latency(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed(model, x, repeats)
    finally:
        torch.set_num_threads(threads)


def _timed(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _ort_latency(model: torch.nn.Module, x1: torch.Tensor, x64: torch.Tensor, repeats: int) -> dict[str, float] | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = os.path.join(d, "m.onnx")
        import logging

        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(model, (x64,), path, input_names=["input"], output_names=["output"],
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},), dynamo=True)  # fmt: skip
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        out = {}
        for name, x in (("b1", x1), ("b64", x64)):
            feed = {"input": x.numpy()}
            for _ in range(5):
                sess.run(None, feed)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times.append(time.perf_counter() - t0)
            out[name] = statistics.median(times) * 1e3
    return out


def _sizes(model: torch.nn.Module, d: str) -> dict[str, int]:
    out = {}
    for label, q, sparse in (("fp32_dense", "none", False), ("fp32_sparse", "none", True), ("int8_sparse", "int8", True), ("fp16_sparse", "fp16", True)):
        out[label] = save_cut(os.path.join(d, label), cut_state(model, q), quantize=q, sparse=sparse, metadata={})  # type: ignore[arg-type]
    return out


def _run_suite(name: str, rounds: int, repeats: int, seed: int, sparsities: tuple[float, ...] = SPARSITIES) -> list[dict[str, Any]]:
    spec = SUITES[name]
    rows = []
    sparsest = None
    for s in sparsities:
        cfg = {"run": {"name": f"{name}-{s}", "seed": seed, "rounds": rounds, "eval_every": rounds}, **spec["config"]}
        if s > 0:
            cfg["pruning"] = {"sparsity": s, "start": max(1, round(0.2 * rounds)), "end": round(0.7 * rounds)}
        t0 = time.perf_counter()
        r = build_run(parse_config(cfg))
        hist = r.federation.run(rounds)
        train_s = time.perf_counter() - t0
        task = r.dataset.task
        test = r.dataset.server_test
        assert test is not None
        metric = task.metrics[0]
        model = r.global_model().eval()
        x_test = test.x.reshape(-1, *task.input_shape)
        from fedloom.data.base import Split

        split = Split(x_test, test.y)
        q = {k: build_model_from_cut(r.model_fn(), cut_state(model, k), k) for k in ("int8", "fp16")}  # type: ignore[arg-type]
        row: dict[str, Any] = {
            "suite": name, "sparsity": s, "rounds": rounds, "train_seconds": round(train_s, 1),
            "achieved_sparsity": hist[-1].metrics.get("sparsity", 0.0), "metric_name": metric,
            "fp32": evaluate_model(model, split, task)[metric],
            "int8": evaluate_model(q["int8"], split, task)[metric],
            "fp16": evaluate_model(q["fp16"], split, task)[metric],
            "bytes_up_last_round": hist[-1].bytes_up,
        }  # fmt: skip
        with tempfile.TemporaryDirectory() as d:
            row["bytes"] = _sizes(model, d)
        row["x_int8_sparse"] = round(row["bytes"]["fp32_dense"] / row["bytes"]["int8_sparse"], 2)
        row["x_fp32_sparse"] = round(row["bytes"]["fp32_dense"] / row["bytes"]["fp32_sparse"], 2)
        x1, x64 = x_test[:1], x_test[:64]
        if s == 0.0:
            row["latency_ms"] = {
                "fp32": {"b1": _latency(model, x1, repeats), "b64": _latency(model, x64, repeats)},
                "int8": {"b1": _latency(q["int8"], x1, repeats), "b64": _latency(q["int8"], x64, repeats)},
                "fp16": {"b1": _latency(q["fp16"], x1, repeats), "b64": _latency(q["fp16"], x64, repeats)},
                "onnxruntime_fp32": _ort_latency(model, x1, x64, repeats),
            }
        rows.append(row)
        sparsest = (model, r, split)
        print(json.dumps({k: v for k, v in row.items() if k != "latency_ms"}), flush=True)
    # structured: the sparsest model, dead units removed, then half of the rest
    model, r, split = sparsest  # type: ignore[misc]
    task = r.dataset.task
    metric = task.metrics[0]
    for frac in (0.0, 0.5):
        _, small, rep = cut(model, frac)
        x1, x64 = split.x[:1], split.x[:64]
        with tempfile.TemporaryDirectory() as d:
            sizes = _sizes(small, d)
        rows.append({
            "suite": name, "structured_from_sparsity": sparsities[-1], "structured_fraction": frac,
            "kept_units": {k: list(v) for k, v in rep.kept.items()}, "params": rep.params_after, "metric_name": metric,
            "fp32": evaluate_model(small, split, task)[metric], "bytes": sizes,
            "latency_ms": {"fp32": {"b1": _latency(small, x1, repeats), "b64": _latency(small, x64, repeats)}},
        })  # fmt: skip
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "latency_ms"}), flush=True)
    return rows


def _markdown(result: dict[str, Any]) -> str:
    lines = [f"# Model cutting (`bench/cutting.py`), {result['machine']['cpu_count']} CPUs, torch {result['machine']['torch']}", ""]
    for suite in dict.fromkeys(r["suite"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["suite"] == suite]
        m = rows[0]["metric_name"]
        lines += [f"## {suite} ({m}, {rows[0]['rounds']} rounds)", "",
                  "| sparsity | fp32 | int8 | fp16 | dense fp32 bytes | sparse fp32 | sparse int8 | x (int8 sparse) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in rows:
            if "sparsity" not in r:
                continue
            b = r["bytes"]
            lines.append(f"| {r['sparsity']:.0%} | {r['fp32']:.4f} | {r['int8']:.4f} | {r['fp16']:.4f} | {b['fp32_dense']:,} | "
                         f"{b['fp32_sparse']:,} | {b['int8_sparse']:,} | {r['x_int8_sparse']:.1f} |")  # fmt: skip
        lat = rows[0].get("latency_ms", {})
        lines += ["", "| model (1 thread) | p50 batch 1 (ms) | p50 batch 64 (ms) |", "|---|---:|---:|"]
        for k in ("fp32", "int8", "fp16", "onnxruntime_fp32"):
            if lat.get(k):
                lines.append(f"| {k} dense | {lat[k]['b1']:.3f} | {lat[k]['b64']:.3f} |")
        for r in rows:
            if "structured_fraction" in r:
                what = "all-zero units removed" if r["structured_fraction"] == 0 else f"{r['structured_fraction']:.0%} of units removed (all-zero first)"
                lines.append(f"| structured: the {r['structured_from_sparsity']:.0%} model, {what},"
                             f" {r['params']:,} params, {m} {r['fp32']:.4f}) | {r['latency_ms']['fp32']['b1']:.3f} | {r['latency_ms']['fp32']['b64']:.3f} |")  # fmt: skip
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--rounds", default="", help="per-suite overrides: cnn=30,hospital=40")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sparsities", default="", help="only these (e.g. 0.95: retrains the sparsest model for the "
                    "structured rows); rows of the JSON not run again are kept")  # fmt: skip
    args = ap.parse_args()
    only = tuple(float(v) for v in args.sparsities.split(",") if v) or SPARSITIES
    overrides = dict(kv.split("=") for kv in args.rounds.split(",") if kv)
    result: dict[str, Any] = {
        "bench": "cutting",
        "fedloom": fedloom.__version__,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "latency_threads": 1, "train_threads": torch.get_num_threads()},  # fmt: skip
        "command": "python bench/cutting.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v not in ("", None)),
        "rows": [],
    }
    if args.json.exists():  # keep what is not run again
        result["rows"] = json.loads(args.json.read_text())["rows"]
    for suite in args.suites.split(","):
        rounds = int(overrides.get(suite, SUITES[suite]["rounds"]))
        rows = _run_suite(suite, rounds, args.repeats, args.seed, only)
        result["rows"] = [
            r for r in result["rows"]
            if r["suite"] != suite or ("sparsity" in r and r["sparsity"] not in only)
        ] + rows  # fmt: skip
        result["rows"].sort(key=lambda r: (list(SUITES).index(r["suite"]), "sparsity" not in r, r.get("sparsity", 0), r.get("structured_fraction", 0)))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        args.json.with_suffix(".md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
