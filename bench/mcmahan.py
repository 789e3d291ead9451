"""Reproduce McMahan et al. 2017 (MNIST, 100 clients, C=0.1): rounds to reach a target accuracy.

Rows (paper, Table 2, FedAvg): 2NN with E=1, B=10 to 97% test accuracy (87 rounds IID,
664 non-IID); CNN with E=5, B=10 to 99% (20 rounds IID, 229 non-IID). Non-IID is the
pathological split (200 shards of 300 sorted by label, 2 per client).

Usage:
    python bench/mcmahan.py --json bench/results/mcmahan.json [--rows 2nn-iid,cnn-iid]
        [--max-rounds 300] [--time-budget 3600] [--engine sequential] [--init he|torch] [--pixels raw]
        [--device cuda] [--precision fp32|tf32|bf16] [--cuda-graphs]
    python bench/mcmahan.py --json bench/results/mcmahan_grid.json --rows 2nn-iid,2nn-noniid
        --lr-grid paper --engine vectorized [--max-rounds 1000]

Writes the JSON after every round, so an interrupted run keeps what it reached. Rows
already in the JSON are kept; a row that is run again is replaced.

Learning rate. Without ``--lr-grid`` the learning rates are fixed (not tuned): 0.1 for the
2NN, 0.05 for the CNN, plain SGD (``--lr`` overrides). With ``--lr-grid`` each row follows
the paper's protocol: the paper optimizes the client learning rate η of every setting over a
multiplicative grid of resolution 10^(1/3) (or 10^(1/6)) and reports, per row, the rounds at
which the test-accuracy curve of the best η (made monotone: best accuracy over all prior
rounds) crosses the target. The grid's end points are not in the text available to us, so
``--lr-grid paper`` is 10^(k/3) for k = -5..-1, i.e. 0.0215, 0.0464, 0.1, 0.215, 0.464
(``paper6``: the 10^(1/6) grid over the same range); a comma-separated list gives any other
grid. A best η at an end of the grid means the grid should be widened. Every η
runs until the target or ``--max-rounds`` (or the time budget, or a non-finite test loss:
``diverged``; with ``--stall-rounds K``, an η whose test accuracy is still below 20%, twice
chance, after K rounds: ``stalled``). ``--prune`` stops an η once it has run as many rounds
as the best η so far needed (it can no longer need fewer: ``pruned``), so list the likely
best η first (e.g. ``--lr-grid 0.1,0.0464,0.215,0.0215,0.464``); the reported best η and its
rounds are the same as without pruning, the other η's curves are cut short. ``--resume``
keeps the finished η of a row already in the JSON (a fixed-η row of the same key counts as
that η's grid entry) and runs only the missing ones. The row reports the η that reached the target first (ties: the smaller
wall time) with its rounds, accuracy curve and wall time, keeps every η's result under
``grid``, and compares with the paper (``rounds_vs_paper``: our rounds / paper's;
``within_25pct``: within 25% of the paper's rounds either way; ``at_most_paper_plus_25pct``:
at most 1.25x the paper's rounds).

Initialization: each model's default (``fedloom.models.mnist``: He for the 2NN, PyTorch's
default for the CNN) unless ``--init`` says otherwise; recorded per row. Inputs: ``--pixels
standardized`` (fedloom's MNIST default, ``(x - 0.1307) / 0.3081``) or ``raw`` ([0, 1)
intensities, as the paper used). A row run with non-default settings is stored under a key
that names them: ``2nn-iid+raw``, ``cnn-iid+he``, ``2nn-noniid+raw+torch``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedloom.core.config import parse_config
from fedloom.models.mnist import McMahan2NN, McMahanCNN
from fedloom.run import Run, build_run

ROWS = {
    "2nn-iid": {"model": "2nn", "partition": "iid", "epochs": 1, "target": 0.97, "paper_rounds": 87, "lr": 0.1},
    "2nn-noniid": {"model": "2nn", "partition": "shards", "epochs": 1, "target": 0.97, "paper_rounds": 664, "lr": 0.1},
    "cnn-iid": {"model": "cnn", "partition": "iid", "epochs": 5, "target": 0.99, "paper_rounds": 20, "lr": 0.05},
    "cnn-noniid": {"model": "cnn", "partition": "shards", "epochs": 5, "target": 0.99, "paper_rounds": 229, "lr": 0.05},
}

DEFAULT_INIT = {
    "2nn": inspect.signature(McMahan2NN).parameters["init"].default,
    "cnn": inspect.signature(McMahanCNN).parameters["init"].default,
}

GRIDS = {
    "paper": [round(10 ** (k / 3), 4) for k in range(-5, 0)],  # 0.0215 .. 0.464, resolution 10^(1/3)
    "paper6": [round(10 ** (k / 6), 4) for k in range(-10, -1)],  # 0.0215 .. 0.464, resolution 10^(1/6)
}


def parse_grid(text: str) -> list[float]:
    """``paper`` / ``paper6`` or a comma-separated list of positive learning rates."""
    if text in GRIDS:
        return GRIDS[text]
    grid = [float(v) for v in text.split(",") if v.strip()]
    if not grid or any(not (lr > 0 and math.isfinite(lr)) for lr in grid):
        raise SystemExit(f"--lr-grid: {text!r} is not 'paper', 'paper6' or a list of positive numbers")
    return grid


RUN_OPTIONS: dict = {}
"""Extra ``[run]`` keys of every row (``--device``, ``--precision``, ``--cuda-graphs``), set by :func:`main`."""
CLIENT_OPTIONS: dict = {}
"""Extra ``[client]`` keys of every row (``--max-steps``: smoke tests only), set by :func:`main`."""


def build(name: str, spec: dict, *, lr: float, max_rounds: int, engine: str, seed: int) -> tuple[Run, float]:
    cfg = parse_config(
        {
            "run": {"name": f"mcmahan-{name}", "seed": seed, "rounds": max_rounds, "engine": engine, **RUN_OPTIONS},
            "data": {"name": "mnist", "partition": spec["partition"], "num_clients": 100,
                     "normalize": spec["pixels"] == "standardized"},
            "model": {"name": spec["model"], "init": spec["init"]},
            "strategy": {"name": "fedavg", "fraction": 0.1},
            "client": {"epochs": spec["epochs"], "batch_size": 10, "lr": lr, "optimizer": "sgd", **CLIENT_OPTIONS},
        }
    )
    t0 = time.perf_counter()
    run = build_run(cfg)
    return run, time.perf_counter() - t0


def run_lr(name: str, spec: dict, entry: dict, *, lr: float, max_rounds: int, budget_s: float, engine: str, seed: int,
           save: Callable[[], None], cap: tuple[int, str] | None = None) -> None:
    """Run one (row, lr) until the target, ``max_rounds``, the budget or divergence; fill ``entry`` as it goes."""
    run, setup_s = build(name, spec, lr=lr, max_rounds=max_rounds, engine=engine, seed=seed)
    entry.update(
        {"lr": lr, "engine": run.engine.name, "setup_s": round(setup_s, 2), "rounds_run": 0, "reached_round": None,
         "accuracy": [], "wall_s": 0.0, "stopped": "running", "device": run.config.run.device,
         "precision": run.config.run.precision, "cuda_graphs": run.config.run.cuda_graphs,
         "mode": getattr(run.engine, "mode", run.engine.name)}
    )
    t1 = time.perf_counter()
    try:
        _rounds(run, entry, spec, max_rounds=max_rounds, budget_s=budget_s, name=f"{name} lr={lr:g}", t1=t1, save=save,
                cap=cap)
    except KeyboardInterrupt:
        entry["stopped"] = f"interrupted after round {entry['rounds_run']}"
        raise
    finally:
        entry["best_accuracy"] = max(entry["accuracy"]) if entry["accuracy"] else None
        save()


def run_row(name: str, spec: dict, *, max_rounds: int, budget_s: float, engine: str, seed: int, out: dict,
            path: Path) -> None:
    """One row at its fixed learning rate ``spec["lr"]``."""
    row = {**spec, "B": 10, "C": 0.1, "max_rounds": max_rounds}
    out["rows"][name] = row
    run_lr(name, spec, row, lr=spec["lr"], max_rounds=max_rounds, budget_s=budget_s, engine=engine, seed=seed,
           save=lambda: path.write_text(json.dumps(out, indent=1)))


FINISHED = ("target reached", "max rounds", "diverged", "stalled", "pruned")
"""Prefixes of an η's ``stopped`` that mean it ran to the end of its protocol (``--resume`` keeps those)."""


def _finished(entry: dict) -> bool:
    return bool(entry.get("accuracy")) and str(entry.get("stopped", "")).startswith(FINISHED)


def _previous_entries(old: dict | None, grid: list[float]) -> dict[float, dict]:
    """The finished η of a row from an earlier run (``--resume``): grid entries, or a fixed-η row's own run."""
    if not old:
        return {}
    entries = old.get("grid") if "grid" in old else [{k: v for k, v in old.items() if k not in ROW_ONLY_KEYS}]
    return {e["lr"]: e for e in entries if e.get("lr") in grid and _finished(e)}


ROW_ONLY_KEYS = ("model", "partition", "epochs", "target", "paper_rounds", "init", "pixels", "B", "C", "max_rounds")


def run_grid(name: str, spec: dict, grid: list[float], *, max_rounds: int, budget_s: float, engine: str, seed: int,
             out: dict, path: Path, prune: bool = False, resume: bool = False) -> None:
    """One row over the learning-rate grid; the row's top-level keys are the best learning rate's."""
    previous = _previous_entries(out["rows"].get(name), grid) if resume else {}
    row = {**spec, "B": 10, "C": 0.1, "max_rounds": max_rounds, "lr_grid": grid, "pruned": prune, "grid": [],
           "stopped": "running"}
    out["rows"][name] = row

    def save() -> None:
        _summarize(row)
        path.write_text(json.dumps(out, indent=1))

    for lr in grid:
        if lr in previous:
            row["grid"].append(previous[lr])
            print(f"{name} lr={lr:g}: kept from the JSON ({previous[lr]['stopped']})", flush=True)
            continue
        cap = _prune_cap(row["grid"]) if prune else None
        entry: dict = {}
        row["grid"].append(entry)
        try:
            run_lr(name, spec, entry, lr=lr, max_rounds=max_rounds, budget_s=budget_s, engine=engine, seed=seed,
                   save=save, cap=cap)
        except KeyboardInterrupt:
            row["stopped"] = f"interrupted at lr={lr:g}"
            save()
            raise
    row["stopped"] = "grid done"
    save()


def _prune_cap(done: list[dict]) -> tuple[int, str] | None:
    """(rounds, reason) after which a further η cannot beat the best η so far, or None while none has reached the target."""
    reached = [e for e in done if e.get("reached_round") is not None]
    if not reached:
        return None
    best = min(reached, key=lambda e: e["reached_round"])
    return best["reached_round"], f"lr={best['lr']:g} reached the target at round {best['reached_round']}"


def _summarize(row: dict) -> None:
    """Copy the best grid entry's results to the row (the keys a fixed-lr row has) and compare with the paper."""
    done = [e for e in row["grid"] if e.get("accuracy")]
    if not done:
        return
    reached = [e for e in done if e["reached_round"] is not None]
    best = (min(reached, key=lambda e: (e["reached_round"], e["wall_s"])) if reached
            else max(done, key=lambda e: max(e["accuracy"])))
    for key in ("lr", "engine", "setup_s", "rounds_run", "reached_round", "accuracy", "wall_s", "sec_per_round",
                "best_accuracy"):
        if key in best:
            row[key] = best[key]
    row["best_lr_stopped"] = best["stopped"]
    row["grid_wall_s"] = round(sum(e["wall_s"] for e in done), 1)
    ratio = best["reached_round"] / row["paper_rounds"] if best["reached_round"] is not None else None
    row["rounds_vs_paper"] = round(ratio, 3) if ratio is not None else None
    row["within_25pct"] = ratio is not None and abs(ratio - 1.0) <= 0.25  # neither 25% slower nor 25% faster
    row["at_most_paper_plus_25pct"] = ratio is not None and ratio <= 1.25


STALL_ACCURACY = 0.2
"""Twice chance on MNIST's 10 classes: an η still below it after ``--stall-rounds`` rounds is ``stalled``."""
STALL_ROUNDS: list[int] = []
"""``--stall-rounds`` (empty: no stall rule), set by :func:`main`."""


def _rounds(run: Run, row: dict, spec: dict, *, max_rounds: int, budget_s: float, name: str, t1: float,
            save: Callable[[], None], cap: tuple[int, str] | None = None) -> None:
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
        save()
        if row["reached_round"] is not None:
            break
        if not math.isfinite(rec.metrics.get("test_loss", 0.0)):
            row["stopped"] = f"diverged (non-finite test loss at round {rec.round})"
            break
        if time.perf_counter() - t1 > budget_s:
            row["stopped"] = f"time budget {budget_s:.0f} s"
            break
        if STALL_ROUNDS and rec.round >= STALL_ROUNDS[0] and max(row["accuracy"]) < STALL_ACCURACY:
            row["stopped"] = f"stalled (test accuracy below {STALL_ACCURACY:.0%} after {rec.round} rounds)"
            break
        if cap is not None and rec.round >= cap[0]:
            row["stopped"] = f"pruned at round {rec.round}: {cap[1]}"
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
    ap.add_argument("--time-budget", type=float, default=3600.0,
                    help="seconds per row (per learning rate with --lr-grid)")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", choices=("he", "torch"), default=None,
                    help="the models' weight initialization (default: each model's own)")
    ap.add_argument("--pixels", choices=("standardized", "raw"), default="standardized",
                    help="MNIST inputs: standardized (fedloom's default) or raw [0, 1) intensities (the paper's)")
    ap.add_argument("--device", default="cpu", help="run.device: cpu, cuda, cuda:1")
    ap.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32",
                    help="run.precision of the vectorized engine (rows not in fp32 are stored under '+<precision>')")
    ap.add_argument("--cuda-graphs", action="store_true", help="run.cuda_graphs: replay full lockstep steps on CUDA")
    ap.add_argument("--max-steps", type=int, default=None,
                    help="cap on local steps per client (client.max_steps; smoke tests: not the paper's setting)")
    lr = ap.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=float, default=None, help="override every row's client learning rate")
    lr.add_argument("--lr-grid", default=None,
                    help="tune the learning rate per row as the paper did: 'paper' (10^(1/3) grid 0.0215..0.464), "
                         "'paper6' (10^(1/6)) or a comma-separated list")
    ap.add_argument("--prune", action="store_true",
                    help="with --lr-grid: stop an lr once it has run as many rounds as the best lr so far needed")
    ap.add_argument("--resume", action="store_true",
                    help="with --lr-grid: keep a row's finished lrs from the JSON, run only the missing ones")
    ap.add_argument("--stall-rounds", type=int, default=None,
                    help="stop an lr whose test accuracy is still below 20%% after this many rounds")
    args = ap.parse_args()
    if (args.prune or args.resume) and args.lr_grid is None:
        raise SystemExit("--prune and --resume apply to --lr-grid runs")
    if args.stall_rounds is not None:
        if args.stall_rounds < 1:
            raise SystemExit(f"--stall-rounds: must be >= 1, got {args.stall_rounds}")
        STALL_ROUNDS.append(args.stall_rounds)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown row(s) {', '.join(unknown)}; known: {', '.join(ROWS)}")
    grid = parse_grid(args.lr_grid) if args.lr_grid is not None else None
    RUN_OPTIONS.update(device=args.device, precision=args.precision, cuda_graphs=args.cuda_graphs)
    if args.max_steps is not None:
        CLIENT_OPTIONS["max_steps"] = args.max_steps
    args.json.parent.mkdir(parents=True, exist_ok=True)
    out = json.loads(args.json.read_text()) if args.json.exists() else {}
    out.update(
        {
            "benchmark": "mcmahan2017",
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                        "threads": torch.get_num_threads()},
        }
    )
    if grid is not None:
        out["protocol"] = (
            "per row, the client learning rate is tuned over lr_grid (the paper's multiplicative grid); each lr runs "
            "until the target or max_rounds; the row's lr/reached_round/accuracy/wall_s are the best lr's "
            "(fewest rounds to the target), grid holds every lr; one run per lr (seed below). The paper's grid is "
            "multiplicative with resolution 10^(1/3) or 10^(1/6); its end points are not in the text available to us"
        )
        out["seed"] = args.seed
        out["max_rounds"] = args.max_rounds
    out.setdefault("rows", {})
    for base in args.rows.split(","):
        spec = ROWS[base]
        init = args.init or DEFAULT_INIT[spec["model"]]
        default_init = DEFAULT_INIT[spec["model"]]
        name = base + ("+raw" if args.pixels == "raw" else "") + (f"+{init}" if init != default_init else "")
        name += f"+{args.precision}" if args.precision != "fp32" else ""
        row = {**spec, "init": init, "pixels": args.pixels, **({"lr": args.lr} if args.lr is not None else {})}
        if grid is None:
            run_row(name, row, max_rounds=args.max_rounds, budget_s=args.time_budget, engine=args.engine,
                    seed=args.seed, out=out, path=args.json)
        else:
            run_grid(name, row, grid, max_rounds=args.max_rounds, budget_s=args.time_budget, engine=args.engine,
                     seed=args.seed, out=out, path=args.json, prune=args.prune, resume=args.resume)


if __name__ == "__main__":
    main()
