"""The ``fedloom`` command line (typer): run a config, list a store's runs, scenarios and strategies."""

from __future__ import annotations

import logging
import math
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedloom.core.errors import FedloomError

if TYPE_CHECKING:
    from fedloom.run import Run

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
    engine: Annotated[str | None, typer.Option("--engine", help="sequential | vectorized | ray | remote (default: auto)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="output directory (default runs/<name>)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no per-round table")] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--fresh",
            help="with run.store set: resume this run from its latest checkpoint if the store has it with the "
            "same config (default), or delete it and start over",
        ),
    ] = True,
) -> None:
    """Run a federated training job described by CONFIG."""
    from fedloom.core.config import load_config
    from fedloom.run import build_run

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config, set_ or [])
        r = build_run(cfg, engine=engine, fresh=not resume)
    except FedloomError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    try:
        _run_and_report(r, out or Path("runs") / cfg.run.name, quiet=quiet)
    finally:
        r.engine.close()
        if r.federation.store is not None:
            r.federation.store.close()


@app.command()
def server(
    config: Annotated[Path, typer.Argument(help="TOML run configuration (its [deploy] table: address, credentials, ...)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="output directory (default runs/<name>)")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="no TLS, no client authentication: loopback development ONLY")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no per-round lines")] = False,
    resume: Annotated[bool, typer.Option("--resume/--fresh", help="with run.store set: resume (default) or start over")] = True,
) -> None:
    """Serve CONFIG's run to real clients over gRPC (`fedloom client` on each site)."""
    overrides = list(set_ or [])
    if insecure:
        overrides.append("deploy.insecure=true")
        console.print("[bold red]WARNING: --insecure: no TLS, clients unauthenticated. Loopback development only.[/]")
    run(config, set_=overrides, engine="remote", out=out, quiet=quiet, resume=resume)


@app.command()
def client(
    server: Annotated[str, typer.Option("--server", help="HOST:PORT of the fedloom server")],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="this site's data: FILE.npz (x_train, y_train[, x_test, y_test]) or CONFIG.toml "
            "(the partition named by --partition or the client id, for demos and tests)",
        ),
    ],
    credentials: Annotated[
        Path | None, typer.Option("--credentials", help="this client's directory from `fedloom certs client`")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="no TLS (loopback development only)")] = False,
    client_id: Annotated[str | None, typer.Option("--client-id", help="client id (insecure mode; else the certificate's)")] = None,
    partition: Annotated[str | None, typer.Option("--partition", help="with --data CONFIG.toml: which client's partition")] = None,
    server_name: Annotated[
        str | None, typer.Option("--server-name", help="TLS name to verify when --server is an address not in the certificate")
    ] = None,
    device: Annotated[str, typer.Option("--device")] = "cpu",
    state: Annotated[
        Path | None, typer.Option("--state", help="file keeping this client's state across restarts (safetensors)")
    ] = None,
    give_up_after: Annotated[float, typer.Option("--give-up-after", help="seconds without the server before exiting")] = 300.0,
    delay: Annotated[
        float, typer.Option("--delay", min=0.0, help="seconds added to every training task: emulates a slow device (benchmarks, tests)")
    ] = 0.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Join a deployed run: train on this site's data whenever the server asks."""
    from fedloom.agent import AgentOptions, ClientAgent, load_site_data
    from fedloom.transport.credentials import load_client_credentials

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if insecure == (credentials is not None):
        console.print("[bold red]error:[/] give exactly one of --credentials DIR or --insecure")
        raise typer.Exit(2)
    if insecure:
        console.print("[bold red]WARNING: --insecure: no TLS, no authentication. Loopback development only.[/]")
    try:
        cid = client_id if insecure else load_client_credentials(credentials).client_id  # type: ignore[arg-type]
        if not cid:
            raise FedloomError("insecure mode needs --client-id")
        site = load_site_data(data, partition or cid)
        agent = ClientAgent(
            site,
            AgentOptions(
                server=server,
                credentials=credentials,
                client_id=cid,
                device=device,
                give_up_after=give_up_after,
                server_name=server_name,
                state_file=state,
                delay=delay,
            ),
        )
        report = agent.run()
    except FedloomError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(
        f"client {cid}: {report.tasks} training tasks, {report.evaluations} evaluations, "
        f"{report.reconnects} reconnects, {len(report.refused)} results refused"
    )


@app.command()
def edge(
    config: Annotated[Path, typer.Argument(help="the run's TOML configuration (its \\[hierarchy] edges name this edge's clients)")],
    edge_id: Annotated[str, typer.Option("--edge", help="which edge of \\[hierarchy] this process is")],
    server: Annotated[str, typer.Option("--server", help="HOST:PORT of the root server")],
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT this edge serves its clients on")],
    credentials: Annotated[
        Path | None, typer.Option("--credentials", help="this edge's client directory for the root (`fedloom certs client EDGE`)")
    ] = None,
    edge_credentials: Annotated[
        Path | None, typer.Option("--edge-credentials", help="this edge's server directory for its clients (`fedloom certs init`)")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="no TLS either way (loopback development only)")] = False,
    server_name: Annotated[
        str | None, typer.Option("--server-name", help="TLS name to verify when --server is an address not in the certificate")
    ] = None,
    min_clients: Annotated[
        int | None, typer.Option("--min-clients", min=1, help="clients to wait for before a round (default: the whole roster)")
    ] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: section.key=value (repeatable)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run an edge aggregator of a hierarchical deployment: a client of the root, a server to its clients."""
    from fedloom.agent import AgentOptions
    from fedloom.core.config import load_config
    from fedloom.edge import run_edge

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if insecure == (credentials is not None) or insecure == (edge_credentials is not None):
        console.print("[bold red]error:[/] give --credentials DIR and --edge-credentials DIR, or --insecure")
        raise typer.Exit(2)
    if insecure:
        console.print("[bold red]WARNING: --insecure: no TLS, no authentication. Loopback development only.[/]")
    try:
        cfg = load_config(config, set_ or [])
        options = AgentOptions(server=server, credentials=credentials, client_id=edge_id, server_name=server_name)
        report = run_edge(
            cfg, edge_id, options, listen=listen, insecure=insecure, min_clients=min_clients,
            credentials=str(edge_credentials) if edge_credentials is not None else None,
        )  # fmt: skip
    except FedloomError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    console.print(f"edge {edge_id}: {report.tasks} rounds forwarded, {len(report.refused)} partials refused")


certs_app = typer.Typer(help="Create the CA, server and client credentials for TLS deployments.")
app.add_typer(certs_app, name="certs")


@certs_app.command("init")
def certs_init(
    directory: Annotated[Path, typer.Argument(help="where to create ca/, server/ and clients/")] = Path("certs"),
    hosts: Annotated[list[str] | None, typer.Option("--host", help="server host name or IP (repeatable)")] = None,
    clients: Annotated[list[str] | None, typer.Option("--client", help="client id to issue credentials for (repeatable)")] = None,
) -> None:
    """A new CA in DIR/ca, the server's credentials in DIR/server, and DIR/clients/<id> per --client."""
    from fedloom.server import certs

    try:
        certs.create_ca(directory / "ca")
        certs.issue_server(directory / "ca", directory / "server", hosts=hosts or [])
        for cid in clients or []:
            certs.issue_client(directory / "ca", directory / "clients" / cid, cid)
    except certs.CertError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    console.print(f"CA: {directory / 'ca'} (keep ca.key secret)\nserver: {directory / 'server'}")
    for cid in clients or []:
        console.print(f"client {cid}: {directory / 'clients' / cid}")


@certs_app.command("client")
def certs_client(
    client_id: Annotated[str, typer.Argument(help="the new client's id")],
    directory: Annotated[Path, typer.Option("--dir", help="the directory given to `fedloom certs init`")] = Path("certs"),
    max_examples: Annotated[
        int | None,
        typer.Option("--max-examples", min=1, help="the most training examples this site may declare (written into its certificate)"),
    ] = None,
) -> None:
    """Issue credentials for one more client (DIR/clients/<id>): hand that directory to the site."""
    from fedloom.server import certs

    try:
        certs.issue_client(directory / "ca", directory / "clients" / client_id, client_id, max_examples=max_examples)
    except certs.CertError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    console.print(f"client {client_id}: {directory / 'clients' / client_id}")


@certs_app.command("revoke")
def certs_revoke(
    client_id: Annotated[str, typer.Argument(help="the client to shut out")],
    directory: Annotated[Path, typer.Option("--dir", help="the directory given to `fedloom certs init`")] = Path("certs"),
) -> None:
    """Revoke a client's certificate (DIR/ca/revoked.txt; set deploy.revoked to it): the server refuses it at once."""
    from fedloom.server import certs

    try:
        serial = certs.revoke(directory / "ca", directory / "clients" / client_id / certs.CLIENT_CERT)
    except certs.CertError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    console.print(f"revoked {client_id} (serial {serial:x}) in {directory / 'ca' / certs.REVOKED}")


def _run_and_report(r: Run, out_dir: Path, *, quiet: bool) -> None:
    from fedloom.artifacts import write_run_outputs
    from fedloom.report import client_table, round_line, round_table, short_name

    cfg = r.config
    width = min(console.width, 100)
    console.print(
        f"[bold]{cfg.run.name}[/]: {cfg.data.name}, {len(r.dataset.clients)} clients, model {cfg.model.name} "
        f"({r.spec.numel:,} values), strategy {r.strategy.name}, engine {r.engine.name}, {cfg.run.rounds} rounds"
    )
    if r.privacy is not None:
        console.print(r.privacy.summary)
    if r.federation.resumed_from:
        console.print(f"resumed from round {r.federation.resumed_from} (store {cfg.run.store})")
    headline = r.dataset.task.metrics
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
                progress.console.print(round_line(rec, headline, width), highlight=False)

        try:
            history = r.federation.run(cfg.run.rounds, callback=on_round)
        except FedloomError as exc:
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(1) from None
    table, left_out = round_table(history, headline, title=f"{cfg.run.name}: per-round metrics", width=width)
    console.print(table)
    if left_out:
        console.print(f"also in history.json: {', '.join(short_name(n) for n in left_out)}", highlight=False)
    per_client = client_table(history, headline, width=width)
    if per_client is not None:
        console.print(per_client)
    if r.federation.stop_reason is not None:
        console.print(f"[bold yellow]stopped after round {r.federation.state.round}:[/] {r.federation.stop_reason}")
    write_run_outputs(out_dir, history=history, model=r.global_model(), config=cfg.model_dump(), title=cfg.run.name)
    console.print(f"wrote {out_dir}/history.json, model.safetensors, metrics.png")


@app.command()
def runs(
    store: Annotated[Path, typer.Option("--store", help="the run store's database")] = Path("runs/fedloom.db"),
) -> None:
    """List the runs in a store: name, status, rounds done, last checkpoint, latest metrics."""
    from fedloom.store import Store

    try:
        with Store.open(store, create=False) as st:
            infos = st.list_runs()
    except FedloomError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    table = Table(title=f"runs in {store}")
    for col in ("name", "status", "rounds", "checkpoint", "started", "latest metrics"):
        table.add_column(col, justify="right" if col in ("rounds", "checkpoint") else "left")
    for info in infos:
        shown = {k: v for k, v in info.latest_metrics.items() if k.startswith("test_")} or info.latest_metrics
        table.add_row(
            info.name,
            info.status,
            str(info.rounds_done),
            "" if info.last_checkpoint is None else str(info.last_checkpoint),
            datetime.fromtimestamp(info.created).strftime("%Y-%m-%d %H:%M"),
            " ".join(f"{k}={_fmt(v)}" for k, v in shown.items()),
        )
    console.print(table)


@app.command()
def serve(
    source: Annotated[Path, typer.Argument(help="a run store (run.store) or a run directory (fedloom run --out DIR)")],
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    token: Annotated[
        str | None, typer.Option("--token", envvar="FEDLOOM_SERVE_TOKEN", help="require this bearer token on /v1 and /api")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="PEM certificate: serve HTTPS")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert")] = None,
    max_rows: Annotated[int, typer.Option("--max-rows", min=1, help="most inputs per predict request")] = 1024,
    dashboard: Annotated[bool, typer.Option("--dashboard/--no-dashboard", help="serve the web dashboard at /")] = True,
) -> None:
    """Serve a run's models over REST (/v1, /docs, /metrics) and its live dashboard (/), read only."""
    try:
        import uvicorn

        from fedloom.serve.app import create_app
        from fedloom.serve.dashboard import dashboard_router
    except ImportError as exc:
        console.print(f"[bold red]error:[/] {exc.name} is missing: pip install 'fedloom[serve]'")
        raise typer.Exit(2) from None
    from fedloom.serve.source import open_source

    if (tls_cert is None) != (tls_key is None):
        console.print("[bold red]error:[/] give both --tls-cert and --tls-key, or neither")
        raise typer.Exit(2)
    try:
        src = open_source(source)
    except FedloomError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    routers = [dashboard_router(src, token=token)] if dashboard else []
    api = create_app(src, token=token, max_rows=max_rows, routers=routers)
    scheme = "https" if tls_cert else "http"
    console.print(f"serving {source} at {scheme}://{host}:{port}/ (API docs: /docs){' with a bearer token' if token else ''}")
    uvicorn.run(
        api,
        host=host,
        port=port,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        log_level="warning",
    )


@app.command()
def export(
    source: Annotated[Path, typer.Argument(help="a run store (run.store) or a run directory (fedloom run --out DIR)")],
    out: Annotated[Path, typer.Option("--out", help="the file to write")],
    fmt: Annotated[str, typer.Option("--format", help="safetensors | onnx | torchscript")] = "safetensors",
    run_name: Annotated[str | None, typer.Option("--run", help="the run (default: the newest in the store)")] = None,
    version: Annotated[str, typer.Option("--version", help="a checkpoint's round, or latest")] = "latest",
    prune: Annotated[
        float, typer.Option("--prune", help="structured pruning: fraction of neurons / channels removed per layer")
    ] = 0.0,
    quantize: Annotated[str, typer.Option("--quantize", help="none | int8 | fp16")] = "none",
    sparse: Annotated[bool, typer.Option("--sparse", help="safetensors: store zeros as bits (pruned models)")] = False,
) -> None:
    """Export one model version, optionally pruned and quantized; checked against torch after writing."""
    from fedloom.serve.export import export_model
    from fedloom.serve.source import open_source

    if not (version.isascii() and version.isdigit()) and version != "latest":
        console.print(f"[bold red]error:[/] --version must be a round number or latest, got {version!r}")
        raise typer.Exit(2)
    try:
        src = open_source(source)
        rep = export_model(
            src, out, run=run_name, version=int(version) if version.isdigit() else "latest", fmt=fmt,  # type: ignore[arg-type]
            prune=prune, quantize=quantize, sparse=sparse,  # type: ignore[arg-type]
        )  # fmt: skip
    except FedloomError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    check = "" if rep.max_abs_diff is None else f"; max |diff| vs torch {rep.max_abs_diff:.2e}"
    units = "".join(f", {k} {a}/{b}" for k, (a, b) in rep.kept_units.items())
    console.print(
        f"wrote {rep.path}: {rep.bytes:,} bytes ({rep.dense_bytes / rep.bytes:.1f}x smaller than the dense float32 "
        f"state), {rep.params:,} parameters{units}{check}",
        highlight=False,
    )


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
    """List the aggregation strategies and their own parameters (``strategy.<param>`` keys)."""
    import inspect

    from fedloom.strategies.registry import list_strategies, strategy_params

    table = Table(title="strategies")
    table.add_column("name")
    table.add_column("parameters (default)")
    for name in list_strategies():
        params = strategy_params(name).values()
        shown = [p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in params]
        table.add_row(name, ", ".join(shown))
    console.print(table)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
