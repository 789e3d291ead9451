"""Model service throughput: requests/s and p50/p99 latency of ``fedloom serve`` on loopback.

A store is trained first (the hospital MLP, 5 rounds; the MNIST CNN, 2 short rounds), then the
real service runs in its own process (``fedloom serve STORE``: uvicorn, one worker) and
``--clients`` threads, each with its own keep-alive HTTP connection (httpx), post predict
requests of 1 and of 64 inputs for ``--seconds`` each. Reported per (model, rows): requests/s,
rows/s, p50 and p99 latency as the client sees it (JSON encoding both ways included).

Usage:
    python bench/serve.py --json bench/results/serve_cpu.json [--seconds 10] [--clients 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

import fedloom
from fedloom.core.config import parse_config
from fedloom.run import build_run


def _train(store: Path) -> None:
    base = {"run": {"seed": 0, "engine": "sequential", "store": str(store)}, "strategy": {"name": "fedavg", "fraction": 1.0}}
    hosp = {**base, "run": {**base["run"], "name": "hospital", "rounds": 5}, "data": {"name": "hospital"},
            "model": {"name": "mlp", "hidden": [64, 32]}, "client": {"batch_size": 64, "lr": 0.001, "optimizer": "adam"}}  # fmt: skip
    cnn = {**base, "run": {**base["run"], "name": "cnn", "rounds": 2}, "data": {"name": "mnist", "partition": "iid", "num_clients": 100},
           "model": {"name": "cnn"}, "strategy": {"name": "fedavg", "fraction": 0.02},
           "client": {"batch_size": 50, "lr": 0.05, "max_steps": 5}}  # fmt: skip
    for cfg in (hosp, cnn):
        r = build_run(parse_config(cfg))
        r.federation.run(cfg["run"]["rounds"])


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _load(url: str, body: bytes, clients: int, seconds: float) -> dict[str, Any]:
    import httpx

    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        with httpx.Client(timeout=30) as c:
            c.post(url, content=body, headers={"content-type": "application/json"})  # warm the connection
            start.wait()
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                r = c.post(url, content=body, headers={"content-type": "application/json"})
                lat[i].append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 1e9
    start.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = sorted(x for xs in lat for x in xs)
    n = len(all_lat)
    return {
        "requests": n,
        "errors": sum(errors),
        "requests_per_s": n / wall,
        "p50_ms": statistics.median(all_lat) * 1e3,
        "p99_ms": all_lat[min(n - 1, int(0.99 * n))] * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=10)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        store = Path(d) / "store.db"
        _train(store)
        port = _port()
        exe = Path(sys.executable).with_name("fedloom")
        server = subprocess.Popen([str(exe), "serve", str(store), "--port", str(port), "--no-dashboard"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            import httpx

            for _ in range(200):
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            g = torch.Generator().manual_seed(0)
            for run, width in (("hospital", 21), ("cnn", 784)):
                for n in (1, 64):
                    body = json.dumps({"rows": torch.randn(n, width, generator=g).tolist()}).encode()
                    url = f"http://127.0.0.1:{port}/v1/models/latest/predict?run={run}"
                    res = _load(url, body, args.clients, args.seconds)
                    row = {"model": run, "rows_per_request": n, "request_bytes": len(body), **res,
                           "rows_per_s": res["requests_per_s"] * n}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {
        "bench": "serve",
        "fedloom": fedloom.__version__,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "setup": {"clients": args.clients, "seconds": args.seconds, "server": "fedloom serve (uvicorn, 1 process)", "loopback": True},
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    md = ["| model | rows/request | requests/s | rows/s | p50 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['model']} | {r['rows_per_request']} | {r['requests_per_s']:.0f} | {r['rows_per_s']:.0f} | {r['p50_ms']:.1f} | "
           f"{r['p99_ms']:.1f} | {r['errors']} |" for r in rows]  # fmt: skip
    args.json.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
