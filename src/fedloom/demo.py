"""``make demo``: the hospital length-of-stay scenario, three ways.

Three hospitals (10000 / 8000 / 12000 patients) learn to predict length of stay. For each
hospital the demo reports test MAE (days) of: a model trained on that hospital alone, the
federated model (FedAvg over the three, no data shared), and a centralized model trained on
the pooled data (the upper bound federated learning tries to reach). Each model sees the
same number of passes over its training data.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedloom.artifacts import write_run_outputs
from fedloom.client.evaluate import evaluate_model
from fedloom.client.training import train_local
from fedloom.core.config import parse_config
from fedloom.core.params import ParamSpec
from fedloom.core.seeding import derive_seed
from fedloom.core.types import ClientInstruction
from fedloom.data.base import Split
from fedloom.run import build_run, initial_model

__all__ = ["main"]

CONFIG = {
    "run": {"name": "hospital-demo", "seed": 0, "rounds": 40, "federated_eval_every": 5},
    "data": {"name": "hospital"},
    "model": {"name": "mlp", "hidden": [64, 32]},
    "strategy": {"name": "fedavg", "fraction": 1.0},
    "client": {"epochs": 1, "batch_size": 64, "lr": 0.001, "optimizer": "adam", "loss": "huber"},
}
# SCAFFOLD corrects the client drift that the hospitals' different case mixes cause; its
# control variates assume plain SGD on the clients.
SCAFFOLD = {"strategy": {"name": "scaffold", "fraction": 1.0}, "client": {**CONFIG["client"], "optimizer": "sgd", "lr": 0.01}}


def _train_alone(run, split: Split, epochs: int, seed: int) -> torch.nn.Module:  # type: ignore[no-untyped-def]
    """Train a fresh copy of the initial model on ``split`` only, with the clients' settings."""
    model = initial_model(run.model_fn, run.config.run.seed)
    spec = ParamSpec.from_module(model)
    ins = ClientInstruction(round=1, client_id="alone", train=replace(run.strategy.train, epochs=epochs), seed=seed)
    train_local(model, spec, spec.module_vector(model), split, ins)  # the module now holds the trained state
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=CONFIG["run"]["rounds"])
    ap.add_argument("--out", type=Path, default=Path("runs/hospital-demo"))
    args = ap.parse_args(argv)
    console = Console(width=max(Console().width, 120))
    t0 = time.perf_counter()
    store = args.out / "fedloom.db"  # both federated runs, checkpointed: `fedloom serve` serves them
    cfg_dict = {**CONFIG, "run": {**CONFIG["run"], "rounds": args.rounds, "store": str(store)}}
    run = build_run(parse_config(cfg_dict), fresh=True)
    ds, task = run.dataset, run.dataset.task
    console.print(f"[bold]hospital length of stay[/]: {', '.join(f'{c} ({d.num_examples + len(d.test or [])} patients)' for c, d in ds.clients.items())}")

    console.print(f"federated: FedAvg and SCAFFOLD, {args.rounds} rounds x {run.strategy.train.epochs} local epoch(s)")
    history = run.federation.run(args.rounds)
    fed_model = run.global_model()
    scaffold_cfg = {**cfg_dict, **SCAFFOLD, "run": {**cfg_dict["run"], "name": "hospital-demo-scaffold"}}
    scaffold_run = build_run(parse_config(scaffold_cfg), fresh=True)
    scaffold_run.federation.run(args.rounds)
    scaffold_model = scaffold_run.global_model()
    epochs = args.rounds * run.strategy.train.epochs

    console.print(f"alone: each hospital trains {epochs} epochs on its own data; centralized: {epochs} epochs on pooled data")
    alone = {cid: _train_alone(run, d.train, epochs, derive_seed(0, "alone", cid)) for cid, d in ds.clients.items()}
    central = _train_alone(run, ds.pooled_train(), epochs, derive_seed(0, "central"))

    metric = task.metrics[0]
    table = Table(title=f"test {metric.upper()} (days) per hospital — lower is better")
    table.add_column("hospital")
    table.add_column("test patients", justify="right")
    table.add_column("trained alone", justify="right")
    table.add_column("alone, avg on all sites", justify="right")
    table.add_column("FedAvg", justify="right")
    table.add_column("SCAFFOLD", justify="right")
    table.add_column("centralized (pooled)", justify="right")
    for cid, d in ds.clients.items():
        assert d.test is not None
        own = evaluate_model(alone[cid], d.test, task)[metric]
        cross = sum(evaluate_model(alone[cid], o.test, task)[metric] for o in ds.clients.values() if o.test) / len(ds.clients)
        fed = evaluate_model(fed_model, d.test, task)[metric]
        sca = evaluate_model(scaffold_model, d.test, task)[metric]
        cen = evaluate_model(central, d.test, task)[metric]
        table.add_row(cid, str(len(d.test)), f"{own:.3f}", f"{cross:.3f}", f"{fed:.3f}", f"{sca:.3f}", f"{cen:.3f}")
    assert ds.server_test is not None
    table.add_row(
        "all (pooled test)",
        str(len(ds.server_test)),
        "",
        "",
        f"{evaluate_model(fed_model, ds.server_test, task)[metric]:.3f}",
        f"{evaluate_model(scaffold_model, ds.server_test, task)[metric]:.3f}",
        f"{evaluate_model(central, ds.server_test, task)[metric]:.3f}",
    )
    console.print(table)
    write_run_outputs(args.out, history=history, model=fed_model, config=cfg_dict, title="hospital demo (federated)")
    console.print(f"federated run written to {args.out}/ (history.json, model.safetensors, metrics.png); {time.perf_counter() - t0:.1f} s")
    exe = Path(sys.executable).with_name("fedloom")
    shown = os.path.relpath(exe) if exe.exists() and not os.path.relpath(exe).startswith("..") else "fedloom"
    cmd = f"{shown} serve {store}"
    console.print("\n[bold]serve the federated models and watch both runs on the dashboard:[/]")
    console.print(f"  {cmd}", highlight=False, soft_wrap=True)
    console.print("  then open http://127.0.0.1:8000/ (API docs: /docs)", highlight=False)


if __name__ == "__main__":
    main()
