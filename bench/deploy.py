"""Deployment benchmark: one real ``fedloom server`` and N concurrent clients on loopback.

Setting: the McMahan CNN (1,663,370 float32 parameters, 6.65 MB), MNIST IID over N clients,
FedAvg with every client in every round (fraction 1.0). Per N (default 10, 100, 1000):

* the **server** is the real thing: ``fedloom server CONFIG`` in its own process, with a
  generated config (``[deploy]`` on 127.0.0.1, ``max_workers`` = N + 64, no server-side test
  evaluation between rounds: ``run.eval_every`` is larger than the run). TLS is off by
  default (``deploy.insecure``); ``--tls`` issues a CA, the server's and N clients'
  credentials and runs with mutual TLS and signed results, as in production.
* the **clients** are N :class:`fedloom.agent.ClientAgent` objects — the real client
  code path: Register, heartbeat thread, long-poll PullTask, PullTask's chunk stream read to
  the end, then PushResult of a wire-encoded ``update`` — spread as threads over a few
  load-generator processes (one process per client would need ~300 MB each: 1000 do not fit
  this machine). Each client has its own gRPC channel and TCP connection. Local training is
  replaced by a fixed ``--compute-s`` sleep, and the update is a fixed random delta of the
  model's size, encoded once per load generator (a real client encodes its own: client-side
  time, not the server's). Three concessions keep 1000 simulated clients within one machine's
  memory and leave the CPU to the server; they change nothing on the server's side:
  ``--client-decode lean`` (default) checks the pulled message's structure and size instead
  of running :func:`fedloom.transport.wire.decode` (``full``: the real decoder, which holds a
  model-sized buffer per client and spends ~10 ms of CPU per message on CRC-32 + SHA-256);
  the clients' receive windows do not grow (``grpc.http2.bdp_probe`` = 0 on their channels;
  ``--client-bdp`` lets them); and the load generators run with :data:`LOADGEN_ENV`.

``--async-clients`` replaces the agent threads by asyncio load generators
(:func:`aio_loadgen`): each client a ``grpc.aio`` coroutine with its own channel and TCP
connection doing the same protocol (Register, heartbeats, long-poll PullTask read to the end
and checked, ``--compute-s`` of sleep, PushResult of a wire-encoded update of the model's size
in the agent's 256 KiB chunks, signed under ``--tls``), up to 2,500 per process, so 10,000
connected clients fit one machine. ``--cohort K`` samples K of the N clients each round
(``strategy.fraction`` = K / N); the rows then also report ``transfer_s`` (the spread of
the cohort's model arrivals + the upload tail) and ``overhead_beyond_transfer_s``, and, as the
download itself is transfer too, ``download_s``, ``transfer_with_download_s`` and
``overhead_outside_transfer_s`` (see :func:`_transfer`). The clients heartbeat and long-poll
at the intervals the server advertises (``advertised_heartbeat_s``, ``advertised_pull_wait_s``:
the longest seen; :mod:`fedloom.server.control`), pausing heartbeats while a long poll waits,
as the agent does; ``--heartbeat-interval`` and ``--pull-wait`` set the server's shortest
intervals (``deploy.heartbeat_interval``, ``deploy.max_pull_wait``). The
benchmark raises its open-file limit to the hard limit (the server and the load
generators inherit it). For example (bench/results/deploy_aio_cpu.json)::

    nice python bench/deploy.py --async-clients --clients 100,1000,10000 --cohort 100 \
        --rounds 4 --flower-clients '' --json bench/results/deploy_aio_cpu.json

Reported per N (round 1 includes waiting for all N clients to register, so it is reported
apart; the rounds after it are "measured"):

* ``round_s``: the server's own round time (``history.json`` ``seconds``: select, encode the
  model once, fan out to N clients, receive / decode / validate / aggregate N updates, apply);
* ``overhead_s`` = ``round_s`` − ``compute_s``: what the round costs beyond the slowest
  client's compute (every simulated client computes exactly ``compute_s``). It includes the
  clients' own protocol work (decoding the model, sending the update), which on this machine
  shares the CPU with the server: ``loadgen_cpu_s_per_round`` says how much;
* bytes per round: tensor payload (N × 6.65 MB each way), the protobuf messages counted by
  the clients (payload + framing of the chunked wire format), and the loopback interface's
  byte counter over the round (``/proc/net/dev``: adds HTTP/2, TCP/IP, heartbeats and idle
  long polls — and any other loopback traffic on the machine at that time);
* the server's peak RSS (its ``ru_maxrss``), its RSS once listening before any client came
  (MNIST loaded: the server keeps the 10k test split), its CPU seconds per round, its threads;
* the load generators' peak RSS and CPU, and the time from spawning them to all N
  clients registered.

Flower's deployment engine (SuperLink + SuperNodes) is the comparison: ``--flower-clients``
runs ``flower-superlink``, N ``flower-supernode`` processes and ``flwr run`` of
:data:`FLOWER_APP` (the same FedAvg, sleep and bytes) from ``--flower-venv`` (flwr 1.42 +
numpy: ``python3 -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install flwr==1.42.0 numpy``).
A SuperNode is ~450 MB of processes, so configurations that do not fit in memory are recorded
as not measured, with the reason.

Each row also records what went wrong on the way: ``client_rpc_failures`` (failed PullTask /
PushResult calls by gRPC status; the agents reconnect, register again and redo the task),
``client_reconnects``, ``client_refused``, ``client_errors`` and the server's warnings.

Usage:
    python bench/deploy.py --json bench/results/deploy.json [--clients 10,100,1000]
        [--rounds 3] [--compute-s 1.0] [--model cnn] [--loadgens K] [--tls]
        [--async-clients] [--cohort K] [--ramp-s S] [--pull-wait S]
        [--client-decode lean|full] [--client-bdp] [--keep] [--profile]

``--keep`` keeps each configuration's work directory (server log, config, load-generator
results, 0.1 s samples of RSS / CPU / loopback bytes); ``--profile`` also py-spies the server.
Diagnostics that change the server's process (not its code): ``--server-env KEY=VALUE``,
``--grpc-option KEY=INT`` (server and clients). The run stops a configuration if the
machine's available memory falls below ``--min-free-mb`` (1000 clients need ~14 GB for the
server and ~4 GB for the load generators).

Timings on a shared 2-core machine are noisy, and the load generators compete with the
server for the same two cores: compare CPU seconds as well as wall seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6
CLK_TCK = os.sysconf("SC_CLK_TCK")

FLOWER_MB_PER_NODE = 450
"""Memory one Flower SuperNode takes during a run, measured with flwr 1.42 here: ``flower-supernode``
(~190 MB) + its ``flower-superexec`` (~127 MB) + a ``flwr-clientapp`` process per run (~130 MB)."""

FLOWER_APP = {
    "pyproject.toml": """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "deploybench"
version = "1.0.0"
dependencies = ["flwr>=1.42", "numpy"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "deploybench.server_app:app"
clientapp = "deploybench.client_app:app"

[tool.flwr.app.config]
num-server-rounds = {rounds}
nodes = {n}
compute-s = {compute_s}
numel = {numel}
timings = "{timings}"
""",
    "deploybench/__init__.py": "",
    "deploybench/client_app.py": """\
import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"]  # the global model, received and deserialized by Flower
    time.sleep(float(context.run_config["compute-s"]))  # simulated local training
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 60})})
    return Message(content=content, reply_to=msg)
""",
    "deploybench/server_app.py": """\
import json
import time

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    n = int(cfg["nodes"])
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)

    def mark(server_round: int, arrays: ArrayRecord) -> MetricRecord:  # called after each round (0: before)
        with open(str(cfg["timings"]), "a") as f:
            f.write(json.dumps({"round": server_round, "t": time.time()}) + "\\n")
        return MetricRecord({"round": float(server_round)})

    init = ArrayRecord([np.zeros(int(cfg["numel"]), dtype=np.float32)])
    strategy.start(grid=grid, initial_arrays=init, num_rounds=int(cfg["num-server-rounds"]), evaluate_fn=mark)
""",
}
"""A Flower App doing what the fedloom clients do: FedAvg over every node, a sleep as training, the
model-sized array sent back (Flower's FedAvg averages weights, not deltas: the same bytes)."""


# --------------------------------------------------------------------------- /proc helpers
def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of ``pid``; empty if it is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    out[key] = int(val.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return {}
    return out


def _cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat)."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return (sum(parts[:8]) - idle) / CLK_TCK


def _lo_bytes() -> int:
    """Bytes received on the loopback interface (on ``lo`` every byte sent is received once)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[0])
    return 0


LOADGEN_ENV = {
    "MALLOC_ARENA_MAX": "2",  # hundreds of threads in one process: bound glibc's per-thread arenas
    "MALLOC_MMAP_THRESHOLD_": "262144",  # model-sized buffers mmapped, so freed ones go back to the OS at once
}
"""Environment of the load generators: hundreds of clients' receive buffers must not pile up in freed heap."""


def _grpc_options(args: argparse.Namespace) -> list[tuple[str, int]]:
    return [(k, int(v)) for k, v in (kv.split("=", 1) for kv in args.grpc_option)]


def _mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait4(proc: subprocess.Popen[Any], timeout: float) -> dict[str, float] | None:
    """Reap ``proc`` within ``timeout`` s; its exit code, peak RSS (MB) and CPU seconds, None if still running."""
    end = time.monotonic() + timeout
    while True:
        try:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            rc = proc.returncode if proc.returncode is not None else -1
            return {"rc": rc, "peak_rss_mb": float("nan"), "cpu_s": float("nan")}
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return {
                "rc": proc.returncode,
                "peak_rss_mb": ru.ru_maxrss / 1024,
                "cpu_s": ru.ru_utime + ru.ru_stime,
                "user_s": ru.ru_utime,
                "sys_s": ru.ru_stime,
            }
        if time.monotonic() >= end:
            return None
        time.sleep(0.05)


def _kill(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, sig)  # each child is its own process group (start_new_session)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- load generator
_SHARED: dict[tuple[Any, ...], Any] = {}


def _lean_decode(chunks: Any, *, max_bytes: int, kinds: Any = None) -> Any:
    """A structural check of a pulled message instead of :func:`fedloom.transport.wire.decode`.

    It reads the whole stream and checks the header (kind, metadata, sizes), the chunk order,
    the byte count and the trailer, but neither the CRC-32s nor the SHA-256, and it does not
    assemble the tensors (they are shared zero tensors of the announced shapes): hundreds of
    simulated clients in one process would otherwise hold hundreds of model-sized buffers and
    spend the CPU the server needs on this two-core machine. ``--client-decode full`` uses the
    real decoder.
    """
    import torch

    from fedloom.transport.wire import DTYPES, Message, WireError

    it = iter(chunks)
    first = next(it, None)
    if first is None or first.WhichOneof("body") != "header":
        raise WireError("no header")
    h = first.header
    if kinds is not None and h.kind not in kinds:
        raise WireError(f"unexpected message kind {h.kind!r}")
    if h.total_bytes > max_bytes:
        raise WireError("oversized")
    got, trailer = 0, None
    for c in it:
        which = c.WhichOneof("body")
        if which != "data" or trailer is not None:
            if which == "trailer" and trailer is None:
                trailer = c.trailer
                continue
            raise WireError(f"unexpected {which} chunk")
        got += len(c.data.payload)
    if trailer is None or got != h.total_bytes:
        raise WireError(f"truncated: {got} of {h.total_bytes} bytes")
    tensors = {}
    for tm in h.tensors:
        key = (tm.dtype, tuple(tm.shape))
        if key not in _SHARED:
            _SHARED[key] = torch.zeros(key[1], dtype=DTYPES[tm.dtype])
        tensors[tm.name] = _SHARED[key]
    return Message(h.kind, json.loads(h.meta_json or "{}"), tensors, bytes(trailer.signature), b"")


def loadgen(args: argparse.Namespace) -> None:
    """One load-generator process: clients ``--ids A:B`` of N, as threads, until the server ends the run."""
    import grpc
    import torch

    from fedloom.agent import AgentError, AgentOptions, ClientAgent
    from fedloom.core.params import ParamSpec
    from fedloom.data.mnist_federated import MNIST_TASK, client_id
    from fedloom.models.registry import build_model
    from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc
    from fedloom.transport.protocol import GRPC_OPTIONS
    from fedloom.transport.wire import encode_body

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(created).3f %(levelname)s %(name)s: %(message)s")
    client_log = logging.getLogger("fedloom.client")
    client_log.setLevel(logging.INFO)
    client_log.addFilter(lambda r: r.levelno >= logging.WARNING or "unreachable" in r.getMessage())  # retries only
    if args.client_decode == "lean":
        import fedloom.agent.agent as agent_module

        agent_module.decode = _lean_decode  # what ClientAgent._serve_one calls on the pulled stream
    lo, hi = (int(x) for x in args.ids.split(":"))
    n = args.num_clients
    model = build_model(args.model, MNIST_TASK)  # one module shared by all agents: only its layout is used
    spec = ParamSpec.from_module(model)
    gen = torch.Generator().manual_seed(lo)
    body = encode_body({"delta": torch.randn(spec.numel, generator=gen) * 1e-3})  # the fixed update, encoded once
    examples = max(1, 60_000 // n)
    records: list[dict[str, Any]] = []
    traffic: dict[str, list[int]] = {}  # "down/<kind>/<round>" -> [messages, protobuf bytes]
    lock = threading.Lock()

    def count(direction: str, kind: str, rnd: Any, nbytes: int) -> None:
        key = f"{direction}/{kind}/{rnd if rnd is not None else '-'}"
        with lock:
            slot = traffic.setdefault(key, [0, 0])
            slot[0] += 1
            slot[1] += nbytes

    failures: dict[str, int] = {}

    def failed(method: str, exc: Any, nbytes: int) -> None:
        """Log a failed streaming call (which one, gRPC's reason, how far it got) and count it."""
        code = exc.code().name if hasattr(exc, "code") else type(exc).__name__
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"{time.time():.3f} {method} failed after {nbytes} bytes: {code}: {details}", file=sys.stderr, flush=True)
        with lock:
            key = f"{method}: {code}: {details}"
            failures[key] = failures.get(key, 0) + 1

    class CountingStub:
        """The Fleet stub, counting the protobuf bytes of the chunk streams (per direction, kind, round)."""

        def __init__(self, stub: Any) -> None:
            self._stub = stub
            self.Register = stub.Register
            self.Heartbeat = stub.Heartbeat
            self.Leave = stub.Leave

        def PullTask(self, request: Any, **kw: Any) -> Any:
            return self._down(self._stub.PullTask(request, **kw))

        def PushResult(self, chunks: Any, **kw: Any) -> Any:
            try:
                return self._stub.PushResult(self._up(chunks), **kw)
            except grpc.RpcError as exc:
                failed("PushResult", exc, 0)
                raise

        @staticmethod
        def _head(chunk: Any) -> tuple[str, Any]:
            if chunk.WhichOneof("body") != "header":
                return "?", None
            return chunk.header.kind, json.loads(chunk.header.meta_json or "{}").get("round")

        def _down(self, call: Any) -> Any:
            total, kind, rnd = 0, "?", None
            try:
                for i, chunk in enumerate(call):
                    if i == 0:
                        kind, rnd = self._head(chunk)
                    total += chunk.ByteSize()
                    yield chunk
            except grpc.RpcError as exc:
                failed("PullTask", exc, total)
                raise
            count("down", kind, rnd, total)

        def _up(self, chunks: Any) -> Any:
            total, kind, rnd = 0, "?", None
            for i, chunk in enumerate(chunks):
                if i == 0:
                    kind, rnd = self._head(chunk)
                total += chunk.ByteSize()
                yield chunk
            count("up", kind, rnd, total)

    class BenchAgent(ClientAgent):
        """A ClientAgent whose local training is a fixed sleep that returns the fixed delta."""

        def __init__(self, index: int) -> None:
            cid = client_id(index, n)
            creds = Path(args.certs) / "clients" / cid if args.certs else None
            data = SimpleNamespace(num_examples=examples, test=None)
            options = AgentOptions(server=args.server, credentials=creds, client_id=cid, give_up_after=args.give_up)
            super().__init__(data, options)  # type: ignore[arg-type]
            self._model, self._spec, self._task = model, spec, MNIST_TASK  # skip building a CNN per client
            self.index = index
            self.t_registered: float | None = None
            self.error = ""
            self._current: dict[str, Any] | None = None

        def _connect(self) -> Any:
            if self._stub is None:
                # A channel of its own and its own TCP connection, as separate client processes would have
                # (gRPC otherwise shares one subchannel between identical channels of a process).
                extra = dict(_grpc_options(args))  # replace fedloom's values for these keys
                opts = [*(kv for kv in GRPC_OPTIONS if kv[0] not in extra), *extra.items()]
                opts.append(("grpc.use_local_subchannel_pool", 1))
                if not args.client_bdp:
                    # Each client's receive window stays at gRPC's 64 KiB: the model is not buffered in hundreds
                    # of connections at once while the clients wait for this process's GIL. The server's own
                    # settings (its receive window for the updates) are untouched.
                    opts.append(("grpc.http2.bdp_probe", 0))
                if self.creds is None:
                    self._channel = grpc.insecure_channel(self.options.server, options=opts)
                else:
                    tls = grpc.ssl_channel_credentials(
                        root_certificates=self.creds.ca_pem, private_key=self.creds.key_pem, certificate_chain=self.creds.cert_pem
                    )
                    self._channel = grpc.secure_channel(self.options.server, tls, options=opts)
                self._stub = CountingStub(pb_grpc.FleetStub(self._channel))
            return self._stub

        def _register(self) -> None:
            super()._register()
            if self.t_registered is None:
                self.t_registered = time.time()

        def _serve_one(self) -> bool:
            self._current = None
            refused = len(self.report.refused)
            more = super()._serve_one()
            if self._current is not None:
                self._current["t_pushed"] = time.time()
                self._current["accepted"] = len(self.report.refused) == refused
                with lock:
                    records.append(self._current)
            return more

        def _work(self, msg: Any) -> tuple[str, dict[str, Any], Any]:
            t_recv = time.time()
            params = msg.tensors.get("params")
            if params is None:
                raise ValueError("task without params")
            spec.check_vector(params)
            # Drop the global model now: a real client keeps it in its own process while it trains, but
            # here hundreds of clients share one process and would hold hundreds of copies.
            del params
            msg.tensors.clear()
            if msg.kind == "evaluate":
                return "eval_result", {"num_examples": 0, "metrics": {}}, {}
            rnd = int(msg.meta["round"])
            time.sleep(args.compute_s)
            self._current = {"client": self.index, "round": rnd, "t_recv": t_recv, "t_computed": time.time()}
            self.report.tasks += 1
            # weight: what the client-side weight_examples stage declares (the delta is not scaled: a fixed random one)
            meta = {"round": rnd, "num_examples": examples, "num_steps": 1, "metrics": {"loss": 0.0}, "weight": float(examples)}
            return "update", meta, body  # wire.encode takes an encoded Body as the tensors

        def serve(self) -> None:
            try:
                self.run()
            except (AgentError, Exception) as exc:  # noqa: BLE001 - recorded in the results
                self.error = f"{type(exc).__name__}: {exc}"
                print(f"{time.time():.3f} {self.client_id}: {self.error}", file=sys.stderr, flush=True)

    agents = [BenchAgent(i) for i in range(lo, hi)]
    t_start = time.time()
    threads = [threading.Thread(target=a.serve, name=f"client-{a.index}", daemon=True) for a in agents]
    done = threading.Event()

    def finish(*_: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)
    for t in threads:
        t.start()
    while not done.is_set() and any(t.is_alive() for t in threads):
        done.wait(0.2)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    with lock:
        out = {
            "ids": [lo, hi],
            "t_start": t_start,
            "t_end": time.time(),
            "finished": not any(t.is_alive() for t in threads),
            "registered": [a.t_registered for a in agents],
            "errors": {a.client_id: a.error for a in agents if a.error},
            "refused": {a.client_id: a.report.refused for a in agents if a.report.refused},
            "reconnects": sum(a.report.reconnects for a in agents),
            "rpc_failures": dict(failures),
            "records": list(records),
            "traffic": dict(traffic),
            "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_rss_mb": ru.ru_maxrss / 1024,
            "threads": threading.active_count(),
        }
    Path(args.result).write_text(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)  # daemon client threads may still be in gRPC calls


def _raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (10,000 clients are 10,000 sockets); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def aio_loadgen(args: argparse.Namespace) -> None:
    """One asyncio load-generator process: clients ``--ids A:B`` of N as coroutines, until the server ends the run.

    Each client is what a real agent does on the wire, without a thread: its own ``grpc.aio``
    channel (its own TCP connection), Register, a heartbeat every ``heartbeat_interval`` the
    server announced, long-poll PullTask (the model's stream read to the end and checked
    for structure and size, as ``--client-decode lean``), ``--compute-s`` of sleep, then
    PushResult of a wire-encoded update of the model's size (a fixed random delta, encoded
    once per process, signed per client under ``--tls``), then a new channel for the next
    task (as the agent: the server keeps memory on a connection that carried a model);
    told the run is over, it closes its channel without a Leave call (the run's end closed
    its session). Clients start over ``--ramp-s`` seconds, so 10,000 connections do not
    arrive as one burst of TCP handshakes. The results file has :func:`loadgen`'s schema.
    """
    import asyncio
    import random

    import grpc
    import torch

    from fedloom.core.params import ParamSpec
    from fedloom.data.mnist_federated import MNIST_TASK, client_id
    from fedloom.models.registry import build_model
    from fedloom.server import certs as certs_mod
    from fedloom.transport.proto import fedloom_pb2 as pb
    from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc
    from fedloom.transport.protocol import GRPC_OPTIONS
    from fedloom.transport.wire import encode, encode_body

    _raise_nofile()
    torch.set_num_threads(1)
    lo, hi = (int(x) for x in args.ids.split(":"))
    n = args.num_clients
    spec = ParamSpec.from_module(build_model(args.model, MNIST_TASK))
    gen = torch.Generator().manual_seed(lo)
    body = encode_body({"delta": torch.randn(spec.numel, generator=gen) * 1e-3}, chunk_bytes=256 << 10)  # the agent's upload chunks
    examples = max(1, 60_000 // n)
    max_bytes = 2 * spec.numel * 8 + (1 << 20)
    records: list[dict[str, Any]] = []
    traffic: dict[str, list[int]] = {}
    failures: dict[str, int] = {}
    errors: dict[str, str] = {}
    refused: dict[str, list[str]] = {}
    registered: dict[int, float] = {}
    counters = {"reconnects": 0, "heartbeats": 0, "idle": 0}
    advertised = {"heartbeat_interval": 0.0, "pull_wait": 0.0}  # the longest the server advertised
    extra = dict(_grpc_options(args))
    opts = [*(kv for kv in GRPC_OPTIONS if kv[0] not in extra), *extra.items(), ("grpc.use_local_subchannel_pool", 1)]
    if not args.client_bdp:
        opts.append(("grpc.http2.bdp_probe", 0))

    def count(direction: str, kind: str, rnd: Any, nbytes: int) -> None:
        slot = traffic.setdefault(f"{direction}/{kind}/{rnd if rnd is not None else '-'}", [0, 0])
        slot[0] += 1
        slot[1] += nbytes

    def failed(method: str, exc: Any) -> None:
        code = exc.code().name if hasattr(exc, "code") else type(exc).__name__
        details = exc.details() if hasattr(exc, "details") else str(exc)
        key = f"{method}: {code}: {details}"
        failures[key] = failures.get(key, 0) + 1

    def channel_for(cid: str) -> Any:
        if not args.certs:
            return grpc.aio.insecure_channel(args.server, options=opts)
        c = certs_mod.load_client_credentials(Path(args.certs) / "clients" / cid)
        tls = grpc.ssl_channel_credentials(root_certificates=c.ca_pem, private_key=c.key_pem, certificate_chain=c.cert_pem)
        return grpc.aio.secure_channel(args.server, tls, options=opts)

    async def pull(stub: Any, box: dict[str, Any]) -> tuple[str, dict[str, Any], int]:
        """One PullTask read to the end: (kind, metadata, bytes), checked like ``_lean_decode``.

        It asks for the long-poll wait the server advertised (``--pull-wait`` if none), and no
        heartbeat is sent while it waits if the server advertised one, as the agent does."""
        wait = box["pull_wait"] or args.pull_wait
        call = stub.PullTask(pb.PullTaskRequest(session=box["session"], wait_seconds=wait), timeout=wait + 120)
        kind, meta, total, got, trailer, announced = "?", {}, 0, 0, False, 0
        box["polling"] = True
        try:
            async for c in call:
                if box["polling"]:
                    box["polling"], box["t_first"] = False, time.time()
                total += c.ByteSize()
                which = c.WhichOneof("body")
                if which == "header":
                    kind, meta, announced = c.header.kind, json.loads(c.header.meta_json or "{}"), c.header.total_bytes
                    if announced > max_bytes:
                        raise ValueError("oversized task")
                elif which == "data":
                    got += len(c.data.payload)
                else:
                    trailer = True
        finally:
            box["polling"] = False
        if not trailer or got != announced:
            raise ValueError(f"truncated task: {got} of {announced} bytes")
        count("down", kind, meta.get("round"), total)
        return kind, meta, total

    async def heartbeat(box: dict[str, Any], stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), box["hb"] * (0.9 + 0.2 * random.random()))
                return
            except TimeoutError:
                pass
            if box["session"] is None or (box["polling"] and box["pull_wait"] > 0):
                continue  # the server keeps a client live while its long poll waits
            try:
                reply = await box["stub"].Heartbeat(pb.HeartbeatRequest(session=box["session"]), timeout=30)
                counters["heartbeats"] += 1
                if not reply.known:
                    box["session"] = None
                else:
                    box["hb"] = max(0.5, reply.heartbeat_interval or box["hb"])
                    box["pull_wait"] = reply.pull_wait or box["pull_wait"]
                    advertised["heartbeat_interval"] = max(advertised["heartbeat_interval"], reply.heartbeat_interval)
                    advertised["pull_wait"] = max(advertised["pull_wait"], reply.pull_wait)
            except grpc.aio.AioRpcError as exc:
                failed("Heartbeat", exc)

    async def one(index: int, start_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        cid = client_id(index, n)
        key = certs_mod.load_client_credentials(Path(args.certs) / "clients" / cid).key_pem if args.certs else None
        sign = (lambda data: certs_mod.sign(key, data)) if key is not None else None
        box: dict[str, Any] = {"session": None, "hb": 5.0, "pull_wait": 0.0, "polling": False, "t_first": None}
        stop = asyncio.Event()
        channel = channel_for(cid)
        stub = box["stub"] = pb_grpc.FleetStub(channel)
        hb = None
        last_contact = time.monotonic()
        delay = 0.5
        try:
            while True:
                try:
                    if box["session"] is None:
                        reply = await stub.Register(pb.RegisterRequest(client_id=cid, num_examples=examples), timeout=60)
                        box["session"], box["hb"] = reply.session, max(0.5, reply.heartbeat_interval)
                        box["pull_wait"] = max(0.0, reply.pull_wait)
                        advertised["heartbeat_interval"] = max(advertised["heartbeat_interval"], reply.heartbeat_interval)
                        advertised["pull_wait"] = max(advertised["pull_wait"], reply.pull_wait)
                        registered.setdefault(index, time.time())
                        if hb is None:
                            hb = asyncio.ensure_future(heartbeat(box, stop))
                    kind, meta, _ = await pull(stub, box)
                    last_contact, delay = time.monotonic(), 0.5
                    if kind == "idle":
                        counters["idle"] += 1
                        retry = meta.get("retry_after")
                        if isinstance(retry, (int, float)) and 0 < retry <= 60:
                            await asyncio.sleep(float(retry) * (0.5 + random.random()))
                        continue
                    if kind == "shutdown":
                        box["session"] = None  # as the agent does: the run's end closed the session, no Leave
                        return
                    rec = {"client": index, "round": int(meta.get("round", -1)), "t_first": box["t_first"], "t_recv": time.time()}
                    await asyncio.sleep(args.compute_s)
                    rec["t_computed"] = time.time()
                    up = {"session": box["session"], "task_id": meta.get("task_id", ""), "round": rec["round"],
                          "num_examples": examples, "num_steps": 1, "metrics": {"loss": 0.0},
                          "weight": float(examples)}  # fmt: skip  # what the client-side weight_examples stage declares
                    chunks = list(encode("update", up, body, sign=sign))
                    result = await stub.PushResult(iter(chunks), timeout=600)
                    count("up", "update", rec["round"], sum(c.ByteSize() for c in chunks))
                    rec["t_pushed"], rec["accepted"] = time.time(), bool(result.accepted)
                    old, channel = channel, channel_for(cid)  # a fresh connection per task, as the agent does
                    stub = box["stub"] = pb_grpc.FleetStub(channel)
                    await old.close()
                    if not result.accepted:
                        refused.setdefault(cid, []).append(result.reason)
                    records.append(rec)
                except grpc.aio.AioRpcError as exc:
                    failed("call", exc)
                    code = exc.code()
                    if code == grpc.StatusCode.NOT_FOUND:
                        box["session"] = None
                        continue
                    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
                                grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED):  # fmt: skip
                        errors[cid] = f"refused: {code.name}: {exc.details()}"
                        return
                    if time.monotonic() - last_contact > args.give_up:
                        errors[cid] = f"gave up: {code.name}: {exc.details()}"
                        return
                    counters["reconnects"] += 1
                    await asyncio.sleep(delay * (0.5 + random.random()))
                    delay = min(2 * delay, 10.0)
                except ValueError as exc:
                    failed("decode", exc)
        except Exception as exc:  # noqa: BLE001 - recorded in the results
            errors[cid] = f"{type(exc).__name__}: {exc}"
        finally:
            stop.set()
            if box["session"] is not None:
                try:
                    await stub.Leave(pb.LeaveRequest(session=box["session"]), timeout=5)
                except grpc.aio.AioRpcError:
                    pass
            if hb is not None:
                await asyncio.gather(hb, return_exceptions=True)
            await channel.close()

    t_start = time.time()
    state = {"finished": False}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        t0 = time.monotonic()
        per = args.ramp_s / max(1, hi - lo)
        clients = asyncio.gather(*(one(i, t0 + (i - lo) * per) for i in range(lo, hi)))
        stopper = asyncio.ensure_future(done.wait())
        await asyncio.wait({clients, stopper}, return_when=asyncio.FIRST_COMPLETED)
        state["finished"] = clients.done()

    asyncio.run(main())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "ids": [lo, hi],
        "t_start": t_start,
        "t_end": time.time(),
        "finished": state["finished"],
        "registered": [registered.get(i) for i in range(lo, hi)],
        "errors": errors,
        "refused": refused,
        "reconnects": counters["reconnects"],
        "heartbeats": counters["heartbeats"],
        "idle_pulls": counters["idle"],
        "advertised": advertised,
        "rpc_failures": failures,
        "records": records,
        "traffic": traffic,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_mb": ru.ru_maxrss / 1024,
        "threads": threading.active_count(),
    }
    Path(args.result).write_text(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)


# --------------------------------------------------------------------------- one configuration
CONFIG = """\
[run]
name = "deploy_bench_{n}"
seed = 0
rounds = {rounds}
eval_every = {no_eval}     # no server-side test evaluation between rounds
min_updates = 1

[data]
name = "mnist"
partition = "iid"
num_clients = {n}

[model]
name = "{model}"

[strategy]
name = "fedavg"
fraction = {fraction}
min_clients = {cohort}

[client]
epochs = 1
batch_size = 10
lr = 0.05

[deploy]
address = "127.0.0.1:{port}"
{security}
min_clients = {n}
wait_timeout = {wait_timeout}
round_timeout = {round_timeout}
round_retries = 0
heartbeat_interval = {heartbeat_interval}
heartbeat_timeout = {heartbeat_timeout}
max_workers = {max_workers}
max_pull_wait = {pull_wait}
"""


class Monitor(threading.Thread):
    """Samples every ``interval`` s: loopback bytes, CPU and RSS of the server and load generators, machine CPU."""

    def __init__(self, server_pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.server_pid = server_pid
        self.loadgen_pids: list[int] = []
        self.interval = interval
        self.samples: list[tuple[float, ...]] = []  # t, lo, srv_cpu, srv_rss, srv_threads, lg_cpu, lg_rss, busy
        self.server_hwm_kb = 0
        self.stop = threading.Event()
        self._lg_cpu_last: dict[int, float] = {}
        self.guard_mb = 0.0
        self.on_low_memory: Any = None
        self.low_memory = False
        self.min_available_mb = float("inf")

    def sample(self) -> None:
        st = _status(self.server_pid)
        if st:
            self.server_hwm_kb = max(self.server_hwm_kb, st.get("VmHWM", 0))
        srv_cpu = _cpu_s(self.server_pid)
        lg_rss = 0
        for pid in self.loadgen_pids:
            c = _cpu_s(pid)
            if c is not None:
                self._lg_cpu_last[pid] = c
            lg_rss += _status(pid).get("VmRSS", 0)
        self.samples.append(
            (
                time.time(),
                _lo_bytes(),
                srv_cpu if srv_cpu is not None else float("nan"),
                st.get("VmRSS", 0) / 1024,
                st.get("Threads", 0),
                sum(self._lg_cpu_last.values()),
                lg_rss / 1024,
                _machine_busy_s(),
            )
        )

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            avail = _mem_available_mb()
            self.min_available_mb = min(self.min_available_mb, avail)
            if avail < self.guard_mb and self.on_low_memory is not None:
                self.low_memory = True
                self.on_low_memory()  # stop the run before the kernel's OOM killer picks a victim
                return
            self.stop.wait(self.interval)

    def at(self, t: float) -> tuple[float, ...] | None:
        """The last sample at or before ``t`` (the first one if none)."""
        best = None
        for s in self.samples:
            if s[0] <= t:
                best = s
            else:
                break
        return best or (self.samples[0] if self.samples else None)

    def after(self, t: float) -> tuple[float, ...] | None:
        """The first sample at or after ``t`` (the last one if none)."""
        for s in self.samples:
            if s[0] >= t:
                return s
        return self.samples[-1] if self.samples else None


def _certs(directory: Path, n: int) -> None:
    from fedloom.data.mnist_federated import client_id
    from fedloom.server import certs

    certs.create_ca(directory / "ca")
    certs.issue_server(directory / "ca", directory / "server", hosts=["127.0.0.1", "localhost"])
    for i in range(n):
        cid = client_id(i, n)
        certs.issue_client(directory / "ca", directory / "clients" / cid, cid)


def run_fedloom(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One row: a real server and ``n`` clients in load generators, ``args.rounds`` rounds."""
    import torch

    from fedloom.core.params import ParamSpec
    from fedloom.data.mnist_federated import MNIST_TASK
    from fedloom.models.registry import build_model

    numel = ParamSpec.from_module(build_model(args.model, MNIST_TASK)).numel
    param_bytes = numel * torch.empty((), dtype=torch.float32).element_size()
    tmp = Path(tempfile.mkdtemp(prefix=f"fedloom-deploy-{n}-"))
    port = _free_port()
    security = "insecure = true"
    t_certs = None
    if args.tls:
        t0 = time.perf_counter()
        _certs(tmp / "certs", n)
        t_certs = time.perf_counter() - t0
        security = f'credentials = "{tmp / "certs" / "server"}"'
    per_loadgen = 2500 if args.async_clients else 250
    loadgens = args.loadgens or max(1, min(4, math.ceil(n / per_loadgen)))
    cohort = min(n, args.cohort) if args.cohort else n
    cfg = tmp / "deploy.toml"
    cfg.write_text(
        CONFIG.format(
            n=n,
            rounds=args.rounds,
            no_eval=args.rounds + 1,
            model=args.model,
            port=port,
            security=security,
            wait_timeout=args.timeout,
            round_timeout=args.timeout,
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_timeout=args.heartbeat_timeout,
            max_workers=_max_workers(n, args),
            fraction=repr(cohort / n),
            cohort=cohort,
            pull_wait=args.pull_wait,
        )
    )
    fedloom = shutil.which("fedloom", path=str(Path(sys.executable).parent)) or "fedloom"
    server_log = tmp / "server.log"
    procs: list[subprocess.Popen[Any]] = []
    row: dict[str, Any] = {
        "framework": "fedloom",
        "clients": n,
        "tls": bool(args.tls),
        "loadgens": loadgens,
        "client_decode": args.client_decode,
        "client_bdp_probe": bool(args.client_bdp),
        "clients_kind": "asyncio (grpc.aio coroutines)" if args.async_clients else "ClientAgent threads",
        "cohort": cohort,
        "heartbeat_interval_s": args.heartbeat_interval,
        "pull_wait_s": args.pull_wait,
    }
    try:
        t_spawn = time.time()
        with server_log.open("wb") as log:
            cmd = [fedloom, "server", str(cfg), "--out", str(tmp / "out"), "-q"]
            if args.grpc_option:  # the same CLI, with extra gRPC channel arguments (a diagnostic, not a fedloom setting)
                patch = f"import sys, fedloom.transport.protocol as s; o = dict({_grpc_options(args)!r}); "
                patch += "s.GRPC_OPTIONS[:] = [kv for kv in s.GRPC_OPTIONS if kv[0] not in o] + list(o.items()); "
                patch += "from fedloom.cli import app; sys.argv[0] = 'fedloom'; app()"
                cmd = [sys.executable, "-c", patch, *cmd[1:]]
            server = subprocess.Popen(
                cmd,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,
                env={**os.environ, **dict(kv.split("=", 1) for kv in args.server_env)},
            )  # fmt: skip
        procs.append(server)
        while "listening on" not in server_log.read_text(errors="replace"):
            if server.poll() is not None or time.time() - t_spawn > 300:
                raise RuntimeError(f"server did not start:\n{server_log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        t_listening = time.time()
        time.sleep(0.5)
        idle = _status(server.pid)
        row["server_idle_rss_mb"] = round(idle.get("VmRSS", 0) / 1024, 1)
        row["server_startup_peak_rss_mb"] = round(idle.get("VmHWM", 0) / 1024, 1)
        mon = Monitor(server.pid)
        mon.guard_mb = args.min_free_mb

        def abort() -> None:
            for p in procs:
                _kill(p)

        mon.on_low_memory = abort
        mon.sample()
        mon.start()

        per = math.ceil(n / loadgens)
        results = []
        t_loadgens = time.time()
        for k in range(loadgens):
            lo, hi = k * per, min(n, (k + 1) * per)
            if lo >= hi:
                continue
            res = tmp / f"loadgen{k}.json"
            cmd = [sys.executable, __file__, "--loadgen", "--server", f"127.0.0.1:{port}", "--ids", f"{lo}:{hi}"]
            cmd += ["--num-clients", str(n), "--compute-s", str(args.compute_s), "--model", args.model]
            cmd += ["--result", str(res), "--give-up", str(args.give_up), "--client-decode", args.client_decode]
            if args.async_clients:
                cmd += ["--async-clients", "--ramp-s", str(args.ramp_s), "--pull-wait", str(args.pull_wait)]
            if args.client_bdp:
                cmd.append("--client-bdp")
            if args.tls:
                cmd += ["--certs", str(tmp / "certs")]
            for kv in args.grpc_option:
                cmd += ["--grpc-option", kv]
            env = {**os.environ, **LOADGEN_ENV, **dict(kv.split("=", 1) for kv in args.loadgen_env)}
            with (tmp / f"loadgen{k}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env)
                )
            results.append(res)
        mon.loadgen_pids = [p.pid for p in procs[1:]]
        if args.profile:  # sampled stacks of every server thread, folded (flamegraph.pl / speedscope input)
            spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
            cmd = [spy, "record", "-p", str(server.pid), "-r", "50", "-f", "raw", "-o", str(tmp / "server.pyspy.txt"), "--idle"]
            with (tmp / "py-spy.log").open("wb") as log:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

        budget = args.timeout * (args.rounds + 1) + 120
        srv = _wait4(server, budget)
        if srv is None:
            raise RuntimeError(f"server still running after {budget:.0f} s")
        t_server_exit = time.time()
        lg_exits = []
        for p in procs[1 : 1 + len(results)]:
            ex = _wait4(p, max(1.0, 30 - (time.time() - t_server_exit)))  # clients see "shutdown" and leave
            if ex is None:
                _kill(p, signal.SIGTERM)  # the load generator writes what it has and exits
                ex = _wait4(p, 20) or {"rc": "killed", "peak_rss_mb": float("nan"), "cpu_s": float("nan")}
            lg_exits.append(ex)
        for p in procs[1 + len(results) :]:  # py-spy writes its profile once the server is gone
            _wait4(p, 30)
        mon.stop.set()
        mon.join()
        if mon.low_memory:
            raise RuntimeError(
                f"aborted: the machine's available memory fell below {args.min_free_mb:.0f} MB "
                f"(server RSS {max((s[3] for s in mon.samples), default=0):.0f} MB, "
                f"load generators {max((s[6] for s in mon.samples), default=0):.0f} MB at most)"
            )
        if args.keep:
            cols = ["t", "lo_bytes", "server_cpu_s", "server_rss_mb", "server_threads"]
            cols += ["loadgen_cpu_s", "loadgen_rss_mb", "machine_busy_s"]
            (tmp / "samples.json").write_text(json.dumps({"columns": cols, "samples": mon.samples}))
        log_text = server_log.read_text(errors="replace")
        if srv["rc"] != 0:
            raise RuntimeError(f"server exited with {srv['rc']}:\n{log_text[-3000:]}")
        lgs = [json.loads(r.read_text()) for r in results if r.exists()]
        history = json.loads((tmp / "out" / "history.json").read_text())
    finally:
        for p in procs:
            _kill(p)
            if p.returncode is None:
                _wait4(p, 10)
    rows = history["rounds"] if isinstance(history, dict) and "rounds" in history else history
    row.update(
        _analyse(
            n, args, rows, lgs, mon, param_bytes,
            t_spawn=t_spawn, t_listening=t_listening, t_loadgens=t_loadgens,
        )  # fmt: skip
    )
    row["server_peak_rss_mb"] = round(srv["peak_rss_mb"], 1)
    row["server_peak_rss_before_exit_mb"] = round(mon.server_hwm_kb / 1024, 1)  # VmHWM: excludes writing the outputs
    row["server_rss_max_sampled_mb"] = round(max((s[3] for s in mon.samples), default=0.0), 1)  # VmRSS every 0.1 s
    row["server_threads_max"] = max((s[4] for s in mon.samples), default=0)
    row["loadgen_rss_max_sampled_mb"] = round(max((s[6] for s in mon.samples), default=0.0), 1)
    row["machine_min_available_mb"] = round(mon.min_available_mb)
    row["server_cpu_s_total"] = round(srv["cpu_s"], 2)
    row["server_cpu_user_sys_s"] = [round(srv["user_s"], 2), round(srv["sys_s"], 2)]
    row["server_env"] = args.server_env
    row["grpc_options"] = args.grpc_option
    row["loadgen_peak_rss_mb"] = [round(e["peak_rss_mb"], 1) for e in lg_exits]
    row["loadgen_cpu_s_total"] = round(sum(e["cpu_s"] for e in lg_exits), 2)
    row["server_warnings"] = [ln for ln in log_text.splitlines() if ln.startswith("WARNING") and "INSECURE" not in ln][:20]
    row["server_warning_count"] = sum(1 for ln in log_text.splitlines() if ln.startswith("WARNING"))
    row["max_workers"] = _max_workers(n, args)
    if t_certs is not None:
        row["certs_s"] = round(t_certs, 2)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        row["workdir"] = str(tmp)
    return row


def _transfer(round_s: float, compute_s: float, mine: list[dict[str, Any]]) -> dict[str, float]:
    """The round's transfer time and its overhead beyond compute and transfer (``--cohort`` rows).

    ``transfer_s`` = the spread of the clients' model arrivals (the server streaming the
    model to the whole cohort: from the first client that has it to the last) + the upload
    tail (from the last client's end of compute to its update pushed and acknowledged);
    ``overhead_beyond_transfer_s`` = ``round_s`` − ``compute_s`` − ``transfer_s``: selection,
    posting, the first client's download, decoding and aggregating what is not overlapped.

    The server streams the model to the whole cohort at once, interleaved, so every client
    has it at about the same time and the arrival spread hides the download itself. With the
    asyncio clients (which record when the model's first byte reached them, ``t_first``) the
    download is counted as transfer too: ``download_s`` = from the first byte of the model at
    any client to the last client having all of it; ``transfer_with_download_s`` =
    ``download_s`` + ``upload_tail_s``; ``overhead_outside_transfer_s`` = ``round_s`` −
    ``compute_s`` − that: selection, encoding and posting the model, waking the long polls,
    and what the round loop does after the last update is acknowledged (the aggregation it
    has not yet caught up on, the server step, the round record).
    """
    if not mine:
        return {}
    spread = max(x["t_recv"] for x in mine) - min(x["t_recv"] for x in mine)
    tail = max(x["t_pushed"] for x in mine) - max(x["t_computed"] for x in mine)
    out = {"transfer_s": round(spread + tail, 3), "overhead_beyond_transfer_s": round(round_s - compute_s - spread - tail, 3)}
    firsts = [x["t_first"] for x in mine if x.get("t_first") is not None]
    if len(firsts) == len(mine):  # asyncio clients: when the model's first byte reached each
        download = max(x["t_recv"] for x in mine) - min(firsts)
        out.update(
            download_s=round(download, 3),
            upload_tail_s=round(tail, 3),
            transfer_with_download_s=round(download + tail, 3),
            overhead_outside_transfer_s=round(round_s - compute_s - download - tail, 3),
        )
    return out


def _max_workers(n: int, args: argparse.Namespace) -> int:
    """``deploy.max_workers``: the value given, else clients + 64 (thread clients) or the config's default (asyncio)."""
    if args.max_workers:
        return int(args.max_workers)
    return 256 if args.async_clients else n + 64


def _analyse(
    n: int,
    args: argparse.Namespace,
    rounds: list[dict[str, Any]],
    lgs: list[dict[str, Any]],
    mon: Monitor,
    param_bytes: int,
    *,
    t_spawn: float,
    t_listening: float,
    t_loadgens: float,
) -> dict[str, Any]:
    records = [r for lg in lgs for r in lg["records"]]
    cohort = min(n, args.cohort) if args.cohort else n
    registered = [t for lg in lgs for t in lg["registered"] if t is not None]
    t_all_registered = max(registered) if len(registered) == n else None
    traffic: dict[str, list[int]] = {}
    for lg in lgs:
        for key, (msgs, nbytes) in lg["traffic"].items():
            slot = traffic.setdefault(key, [0, 0])
            slot[0] += msgs
            slot[1] += nbytes
    per_round = []
    prev_end = t_all_registered or t_loadgens
    for rec in rounds:
        r = rec["round"]
        mine = [x for x in records if x["round"] == r]
        end = max((x["t_pushed"] for x in mine), default=float("nan"))
        a, b = mon.at(prev_end), mon.after(end)  # the window covers the whole cycle (0.1 s samples)
        cyc: dict[str, Any] = {}
        if a and b and b[0] > a[0]:
            busy = b[7] - a[7]
            srv_cpu = b[2] - a[2]
            lg_cpu = b[5] - a[5]
            cyc = {
                "window_s": round(b[0] - a[0], 3),
                "loopback_mb": round((b[1] - a[1]) / MB, 2),
                "server_cpu_s": round(srv_cpu, 2),
                "loadgen_cpu_s": round(lg_cpu, 2),
                "other_cpu_s": round(busy - srv_cpu - lg_cpu, 2),  # the rest of the machine (other jobs)
            }
        down = traffic.get(f"down/task/{r}", [0, 0])
        up = traffic.get(f"up/update/{r}", [0, 0])
        seconds = rec["seconds"]
        per_round.append(
            {
                "round": r,
                "clients": len(rec.get("clients", [])),
                "status": rec.get("status", "ok"),
                "round_s": round(seconds, 3),
                "overhead_s": round(seconds - args.compute_s, 3),
                "payload_mb_down": round(rec.get("bytes_down", 0) / MB, 2),
                "payload_mb_up": round(rec.get("bytes_up", 0) / MB, 2),
                "proto_mb_down": round(down[1] / MB, 2),
                "proto_mb_up": round(up[1] / MB, 2),
                "tasks_received": down[0],
                "updates_sent": up[0],
                "updates_accepted": sum(1 for x in mine if x.get("accepted")),
                "dispatch_spread_s": round(max(x["t_recv"] for x in mine) - min(x["t_recv"] for x in mine), 3) if mine else None,
                "last_push_after_last_compute_s": round(end - max(x["t_computed"] for x in mine), 3) if mine else None,
                **_transfer(seconds, args.compute_s, mine),
                **cyc,
            }
        )
        prev_end = end
    measured = per_round[1:] if len(per_round) > 1 else per_round

    def stat(key: str, fn: Any) -> float | None:
        vals = [r[key] for r in measured if r.get(key) is not None]
        return round(fn(vals), 3) if vals else None

    def mean(v: list[float]) -> float:
        return sum(v) / len(v)

    control = {k: v for k, v in traffic.items() if not (k.startswith("down/task/") or k.startswith("up/update/"))}
    return {
        "model_numel": param_bytes // 4,
        "model_mb": round(param_bytes / MB, 3),
        "compute_s": args.compute_s,
        "rounds": len(per_round),
        "rounds_measured": [r["round"] for r in measured],
        "round_s_mean": stat("round_s", mean),
        "round_s_max": stat("round_s", max),
        "overhead_s_mean": stat("overhead_s", mean),
        "overhead_s_max": stat("overhead_s", max),
        "first_round_s": per_round[0]["round_s"] if per_round else None,
        "payload_mb_down_per_round": round(cohort * param_bytes / MB, 1),
        "payload_mb_up_per_round": round(cohort * param_bytes / MB, 1),
        "transfer_s_mean": stat("transfer_s", mean),
        "overhead_beyond_transfer_s_mean": stat("overhead_beyond_transfer_s", mean),
        "overhead_beyond_transfer_s_max": stat("overhead_beyond_transfer_s", max),
        "download_s_mean": stat("download_s", mean),
        "upload_tail_s_mean": stat("upload_tail_s", mean),
        "transfer_with_download_s_mean": stat("transfer_with_download_s", mean),
        "overhead_outside_transfer_s_mean": stat("overhead_outside_transfer_s", mean),
        "overhead_outside_transfer_s_max": stat("overhead_outside_transfer_s", max),
        "advertised_heartbeat_s": max((lg.get("advertised", {}).get("heartbeat_interval", 0.0) for lg in lgs), default=None),
        "advertised_pull_wait_s": max((lg.get("advertised", {}).get("pull_wait", 0.0) for lg in lgs), default=None),
        "client_heartbeats": sum(lg.get("heartbeats", 0) for lg in lgs),
        "client_idle_pulls": sum(lg.get("idle_pulls", 0) for lg in lgs),
        "proto_mb_down_per_round": stat("proto_mb_down", mean),
        "proto_mb_up_per_round": stat("proto_mb_up", mean),
        "loopback_mb_per_round": stat("loopback_mb", mean),
        "server_cpu_s_per_round": stat("server_cpu_s", mean),
        "loadgen_cpu_s_per_round": stat("loadgen_cpu_s", mean),
        "other_cpu_s_per_round": stat("other_cpu_s", mean),
        "dispatch_spread_s_mean": stat("dispatch_spread_s", mean),
        "server_start_s": round(t_listening - t_spawn, 2),
        "all_registered_s": round(t_all_registered - t_loadgens, 2) if t_all_registered else None,
        "registration_span_s": round(t_all_registered - min(registered), 2) if t_all_registered else None,
        "registered": len(registered),
        "control_traffic": control,
        "client_errors": {k: v for lg in lgs for k, v in lg["errors"].items()},
        "client_refused": {k: v for lg in lgs for k, v in lg["refused"].items()},
        "client_reconnects": sum(lg["reconnects"] for lg in lgs),
        "client_rpc_failures": {k: sum(lg.get("rpc_failures", {}).get(k, 0) for lg in lgs)
                                for k in sorted({k for lg in lgs for k in lg.get("rpc_failures", {})})},
        "per_round": per_round,
    }


# --------------------------------------------------------------------------- Flower
def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, over every process on the machine."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _tree(pid: int, kids: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _cmdline_has(pid: int, needle: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return needle.encode() in f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False


def run_flower(n: int, args: argparse.Namespace, numel: int) -> dict[str, Any]:
    """One Flower row: ``flower-superlink`` + ``n`` ``flower-supernode`` processes + ``flwr run`` of :data:`FLOWER_APP`."""
    venv_bin = Path(args.flower_venv) / "bin"
    row: dict[str, Any] = {"framework": "flower", "clients": n, "tls": False, "compute_s": args.compute_s}
    if not (venv_bin / "flower-superlink").exists():
        row["error"] = f"not measured: no Flower installation at {args.flower_venv} (pip install flwr==1.42.0 numpy there)"
        return row
    need = n * FLOWER_MB_PER_NODE + 2000
    if need > _mem_available_mb() - args.min_free_mb:
        row["error"] = (
            f"not measured: {n} SuperNodes need ~{need / 1024:.0f} GB (~{FLOWER_MB_PER_NODE} MB per node: flower-supernode, "
            f"flower-superexec and flwr-clientapp processes) and {_mem_available_mb() / 1024:.0f} GB are available"
        )
        return row
    version = subprocess.run([str(venv_bin / "python"), "-c", "import flwr; print(flwr.__version__)"],
                             capture_output=True, text=True, check=False).stdout.strip()  # fmt: skip
    row["flwr"] = version
    tmp = Path(tempfile.mkdtemp(prefix=f"flower-deploy-{n}-"))
    timings = tmp / "timings.jsonl"
    for name, text in FLOWER_APP.items():
        path = tmp / "app" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "pyproject.toml":
            text = text.format(rounds=args.rounds, n=n, compute_s=args.compute_s, numel=numel, timings=timings)
        path.write_text(text)
    port = _free_port()
    (tmp / "home").mkdir()
    (tmp / "home" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(tmp / "home"),
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    env.pop("VIRTUAL_ENV", None)
    procs: list[subprocess.Popen[Any]] = []
    node_ports = [_free_port() for _ in range(n)]
    markers = [f"127.0.0.1:{port}", *(f"127.0.0.1:{p}" for p in node_ports)]

    def spawn(cmd: list[str], log: str) -> subprocess.Popen[Any]:
        with (tmp / log).open("wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp, env=env)
        procs.append(proc)
        return proc

    samples: list[tuple[float, float, float, float, int]] = []  # t, lo, link rss MB, nodes rss MB, link cpu s
    stop = threading.Event()

    def monitor(link: int, nodes: list[int]) -> None:
        while not stop.is_set():
            kids = _children()
            link_pids = _tree(link, kids)
            node_pids = [q for p in nodes for q in _tree(p, kids)]
            link_cpu = sum(c for c in (_cpu_s(q) for q in link_pids) if c is not None)
            samples.append(
                (
                    time.time(),
                    _lo_bytes(),
                    sum(_status(q).get("VmRSS", 0) for q in link_pids) / 1024,
                    sum(_status(q).get("VmRSS", 0) for q in node_pids) / 1024,
                    link_cpu,
                )
            )
            stop.wait(0.5)

    try:
        t_spawn = time.time()
        link = spawn([str(venv_bin / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                      "--port", str(port)], "superlink.log")  # fmt: skip
        while "Uvicorn running" not in (tmp / "superlink.log").read_text(errors="replace"):
            if link.poll() is not None or time.time() - t_spawn > 120:
                raise RuntimeError("superlink did not start:\n" + (tmp / "superlink.log").read_text(errors="replace")[-2000:])
            time.sleep(0.1)
        row["superlink_start_s"] = round(time.time() - t_spawn, 2)
        t_nodes = time.time()
        nodes = [
            spawn([str(venv_bin / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{port}",
                   "--port", str(node_ports[i]), "--node-config", f"partition-id={i}"], f"supernode{i}.log")  # fmt: skip
            for i in range(n)
        ]
        mon = threading.Thread(target=monitor, args=(link.pid, [p.pid for p in nodes]), daemon=True)
        mon.start()
        run = subprocess.run(
            [str(venv_bin / "flwr"), "run", str(tmp / "app"), "local", "--stream"],
            capture_output=True, text=True, env=env, cwd=tmp, timeout=args.timeout * (args.rounds + 1) + 120, check=False,
        )  # fmt: skip
        (tmp / "flwr-run.log").write_text(run.stdout + run.stderr)
        end = time.time() + 60
        while time.time() < end and len(timings.read_text().splitlines() if timings.exists() else []) < args.rounds + 1:
            time.sleep(0.5)
        stop.set()
        mon.join()
    finally:
        stop.set()
        kids = _children()
        everything = {q for p in procs for q in _tree(p.pid, kids)}
        # flower-superexec detaches from its parent: find it by the API address it was given
        everything |= {int(e) for e in os.listdir("/proc") if e.isdigit() and any(_cmdline_has(int(e), m) for m in markers)}
        everything.discard(os.getpid())
        for q in everything:
            try:
                os.kill(q, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait()
    marks = [json.loads(line) for line in timings.read_text().splitlines()] if timings.exists() else []
    if len(marks) < args.rounds + 1:
        row["error"] = f"flwr run did not finish {args.rounds} rounds:\n" + (run.stdout + run.stderr)[-2000:]
        return row
    t = {m["round"]: m["t"] for m in marks}
    per_round = []
    for r in range(1, args.rounds + 1):
        seconds = t[r] - t[r - 1]

        def at(ts: float) -> tuple[float, ...]:
            best = samples[0]
            for smp in samples:
                if smp[0] <= ts:
                    best = smp
            return best

        a, b = at(t[r - 1]), next((smp for smp in samples if smp[0] >= t[r]), samples[-1])
        per_round.append(
            {
                "round": r,
                "round_s": round(seconds, 3),
                "overhead_s": round(seconds - args.compute_s, 3),
                "loopback_mb": round((b[1] - a[1]) / MB, 2),
                "superlink_cpu_s": round(b[4] - a[4], 2),
            }
        )
    measured = per_round[1:] if len(per_round) > 1 else per_round
    row.update(
        {
            "rounds": len(per_round),
            "rounds_measured": [r["round"] for r in measured],
            "round_s_mean": round(sum(r["round_s"] for r in measured) / len(measured), 3),
            "round_s_max": max(r["round_s"] for r in measured),
            "overhead_s_mean": round(sum(r["overhead_s"] for r in measured) / len(measured), 3),
            "overhead_s_max": max(r["overhead_s"] for r in measured),
            "first_round_s": per_round[0]["round_s"],
            "nodes_start_to_round_0_s": round(t[0] - t_nodes, 2),  # node start-up + `flwr run` + ServerApp start
            "payload_mb_down_per_round": round(n * numel * 4 / MB, 1),
            "payload_mb_up_per_round": round(n * numel * 4 / MB, 1),
            "loopback_mb_per_round": round(sum(r["loopback_mb"] for r in measured) / len(measured), 2),
            "server_peak_rss_mb": round(max(smp[2] for smp in samples), 1),  # SuperLink + SuperExec + ServerApp
            "server_cpu_s_per_round": round(sum(r["superlink_cpu_s"] for r in measured) / len(measured), 2),
            "nodes_peak_rss_mb": round(max(smp[3] for smp in samples), 1),
            "per_round": per_round,
        }
    )
    if args.keep:
        row["workdir"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return row


# --------------------------------------------------------------------------- report
def _fmt(v: Any, spec: str = ".2f") -> str:
    return "–" if v is None else format(v, spec)


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| framework | clients | TLS | rounds timed | round s (mean / max) | overhead s (mean / max) | "
        "MB/round down / up (payload) | MB/round on loopback | server peak RSS MB | "
        "clients' RSS MB | server CPU s/round | client-side CPU s/round |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['framework']} | {r['clients']} | | {r['error'].splitlines()[0][:300]} |" + " |" * 8)
            continue
        if r["framework"] == "fedloom":
            server = f"{_fmt(r['server_peak_rss_mb'], '.0f')} (idle {_fmt(r['server_idle_rss_mb'], '.0f')})"
            clients = "+".join(format(x, ".0f") for x in r["loadgen_peak_rss_mb"]) + f" ({r['loadgens']} load-gen)"
            client_cpu = _fmt(r["loadgen_cpu_s_per_round"])
        else:
            server = _fmt(r["server_peak_rss_mb"], ".0f")
            clients = f"{_fmt(r['nodes_peak_rss_mb'], '.0f')} ({r['clients']} SuperNodes)"
            client_cpu = "–"
        lines.append(
            f"| {r['framework']} | {r['clients']} | {'on' if r['tls'] else 'off'} | {len(r['rounds_measured'])} | "
            f"{_fmt(r['round_s_mean'])} / {_fmt(r['round_s_max'])} | {_fmt(r['overhead_s_mean'])} / {_fmt(r['overhead_s_max'])} | "
            f"{_fmt(r['payload_mb_down_per_round'], '.0f')} / {_fmt(r['payload_mb_up_per_round'], '.0f')} | "
            f"{_fmt(r['loopback_mb_per_round'], '.0f')} | {server} | {clients} | "
            f"{_fmt(r['server_cpu_s_per_round'])} | {client_cpu} |"
        )
    return "\n".join(lines)


def _aio_table(rows: list[dict[str, Any]]) -> str:
    """The asyncio rows as a Markdown table (``--md``): memory, CPU and overhead per number of connected clients."""
    lines = [
        "| connected clients | cohort | heartbeat / long poll s (configured; advertised) | rounds timed | round s (mean) | "
        "overhead s (mean / max) | transfer s | overhead beyond transfer s (mean / max) | download + upload tail s | "
        "overhead outside transfer s (mean / max) | server peak RSS MB (idle) | clients' cost MB (peak - idle) | "
        "server CPU s/round | server threads | load-gen RSS MB | other CPU s/round | client reconnects |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['clients']} | | {r['error'].splitlines()[0][:300]} |" + " |" * 14)
            continue
        lines.append(
            f"| {r['clients']} | {r.get('cohort', r['clients'])} | "
            f"{_fmt(r.get('heartbeat_interval_s'), 'g')} / {_fmt(r.get('pull_wait_s'), 'g')}"
            f"{'; ' + _fmt(r['advertised_heartbeat_s'], 'g') + ' / ' + _fmt(r['advertised_pull_wait_s'], 'g') if r.get('advertised_pull_wait_s') else ''} | "
            f"{len(r['rounds_measured'])} | {_fmt(r['round_s_mean'])} | "
            f"{_fmt(r['overhead_s_mean'])} / {_fmt(r['overhead_s_max'])} | {_fmt(r.get('transfer_s_mean'))} | "
            f"{_fmt(r.get('overhead_beyond_transfer_s_mean'))} / {_fmt(r.get('overhead_beyond_transfer_s_max'))} | "
            f"{_fmt(r.get('download_s_mean'))} + {_fmt(r.get('upload_tail_s_mean'))} | "
            f"{_fmt(r.get('overhead_outside_transfer_s_mean'))} / {_fmt(r.get('overhead_outside_transfer_s_max'))} | "
            f"{_fmt(r['server_peak_rss_mb'], '.0f')} ({_fmt(r['server_idle_rss_mb'], '.0f')}) | "
            f"{_fmt(r['server_peak_rss_mb'] - r['server_idle_rss_mb'], '.0f')} | "
            f"{_fmt(r['server_cpu_s_per_round'])} | {r['server_threads_max']} | "
            f"{'+'.join(format(x, '.0f') for x in r['loadgen_peak_rss_mb'])} | {_fmt(r['other_cpu_s_per_round'])} | "
            f"{r.get('client_reconnects', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--clients", default="10,100,1000", help="comma-separated numbers of concurrent clients")
    p.add_argument("--rounds", type=int, default=3, help="rounds per configuration (round 1 is reported apart)")
    p.add_argument("--compute-s", type=float, default=1.0, help="simulated local compute per client and round")
    p.add_argument("--model", default="cnn")
    p.add_argument("--loadgens", type=int, default=0, help="load-generator processes (default: one per 250 clients, 1-4)")
    p.add_argument("--client-decode", choices=("lean", "full"), default="lean",
                   help="how simulated clients read the model: lean (structure and sizes, no buffers) or full (wire.decode)")
    p.add_argument("--client-bdp", action="store_true",
                   help="let the simulated clients' receive windows grow (gRPC BDP probing; default off: memory)")
    p.add_argument("--tls", action="store_true", help="mutual TLS and signed results (default: deploy.insecure on loopback)")
    p.add_argument("--max-workers", type=int, default=0,
                   help="deploy.max_workers, the server's decoding pool (default: clients + 64; 256 with --async-clients)")
    p.add_argument("--async-clients", action="store_true",
                   help="asyncio load generators (grpc.aio coroutines, up to 2500 clients per process) instead of ClientAgent threads")
    p.add_argument("--cohort", type=int, default=0, help="clients sampled per round (default: all of them)")
    p.add_argument("--ramp-s", type=float, default=10.0, help="asyncio clients start over this many seconds")
    p.add_argument("--pull-wait", type=float, default=10.0, help="the clients' long-poll wait (and deploy.max_pull_wait)")
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--heartbeat-timeout", type=float, default=120.0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for registration and for each round")
    p.add_argument("--give-up", type=float, default=300.0, help="clients give up after this long without the server")
    p.add_argument("--flower-clients", default="10,100,1000",
                   help="numbers of Flower SuperNodes to compare with ('' to skip); skipped with the reason if they do not fit")
    p.add_argument("--flower-venv", default="/tmp/flwr-venv", help="virtual environment with flwr (1.42) and numpy")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the server process (e.g. MALLOC_ARENA_MAX=2); repeatable")
    p.add_argument("--min-free-mb", type=float, default=2048,
                   help="abort a configuration if the machine's available memory falls below this")
    p.add_argument("--grpc-option", action="append", default=[], metavar="KEY=INT",
                   help="set a gRPC channel argument for server and clients, replacing fedloom's value (diagnostics)")
    p.add_argument("--loadgen-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the load generators (besides LOADGEN_ENV); repeatable")
    p.add_argument("--md", type=Path, help="also write the asyncio rows' table (Markdown) here")
    p.add_argument("--table-from", type=Path, help="only print (and --md write) the table of an earlier --json")
    p.add_argument("--keep", action="store_true", help="keep each configuration's work directory (logs, config, samples)")
    p.add_argument("--profile", action="store_true", help="py-spy the server (folded stacks in the work directory; implies --keep)")
    # load-generator mode (internal)
    p.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--server", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    p.add_argument("--num-clients", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--certs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loadgen:
        aio_loadgen(args) if args.async_clients else loadgen(args)
        return
    nofile = _raise_nofile()  # the server and the load generators inherit it
    if args.table_from is not None:
        rows = json.loads(args.table_from.read_text())["rows"]
        table = _aio_table(rows)
        print(table)
        if args.md is not None:
            args.md.write_text(table + "\n")
        return
    if args.json is None:
        p.error("--json is required")
    args.keep = args.keep or args.profile

    import grpc
    import torch

    out: dict[str, Any] = {
        "benchmark": "deploy",
        "setting": {
            "model": args.model,
            "data": "mnist iid, one partition per client (num_examples = 60000 // clients)",
            "strategy": f"fedavg, {'a sampled cohort of ' + str(args.cohort) if args.cohort else 'every client'} each round",
            "compute_s": args.compute_s,
            "rounds": args.rounds,
            "transport": "gRPC on 127.0.0.1, " + ("mutual TLS + signed results" if args.tls else "TLS OFF (deploy.insecure)"),
            "heartbeat_interval_s": args.heartbeat_interval,
            "clients": (
                "asyncio load generators: grpc.aio coroutines (Register, heartbeat, long-poll PullTask, PushResult of "
                "a wire-encoded update in 256 KiB chunks, Leave), one channel/TCP connection each"
                if args.async_clients
                else "fedloom.agent.ClientAgent threads in load-generator processes, one gRPC channel/TCP connection each"
            )
            + "; training replaced by a fixed sleep of compute_s returning a fixed delta",
            "open_files_limit": nofile,
            "server_eval": "off between rounds (run.eval_every > rounds)",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "grpcio": grpc.__version__,
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "loadavg_at_start": os.getloadavg(),
        },
        "flower": "Flower's deployment engine on the same machine: flower-superlink, N flower-supernode processes "
        "(each with its flower-superexec and a flwr-clientapp per run), the Flower App in FLOWER_APP (FedAvg over "
        "every node, the same sleep, the same bytes); the ServerApp marks each round's end. Server = SuperLink's "
        "process tree (SuperLink, SuperExec, ServerApp). Configurations that do not fit in memory are not run.",
        "rows": [],
    }
    for n in (int(c) for c in args.clients.split(",")):
        print(f"--- fedloom, {n} clients, {args.rounds} rounds ...", flush=True)
        try:
            row = run_fedloom(n, args)
        except Exception as exc:  # noqa: BLE001 - recorded, the next configuration still runs
            row = {"framework": "fedloom", "clients": n, "error": f"{type(exc).__name__}: {exc}"[-4000:]}
            print(row["error"], file=sys.stderr)
        out["rows"].append(row)
        if "error" not in row:
            print(
                f"    rounds {[r['round_s'] for r in row['per_round']]} s, overhead {row['overhead_s_mean']} s, "
                f"server peak {row['server_peak_rss_mb']} MB, registered in {row['all_registered_s']} s",
                flush=True,
            )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    if args.flower_clients:
        import fedloom.models.registry as models
        from fedloom.core.params import ParamSpec
        from fedloom.data.mnist_federated import MNIST_TASK

        numel = ParamSpec.from_module(models.build_model(args.model, MNIST_TASK)).numel
        for n in (int(c) for c in args.flower_clients.split(",")):
            print(f"--- flower (SuperLink + {n} SuperNodes), {args.rounds} rounds ...", flush=True)
            try:
                row = run_flower(n, args, numel)
            except Exception as exc:  # noqa: BLE001 - recorded
                row = {"framework": "flower", "clients": n, "error": f"{type(exc).__name__}: {exc}"[-4000:]}
            print(f"    {row.get('error') or [r['round_s'] for r in row['per_round']]}", flush=True)
            out["rows"].append(row)
            args.json.write_text(json.dumps(out, indent=2))
    print(_table(out["rows"]))
    if args.md is not None:
        args.md.write_text(_aio_table(out["rows"]) + "\n")


if __name__ == "__main__":
    main()
