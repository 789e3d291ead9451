"""The ``fedloom`` command line (typer): run a config, list scenarios, strategies and models."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedloom.core.errors import FedloomError

app = typer.Typer(add_completion=False, help="fedloom: federated learning, simulated fast or deployed securely.")
console = Console()


def _fmt(v: float) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="TOML run configuration")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")] = None,
    engine: Annotated[str | None, typer.Option("--engine", help="sequential | vectorized | ray (default: auto)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="output directory (default runs/<name>)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no per-round table")] = False,
) -> None:
    """Run a federated training job described by CONFIG."""
    from fedloom.artifacts import write_run_outputs
    from fedloom.core.config import load_config
    from fedloom.federation.builder import build_run

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config, set_ or [])
        r = build_run(cfg, engine=engine)
    except FedloomError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    out_dir = out or Path("runs") / cfg.run.name
    console.print(
        f"[bold]{cfg.run.name}[/]: {cfg.data.name}, {len(r.dataset.clients)} clients, model {cfg.model.name} "
        f"({r.spec.numel:,} values), strategy {r.strategy.name}, engine {r.engine.name}, {cfg.run.rounds} rounds"
    )
    headline = [f"test_{m}" for m in r.dataset.task.metrics]
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        bar = progress.add_task("rounds", total=cfg.run.rounds, completed=r.federation.state.round)

        def on_round(rec, _state) -> None:  # type: ignore[no-untyped-def]
            progress.advance(bar)
            if not quiet:
                shown = " ".join(f"{k}={_fmt(v)}" for k, v in rec.metrics.items() if k in headline or k == "train_loss")
                progress.console.print(
                    f"round {rec.round:4d} | {len(rec.clients):4d} clients | {rec.seconds:6.2f} s | {shown}"
                    + (f" | rejected {len(rec.rejected)}" if rec.rejected else "")
                )

        try:
            history = r.federation.run(cfg.run.rounds, callback=on_round)
        except FedloomError as exc:
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(1) from None
    table = Table(title=f"{cfg.run.name}: per-round metrics")
    names = history.metric_names()
    table.add_column("round", justify="right")
    table.add_column("clients", justify="right")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("MB down/up", justify="right")
    step = max(1, len(history) // 25)
    for i, rec in enumerate(history):
        if i % step and i != len(history) - 1:
            continue
        table.add_row(
            str(rec.round),
            str(len(rec.clients)),
            *[_fmt(rec.metrics[n]) if n in rec.metrics else "" for n in names],
            f"{rec.bytes_down / 1e6:.1f}/{rec.bytes_up / 1e6:.1f}",
        )
    console.print(table)
    write_run_outputs(out_dir, history=history, model=r.global_model(), config=cfg.model_dump(), title=cfg.run.name)
    console.print(f"wrote {out_dir}/history.json, model.safetensors, metrics.png")


@app.command()
def scenarios() -> None:
    """List the built-in datasets and application scenarios."""
    from fedloom.data.scenarios import SCENARIOS

    table = Table(title="built-in scenarios")
    table.add_column("name")
    table.add_column("description")
    for name, info in SCENARIOS.items():
        table.add_row(name, info.description)
    table.add_row("mnist", "MNIST 60k/10k (McMahan et al. 2017 partitions: iid, shards, dirichlet, power_law)")
    console.print(table)


@app.command()
def strategies() -> None:
    """List the aggregation strategies."""
    from fedloom.strategies.registry import list_strategies

    for name in list_strategies():
        console.print(name)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
