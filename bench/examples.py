"""Every ``examples/*.toml`` at its real size: the first rounds on three seeds (issue 13).

For each example (glob of ``examples/*.toml``) and seed, the run is built from the file as a
user would run it (only ``run.seed`` set; ``run.store`` redirected to a scratch directory), and
its first ``--rounds`` rounds (default 3) are run. After every round this script evaluates
the headline metric (the task's first) on the full server test set, whatever the example's
``eval_every``, and records it with the round's training loss and wall time, next to the
initial model's metric and a chance baseline (the best prediction that ignores the input:
majority class for accuracy, the positive rate for AUPRC, "always positive" for F1, the
training median for MAE). ``learns_round1`` / ``learns_round2``: on every seed the metric
after that round is better than both the initial model and chance (no margin; the margins of
``tests/test_examples_learn.py`` apply to its reduced runs).

Usage:
    python bench/examples.py --json bench/results/examples_cpu.json [--rounds 3] [--seeds 0,1,2]
        [--examples mnist_cnn_iid,hospital] [--budget-s 900] [--note TEXT]
    python bench/examples.py --json bench/results/examples_cpu.json --render [--note TEXT]

``--budget-s`` caps the time of one (example, seed): a run that exceeds it stops after the
round in progress and the JSON says so (``capped``). Writes the JSON after every seed and a
Markdown table next to it (same name, ``.md``). Results of examples not run again are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import tempfile
import time
from pathlib import Path

import torch

from fedloom.client.evaluate import evaluate_vector
from fedloom.core.config import RunConfig, load_config
from fedloom.core.metrics import greater_is_better
from fedloom.data.base import FederatedDataset, Split
from fedloom.run import build_run

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def chance(metric: str, data: FederatedDataset, test: Split) -> float | None:
    """The metric of the best prediction that ignores the input (None for a metric without one here)."""
    y = test.y
    if metric == "accuracy":
        return float(torch.bincount(y.long()).max()) / len(y)
    if metric in ("auprc", "f1"):
        p = float((y > 0.5).float().mean())
        return p if metric == "auprc" else 2 * p / (1 + p)
    train_y = torch.cat([c.train.y.float().reshape(-1) for c in data.clients.values()])
    if metric == "mae":
        return float((y.float().reshape(-1) - train_y.median()).abs().mean())
    if metric == "rmse":
        return float((y.float().reshape(-1) - train_y.mean()).pow(2).mean().sqrt())
    return None


def settings(cfg: RunConfig) -> dict:
    """The settings of an example that say how big and how hard its rounds are."""
    data = cfg.data.options()
    return {
        "data": cfg.data.name,
        "partition": data.get("partition"),
        "num_clients": data.get("num_clients"),
        "model": cfg.model.name,
        **{f"model_{k}": v for k, v in cfg.model.options().items()},
        "strategy": cfg.strategy.name,
        "fraction": cfg.strategy.fraction,
        "E": cfg.client.epochs,
        "B": cfg.client.batch_size,
        "lr": cfg.client.lr,
        "optimizer": cfg.client.optimizer,
        "rounds_configured": cfg.run.rounds,
        "privacy": cfg.privacy.mode if cfg.privacy is not None else None,
        "secure": cfg.secure.protocol if cfg.secure is not None else None,
        "attack": cfg.attack.name if cfg.attack is not None else None,
        "pipeline": [st.name for st in cfg.pipeline],
    }


def run_seed(path: Path, seed: int, *, rounds: int, budget_s: float, scratch: Path) -> tuple[dict, dict]:
    cfg = load_config(path, [f"run.seed={seed}"])
    if cfg.run.store is not None:
        store = str(scratch / f"{path.stem}-{seed}.db")
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"store": store})})
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tensorboard": None, "mlflow_uri": None})})
    t0 = time.perf_counter()
    run = build_run(cfg, engine="auto" if cfg.run.engine in ("remote", "ray") else None)
    setup_s = time.perf_counter() - t0
    task, test = run.dataset.task, run.dataset.server_test
    metric = task.metrics[0]
    model = run.model_fn()

    def evaluate() -> float:
        return evaluate_vector(model, run.spec, run.federation.state.params.cpu(), test, task, metrics=[metric])[metric]

    out = {
        "engine": run.engine.name,
        "setup_s": round(setup_s, 2),
        "initial": round(evaluate(), 5),
        "chance": None,
        "metric": [],
        "train_loss": [],
        "round_s": [],
        "status": [],
        "capped": None,
    }
    c = chance(metric, run.dataset, test)
    out["chance"] = round(c, 5) if c is not None else None
    t1 = time.perf_counter()
    for _ in range(rounds):
        rec = run.federation.step()
        out["round_s"].append(round(rec.seconds, 2))
        out["metric"].append(round(evaluate(), 5))
        loss = rec.metrics.get("train_loss")
        out["train_loss"].append(round(loss, 4) if loss is not None and math.isfinite(loss) else None)
        out["status"].append(rec.status)
        print(f"{path.stem} seed {seed} round {rec.round}: {metric} {out['metric'][-1]:.4f} "
              f"train_loss {out['train_loss'][-1]} ({rec.seconds:.1f} s)", flush=True)
        if time.perf_counter() - t1 > budget_s and rec.round < rounds:
            out["capped"] = f"stopped after round {rec.round} of {rounds}: over the {budget_s:.0f} s budget"
            break
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out, {"headline": metric, "greater_is_better": greater_is_better(metric), "settings": settings(cfg)}


def learns(entry: dict, k: int) -> bool | None:
    """Every seed's metric after round k beats both its initial model and chance (None: not measured)."""
    better = (lambda a, b: a > b) if entry["greater_is_better"] else (lambda a, b: a < b)
    verdicts = []
    for s in entry["seeds"].values():
        if len(s["metric"]) < k:
            return None
        baselines = [s["initial"]] + ([s["chance"]] if s["chance"] is not None else [])
        verdicts.append(all(better(s["metric"][k - 1], b) for b in baselines))
    return all(verdicts) if verdicts else None


def markdown(out: dict) -> str:
    rounds = out["setting"]["rounds"]
    lines = [
        f"Every example at its real size, first {rounds} rounds, seeds {', '.join(map(str, out['setting']['seeds']))} "
        f"(`bench/examples.py`; {out['machine']['cpu_count']}-core CPU, {out['setting']['threads']} torch thread(s)). "
        "Headline metric on the full server test set after rounds 1..N per seed; chance: the best input-free "
        "prediction; learns r1/r2: every seed beats its initial model and chance after that round."
        + (f" {out['note']}" if out.get("note") else ""),
        "",
        "| example | metric | chance | initial (per seed) | "
        + " | ".join(f"seed {s}: " + " / ".join(f"r{k}" for k in range(1, rounds + 1)) for s in out["setting"]["seeds"])
        + " | train loss r1 (per seed) | s / round | learns r1 | learns r2 |",
        "|---|---|---:|---|" + "---|" * len(out["setting"]["seeds"]) + "---|---:|---|---|",
    ]
    for name, e in sorted(out["examples"].items()):
        seeds = e["seeds"]
        fmt = (lambda v: f"{v:.4f}") if e["headline"] != "mae" else (lambda v: f"{v:.3f}")
        ch = next((s["chance"] for s in seeds.values() if s["chance"] is not None), None)
        cells = []
        for s in out["setting"]["seeds"]:
            r = seeds.get(str(s))
            cells.append(" / ".join(fmt(v) for v in r["metric"]) + (" (capped)" if r["capped"] else "") if r else "")
        init = " / ".join(fmt(seeds[str(s)]["initial"]) for s in out["setting"]["seeds"] if str(s) in seeds)
        first_losses = [seeds[str(s)]["train_loss"][:1] for s in out["setting"]["seeds"] if str(s) in seeds]
        loss1 = " / ".join(f"{v[0]:.3f}" if v and v[0] is not None else "–" for v in first_losses)
        per_round = [t for s in seeds.values() for t in s["round_s"]]
        spr = f"{sum(per_round) / len(per_round):.1f}" if per_round else ""
        yn = {True: "yes", False: "**no**", None: ""}
        lines.append(
            f"| {name} | {e['headline']} | {fmt(ch) if ch is not None else ''} | {init} | " + " | ".join(cells)
            + f" | {loss1} | {spr} | {yn[e['learns_round1']]} | {yn[e['learns_round2']]} |"
        )
    return "\n".join(lines) + "\n"


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--examples", default="", help="comma-separated example names (default: every examples/*.toml)")
    ap.add_argument("--budget-s", type=float, default=900.0,
                    help="seconds per (example, seed) before rounds are capped")
    ap.add_argument("--note", default=None, help="a sentence stored in the JSON and printed under the table's title")
    ap.add_argument("--render", action="store_true", help="only rewrite the Markdown table from the JSON")
    args = ap.parse_args()
    md = args.json.with_suffix(".md")
    if args.render:
        out = json.loads(args.json.read_text())
        if args.note is not None:
            out["note"] = args.note
            args.json.write_text(json.dumps(out, indent=1))
        md.write_text(markdown(out))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    paths = sorted(EXAMPLES.glob("*.toml"))
    if args.examples:
        wanted = args.examples.split(",")
        unknown = [w for w in wanted if not (EXAMPLES / f"{w}.toml").exists()]
        if unknown:
            raise SystemExit(f"--examples: no examples/{unknown[0]}.toml")
        paths = [EXAMPLES / f"{w}.toml" for w in wanted]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    out = json.loads(args.json.read_text()) if args.json.exists() else {}
    out.update(
        {
            "benchmark": "examples",
            "setting": {
                "rounds": args.rounds,
                "seeds": seeds,
                "budget_s_per_seed": args.budget_s,
                "threads": torch.get_num_threads(),
                "evaluation": "headline metric (task.metrics[0]) on the full server test set after every round, "
                "evaluated by this script; examples run as configured, only run.seed set",
            },
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        }
    )
    if args.note is not None:
        out["note"] = args.note
    out.setdefault("examples", {})
    with tempfile.TemporaryDirectory() as scratch:
        for path in paths:
            entry: dict = {"seeds": {}}
            out["examples"][path.stem] = entry
            for seed in seeds:
                result, meta = run_seed(path, seed, rounds=args.rounds, budget_s=args.budget_s, scratch=Path(scratch))
                entry.update(meta)
                entry["seeds"][str(seed)] = result
                entry["learns_round1"] = learns(entry, 1)
                entry["learns_round2"] = learns(entry, 2)
                args.json.write_text(json.dumps(out, indent=1))
                md.write_text(markdown(out))


if __name__ == "__main__":
    main()
