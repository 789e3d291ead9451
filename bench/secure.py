"""The cost of secure aggregation: SecAgg, SecAgg+ and CKKS against plain FedAvg, as the cohort grows.

What runs: FedAvg (every client in every round, ``fraction = 1.0``) with the McMahan 2NN
(199,210 float32 parameters, 796,840 bytes per dense update) on MNIST split IID over n
clients, under each protocol of ``[secure]``:

* ``plain`` — no ``[secure]`` section: each client sends its float32 delta;
* ``secagg`` — Bonawitz et al. (CCS 2017), the complete graph: every client agrees keys,
  Shamir-shares its secrets and expands a pairwise mask with each of the n − 1 others;
* ``secagg+`` — Bell et al. (CCS 2020), the same protocol on a random k-regular graph with
  fedloom's default k = 2⌈1.5·log2 n⌉ (10 at n = 10, i.e. the complete graph; 20 at 100;
  30 at 1,000);
* ``ckks`` — homomorphic encryption (TenSEAL, ring degree 8192, 4,096 slots per
  ciphertext): one key holder per round, every client encrypts its levels, the server adds
  ciphertexts, the key holder decrypts the sum.

All three secure protocols use the same encoding: threshold 0.5 (t = ⌊d/2⌋ + 1 of a
client's d neighbours), ``bits = 16`` levels, ``clip = 1``, ``weight_scale`` = the clients'
example count (60,000 / n), SecAgg's masked entries in Z_2^32.

What is and is not counted. Local training is **not** run: it is replaced by a stub that
returns a fixed delta (N(0, 1e-6) entries, drawn once) with the client's example count, so
the numbers are the protocol's cost on a model of this size, not SGD's. Counted on the
client: its client stages (the example weighting FedAvg applies), every protocol message
it answers (``ProtocolClients.handle``: keys, shares, unmasking, CKKS key generation and
decryption) and the sealing of its update (``ProtocolClients.seal``: quantizing, masking or
encrypting). Counted on the server: everything the round loop does outside the clients —
selection, instructions, the protocol's server side (``SecureServer`` construction, setup,
``input_message``, check, add, finish = unmasking / decryption), validation, aggregation,
the weighting stage's finalize and the strategy's apply; server-side test evaluation is
off.

Two modes:

* **simulation** (n = 10, 100, 1,000): the sequential engine, every client in process, one
  thread. CPU is ``time.thread_time()`` around the calls above, *exclusive* of nested
  calls (the server's setup and finish call the clients' ``handle`` through the engine's
  exchange; that time is the client's, not the server's). torch runs single-threaded,
  TenSEAL contexts are single-threaded, so thread CPU is all the CPU. "round s" is the
  round's wall time with every client run one after another on one thread: the sum of all
  clients' work plus the server's, not a deployment's latency.
* **deployment** (n = 10 and 100 by default): the real gRPC server (``engine = "remote"``,
  in this process, insecure loopback, no TLS) and n :class:`fedloom.agent.ClientAgent`
  objects — the real client code path (register, heartbeat, long-poll, wire decode,
  client stages, ``ProtocolClients``, wire encode, push) — as threads in one or two
  load-generator processes, each client with its own gRPC channel and TCP connection,
  training replaced by the same stub. Reported: the clients' protocol CPU (thread CPU of
  ``handle`` / ``seal`` / client stages, as in simulation), each client's thread CPU for
  all the messages it handled (adds the wire decoding and encoding of its tasks and
  results), the load generators' whole process CPU per client per round (adds gRPC's own
  threads, heartbeats and idle long polls), the server process's CPU per round
  (``time.process_time()`` around the round: the loop and the gRPC service's threads) and
  the server's round time (``history`` ``seconds``: the wall time a round takes, every
  client and the server sharing this machine's cores).

Dropout, 10%: in every round d = round(0.1·n) clients, drawn by the round's seed, leave at
fixed points: ⌈d/2⌉ after they sent their keys and shares and before their masked input
(SecAgg: the server reconstructs their mask keys from the survivors' shares and removes
their pairwise masks — the recovery path of the protocol), ⌊d/2⌋ after their masked
input and before unmasking (their input counts; the server needs t shares of each
survivor's self-mask seed from the others). Under CKKS the first group does not send its
ciphertexts (no recovery needed); the second has nothing left to do (only the key holder
acts after the input); the round's key holder is never made to drop (its loss aborts the
round). Under plain FedAvg the first group sends no update. In simulation this is
``engine.protocol_clients.drop``; in deployment the same function is the agents'
``ProtocolClients.drop`` — a dropping client answers the server's message with a failure
right away, so the server counts it out without waiting for a timeout.

Reported per row: client CPU per client per round (mean over the clients that completed
every stage, max over all, the key holder included), server CPU per round, bytes per
client per round up and down (the tensors as encoded, the protocol's own messages
included: ``ProtocolMessage.nbytes`` / ``ClientUpdate.nbytes``; in deployment also the
protobuf messages with their framing), the expansion of the uplink against the float32
update (4 bytes per parameter) and against Bonawitz et al.'s baseline, the same 16-bit
inputs sent in the clear (2 bytes per parameter: they report 1.73x for 2^10 clients and
2^20 entries, 1.98x for 2^14 and 2^24), the downlink against the float32 model, and the
round time.

A row whose projected time (from the same protocol's largest smaller row, scaled by n^2.5 for
SecAgg's complete graph, n·log n for SecAgg+, n otherwise) exceeds ``--max-row-s`` is not
run: it is recorded as skipped, with the projection and the reason (``--max-row-s 0`` runs
everything). The machine is shared with other work: CPU seconds are steadier than wall
seconds.

Usage:
    python bench/secure.py --json bench/results/secure_cpu.json \\
        [--protocols plain,secagg,secagg+,ckks] [--sizes 10,100,1000] [--deploy-sizes 10,100] \\
        [--rounds 10=3,100=2,1000=1] [--deploy-rounds 2] [--dropout 0.1] [--max-row-s 600]

``--sizes ''`` or ``--deploy-sizes ''`` skips a mode. Writes the JSON (and a Markdown table
beside it) after every row; rows already in the JSON are kept unless run again.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = "2nn"
TRAIN_EXAMPLES = 60_000
FLOAT32 = 4
CLEAR_BITS = 16  # Bonawitz et al.'s inputs in the clear, and the levels every protocol here quantizes to
PROTOCOLS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "secagg": {"protocol": "secagg"},
    "secagg+": {"protocol": "secagg+"},
    "ckks": {"protocol": "ckks"},
}
SCALING = {"secagg": 2.5, "secagg+": 1.0, "ckks": 1.0, "plain": 1.0}
"""Exponent of n in a round's total work, for the projection that skips rows: SecAgg lies between n²
(n clients × n − 1 masks and key agreements) and n³ (Shamir sharing with t ≈ n/2 in Python integers)."""
SIM_ROUNDS = {10: 3, 100: 2, 1000: 1}


# ---------------------------------------------------------------------------- measuring
class Meter:
    """Exclusive thread CPU per bucket: a wrapped call's time minus that of the wrapped calls it makes."""

    def __init__(self) -> None:
        self.cpu: dict[tuple[Any, ...], float] = defaultdict(float)
        self.bytes: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])  # (client, round) -> [up, down]
        self.round = 0  # the server's current round (set by the driver)
        self._local = threading.local()
        self._lock = threading.Lock()

    @property
    def _stack(self) -> list[list[float]]:
        s = getattr(self._local, "stack", None)
        if s is None:
            s = self._local.stack = []
        return s

    @property
    def thread_round(self) -> int | None:
        return getattr(self._local, "round", None)

    @thread_round.setter
    def thread_round(self, rnd: int | None) -> None:
        self._local.round = rnd

    def wrap(self, fn: Callable[..., Any], bucket: Callable[[tuple[Any, ...], Any], tuple[Any, ...]],
             after: Callable[[tuple[Any, ...], Any], None] | None = None) -> Callable[..., Any]:  # fmt: skip
        """``fn`` timed; ``bucket(args, result)`` names where its exclusive time goes (evaluated after the call)."""

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            stack = self._stack
            frame = [0.0]
            stack.append(frame)
            t0 = time.thread_time()
            result = None
            try:
                result = fn(*args, **kwargs)
                return result
            finally:
                elapsed = time.thread_time() - t0
                stack.pop()
                if stack:
                    stack[-1][0] += elapsed
                key = bucket(args, result)
                with self._lock:
                    self.cpu[key] += elapsed - frame[0]
                    if after is not None:
                        after(args, result)

        return timed

    def add_bytes(self, cid: str, rnd: int, up: int = 0, down: int = 0) -> None:
        b = self.bytes[(cid, rnd)]
        b[0] += up
        b[1] += down


_MISSING = object()


class Patches:
    """Attribute replacements, undone in reverse order."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        self._undo.append((obj, name, vars(obj).get(name, _MISSING)))
        setattr(obj, name, value)

    def undo(self) -> None:
        while self._undo:
            obj, name, old = self._undo.pop()
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def fixed_delta(numel: int, seed: int = 0) -> torch.Tensor:
    """The update every client "trains": N(0, 1e-6) entries, drawn once."""
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed)) * 1e-3


def make_fake_train(delta: torch.Tensor, meter: Meter, drops: Dropouts | None = None, *, count_task: bool = False) -> Callable[..., Any]:
    """A stand-in for ``train_local``: the fixed delta with the client's example count (no SGD).

    With ``drops`` (deployed plain FedAvg), a client of the round's first dropout group
    fails its task instead, as a client that leaves before uploading. ``count_task``
    (deployed clients): count the task's model and instruction tensors as the client's downlink.
    """
    from fedloom.client.training import finish_local

    def fake_train(model: Any, spec: Any, global_vec: torch.Tensor, data: Any, instruction: Any, *, client_state: Any = None) -> Any:
        meter.thread_round = instruction.round
        if count_task:
            down = global_vec.numel() * global_vec.element_size() + sum(t.numel() * t.element_size() for t in instruction.payload.values())
            down += instruction.protocol.nbytes if instruction.protocol is not None else 0
            meter.add_bytes(instruction.client_id, instruction.round, down=down)
        if drops is not None and drops(instruction.round, instruction.client_id, "input"):
            raise RuntimeError("bench: simulated dropout before the upload")
        n = len(data)
        return finish_local(spec, instruction, delta.to(global_vec.dtype).clone(), num_examples=n, num_steps=1,
                            loss_sum=0.0, seen=n, client_state=client_state)  # fmt: skip

    return meter.wrap(fake_train, lambda a, r: ("train",))


class Dropouts:
    """``drop(round, client, stage)``: exactly round(rate·n) clients per round leave, half before their input, half after it."""

    def __init__(self, client_ids: Sequence[str], rate: float, seed: int) -> None:
        self.ids = sorted(client_ids)
        self.rate = rate
        self.seed = seed
        self.key_holders: set[tuple[int, str]] = set()
        self.dropped: list[tuple[int, str, str]] = []
        self._plans: dict[int, tuple[set[str], set[str]]] = {}
        self._lock = threading.Lock()

    def plan(self, rnd: int) -> tuple[set[str], set[str]]:
        """(leave before the input, leave after the input) for round ``rnd``."""
        if rnd not in self._plans:
            n = len(self.ids)
            d = round(self.rate * n)
            order = np.random.default_rng([self.seed, rnd]).permutation(n)
            early = {self.ids[i] for i in order[: math.ceil(d / 2)]}
            late = {self.ids[i] for i in order[math.ceil(d / 2) : d]}
            self._plans[rnd] = (early, late)
        return self._plans[rnd]

    def __call__(self, rnd: int, cid: str, stage: str) -> bool:
        with self._lock:
            if stage == "keys":  # CKKS: the round's key holder; never dropped (it would abort the round)
                self.key_holders.add((rnd, cid))
                return False
            early, late = self.plan(rnd)
            out = (stage == "input" and cid in early and (rnd, cid) not in self.key_holders) or (stage == "unmask" and cid in late)
            if out:
                self.dropped.append((rnd, cid, stage))
            return out


def instrument(meter: Meter, patches: Patches, *, seal_bytes: bool = False) -> None:
    """Wrap the client and server sides of every protocol (and the round) with the meter.

    ``seal_bytes`` (deployed clients): count a sealed update as the client's uplink (in
    simulation the engine's ``finish_clients`` counts every update leaving a client).
    """
    from fedloom.engines.base import Engine
    from fedloom.federation.loop import Federation
    from fedloom.secure.ckks import CkksConfig, CkksServer
    from fedloom.secure.host import ProtocolClients
    from fedloom.secure.secagg import SecAggConfig, SecAggServer

    def handle_bucket(a: tuple[Any, ...], r: Any) -> tuple[Any, ...]:
        msg = a[1]
        return ("client", msg.client_id, msg.round)

    def handle_bytes(a: tuple[Any, ...], r: Any) -> None:
        msg = a[1]
        meter.add_bytes(msg.client_id, msg.round, up=r.nbytes if r is not None else 0, down=msg.nbytes)

    def handle_enter(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(self: Any, msg: Any) -> Any:
            meter.thread_round = msg.round
            return fn(self, msg)

        return inner

    patches.set(ProtocolClients, "handle", meter.wrap(handle_enter(ProtocolClients.handle), handle_bucket, handle_bytes))
    def seal_enter(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(self: Any, instruction: Any, update: Any) -> Any:
            meter.thread_round = instruction.round
            return fn(self, instruction, update)

        return inner

    def sealed_bytes(a: tuple[Any, ...], r: Any) -> None:
        if seal_bytes and r is not None:
            meter.add_bytes(r.client_id, r.round, up=r.nbytes)

    seal_bucket = lambda a, r: ("client", a[1].client_id, a[1].round)  # noqa: E731
    patches.set(ProtocolClients, "seal", meter.wrap(seal_enter(ProtocolClients.seal), seal_bucket, sealed_bytes))

    def finish_bucket(a: tuple[Any, ...], r: Any) -> tuple[Any, ...]:
        ins = a[1]
        return ("client", ins[0].client_id, ins[0].round) if len(ins) == 1 else ("client-batch",)

    def finish_bytes(a: tuple[Any, ...], r: Any) -> None:
        for up in r:
            meter.add_bytes(up.client_id, up.round, up=up.nbytes)

    patches.set(Engine, "finish_clients", meter.wrap(Engine.finish_clients, finish_bucket, finish_bytes))
    patches.set(Federation, "step", meter.wrap(Federation.step, lambda a, r: ("server", meter.round, "loop")))
    for cls in (SecAggServer, CkksServer):
        for name in ("setup", "input_message", "check", "add", "finish"):
            patches.set(cls, name, meter.wrap(cls.__dict__[name], lambda a, r, name=name: ("server", meter.round, name)))
    for cfg in (SecAggConfig, CkksConfig):
        patches.set(cfg, "server", meter.wrap(cfg.__dict__["server"], lambda a, r: ("server", meter.round, "init")))


def count_down(engine: Any, meter: Meter, patches: Patches, drops: Dropouts | None) -> None:
    """Count each instructed client's downlink (the model and its instruction's tensors), as the round loop does.

    With ``drops`` (plain FedAvg in simulation), clients of the round's first dropout group
    get their task and send nothing back.
    """
    run_cohort = engine.run_cohort

    def counted(global_vec: torch.Tensor, instructions: Sequence[Any], **kw: Any) -> Iterator[Any]:
        broadcast = kw.get("broadcast")
        model = broadcast.nbytes if broadcast is not None else global_vec.numel() * global_vec.element_size()
        for ins in instructions:
            extra = sum(t.numel() * t.element_size() for t in ins.payload.values())
            meter.add_bytes(ins.client_id, ins.round, down=model + extra + (ins.protocol.nbytes if ins.protocol is not None else 0))
        if drops is not None:
            instructions = [ins for ins in instructions if not drops(ins.round, ins.client_id, "input")]
        return run_cohort(global_vec, instructions, **kw)

    patches.set(engine, "run_cohort", counted)


# ---------------------------------------------------------------------------- configs
def config(protocol: str, n: int, seed: int, *, deploy: dict[str, Any] | None = None) -> Any:
    from fedloom.core.config import parse_config

    data: dict[str, Any] = {
        "run": {"name": f"secure-{protocol}-{n}", "seed": seed, "rounds": 100, "engine": "sequential", "eval_every": 10**6},
        "data": {"name": "mnist", "partition": "iid", "num_clients": n},
        "model": {"name": MODEL},
        "strategy": {"name": "fedavg", "fraction": 1.0},
        "client": {"epochs": 1, "batch_size": 10, "lr": 0.1},
    }
    sec = PROTOCOLS[protocol]
    if sec is not None:
        data["secure"] = {**sec, "bits": CLEAR_BITS, "clip": 1.0, "weight_scale": float(TRAIN_EXAMPLES // n)}
    if deploy is not None:
        data["deploy"] = deploy
    return parse_config(data)


def degree(protocol: str, n: int) -> int | None:
    if protocol == "secagg":
        return n - 1
    if protocol == "secagg+":
        k = 2 * math.ceil(1.5 * math.log2(max(n, 2)))
        return n - 1 if k >= n - 1 else k
    return None


def threshold(protocol: str, n: int) -> int | None:
    k = degree(protocol, n)
    return None if k is None else min(k, math.floor(0.5 * k) + 1)



def _row_head(mode: str, protocol: str, n: int, records: list[Any]) -> dict[str, Any]:
    """The fields every row starts with: what ran, and how each round ended."""
    return {
        "mode": mode,
        "protocol": protocol,
        "clients": n,
        "neighbours_k": degree(protocol, n),
        "threshold_t": threshold(protocol, n),
        "rounds": len(records),
        "status": [r.status for r in records],
        "reasons": [r.reason for r in records if r.reason],
    }

def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "max": None, "min": None}
    return {"mean": float(np.mean(values)), "max": float(np.max(values)), "min": float(np.min(values))}


def _expansion(row: dict[str, Any], numel: int) -> None:
    up, down = row["bytes_up_per_client"]["mean"], row["bytes_down_per_client"]["mean"]
    row["expansion"] = {
        "up_vs_float32": up / (FLOAT32 * numel) if up is not None else None,
        "up_vs_16bit_clear": up / (CLEAR_BITS / 8 * numel) if up is not None else None,
        "down_vs_float32_model": down / (FLOAT32 * numel) if down is not None else None,
        "up_max_vs_float32": row["bytes_up_per_client"]["max"] / (FLOAT32 * numel) if up is not None else None,
    }


# ---------------------------------------------------------------------------- simulation
def sim_row(protocol: str, n: int, rounds: int, seed: int, rate: float) -> dict[str, Any]:
    import fedloom.engines.sequential as sequential
    from fedloom.run import build_run

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    run = build_run(config(protocol, n, seed), engine="sequential")
    setup_s = time.perf_counter() - t_start
    numel = run.spec.numel
    meter, patches = Meter(), Patches()
    drops = Dropouts(run.dataset.client_ids, rate, seed)
    try:
        instrument(meter, patches)
        patches.set(sequential, "train_local", make_fake_train(fixed_delta(numel, seed), meter))
        if protocol == "plain":
            count_down(run.engine, meter, patches, drops)
        else:
            count_down(run.engine, meter, patches, None)
            run.engine.protocol_clients.drop = drops
        records = []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for rnd in range(1, rounds + 1):
            meter.round = rnd
            rec = run.federation.step()
            records.append(rec)
            print(f"  sim {protocol:8s} n={n:5d} round {rnd}: {rec.status} {len(rec.clients)} summed, {rec.seconds:.1f} s", flush=True)
        process_cpu = time.process_time() - cpu0
        wall = time.perf_counter() - wall0
    finally:
        patches.undo()
        run.engine.close()
    row = _summarize(protocol, n, records, meter, drops, numel, mode="simulation")
    measured = sum(meter.cpu.values())
    row.update(
        setup_s=setup_s,
        wall_s=wall,
        process_cpu_s=process_cpu,
        metered_cpu_s=measured,
        unmetered_cpu_s=process_cpu - measured,  # the rest of the process's CPU (should be small: dataset, GC)
        train_stub_cpu_s=meter.cpu.get(("train",), 0.0),
    )
    _check_bytes(row, records, meter)
    return row


def _check_bytes(row: dict[str, Any], records: Sequence[Any], meter: Meter) -> None:
    """The per-client bytes add up to what the round loop recorded (a consistency check, recorded)."""
    up = sum(b[0] for b in meter.bytes.values())
    down = sum(b[1] for b in meter.bytes.values())
    row["bytes_check"] = {
        "clients_up": up,
        "loop_up": sum(r.bytes_up for r in records),
        "clients_down": down,
        "loop_down": sum(r.bytes_down for r in records),
    }


def _summarize(protocol: str, n: int, records: Sequence[Any], meter: Meter, drops: Dropouts, numel: int, *, mode: str) -> dict[str, Any]:
    rounds = [r.round for r in records]
    full_cpu, all_cpu, full_up, full_down, all_up, all_down = [], [], [], [], [], []
    dropped = {(r, c) for r, c, _ in drops.dropped}
    per_round_drops = []
    for rnd in rounds:
        early, late = drops.plan(rnd)
        per_round_drops.append(sum(1 for r, _ in dropped if r == rnd))
        for cid in drops.ids:
            cpu = meter.cpu.get(("client", cid, rnd), 0.0)
            up, down = meter.bytes.get((cid, rnd), [0, 0])
            all_cpu.append(cpu)
            all_up.append(up)
            all_down.append(down)
            if (rnd, cid) not in dropped:
                full_cpu.append(cpu)
                full_up.append(up)
                full_down.append(down)
    server: dict[int, float] = defaultdict(float)
    parts: dict[str, float] = defaultdict(float)
    for key, v in meter.cpu.items():
        if key[0] == "server":
            server[key[1]] += v
            parts[key[2]] += v / len(rounds)
    row: dict[str, Any] = {
        **_row_head(mode, protocol, n, records),
        "summed_per_round": [len(r.clients) for r in records],
        "dropped_per_round": per_round_drops,
        "dropout_plan": {"rate": drops.rate, "before_input": math.ceil(round(drops.rate * n) / 2), "after_input": round(drops.rate * n) // 2},
        "client_cpu_s": {"mean": _stats(full_cpu)["mean"], "max": _stats(all_cpu)["max"], "mean_all": _stats(all_cpu)["mean"]},
        "server_cpu_s": _stats([server[r] for r in rounds]),
        "server_cpu_parts_s": dict(parts),
        "bytes_up_per_client": {"mean": _stats(full_up)["mean"], "max": _stats(all_up)["max"]},
        "bytes_down_per_client": {"mean": _stats(full_down)["mean"], "max": _stats(all_down)["max"]},
        "round_s": _stats([r.seconds for r in records]),
        "loop_bytes_up_per_round": sum(r.bytes_up for r in records) / len(records),
        "loop_bytes_down_per_round": sum(r.bytes_down for r in records) / len(records),
        "numel": numel,
    }
    _expansion(row, numel)
    return row


# ---------------------------------------------------------------------------- deployment
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deploy_row(protocol: str, n: int, rounds: int, seed: int, rate: float, loadgens: int, workdir: Path) -> dict[str, Any]:
    """The real gRPC server in this process, n ClientAgents in ``loadgens`` subprocesses."""
    from fedloom.data.mnist_federated import client_id
    from fedloom.run import build_run

    torch.set_num_threads(1)
    deploy = {
        "address": "127.0.0.1:0", "insecure": True, "min_clients": n, "wait_timeout": 600, "round_timeout": 600,
        "round_retries": 0, "heartbeat_interval": 2.0, "heartbeat_timeout": 120.0, "max_pull_wait": 5.0,
        "max_workers": 2 * n + 64,
    }  # fmt: skip
    t_start = time.perf_counter()
    run = build_run(config(protocol, n, seed, deploy=deploy), engine="remote")
    numel = run.spec.numel
    port = run.engine.port  # type: ignore[attr-defined]
    ids = [client_id(i, n) for i in range(n)]
    meter, patches = Meter(), Patches()
    instrument(meter, patches)
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    bounds = [round(i * n / loadgens) for i in range(loadgens + 1)]
    import fedloom

    src = str(Path(fedloom.__file__).resolve().parents[1])  # the load generators import the fedloom this process runs
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": src}
    records, server_cpu = [], []
    try:
        for g in range(loadgens):
            spec = {
                "server": f"127.0.0.1:{port}", "protocol": protocol, "n": n, "lo": bounds[g], "hi": bounds[g + 1],
                "seed": seed, "rate": rate, "examples": TRAIN_EXAMPLES // n, "out": str(workdir / f"loadgen{g}.json"),
            }  # fmt: skip
            spec_path = workdir / f"loadgen{g}.spec.json"
            spec_path.write_text(json.dumps(spec))
            log = workdir / f"loadgen{g}.log"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--json", "-", "--_loadgen", str(spec_path)]
            procs.append((subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env), spec_path, log))
        live = run.engine.coordinator.wait_for_clients(n, 600)  # type: ignore[attr-defined]
        registered_s = time.perf_counter() - t_start
        if len(live) < n:
            raise RuntimeError(f"only {len(live)} of {n} clients registered: " + _tail(procs))
        for rnd in range(1, rounds + 1):
            meter.round = rnd
            c0 = time.process_time()
            rec = run.federation.step()
            server_cpu.append(time.process_time() - c0)
            records.append(rec)
            print(f"  deploy {protocol:8s} n={n:4d} round {rnd}: {rec.status} {len(rec.clients)} summed, {rec.seconds:.1f} s", flush=True)
    finally:
        patches.undo()
        run.engine.close()
        gens = []
        for p, _, _ in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for g, (p, _, log) in enumerate(procs):
            out = workdir / f"loadgen{g}.json"
            if out.exists():
                gens.append(json.loads(out.read_text()))
            else:
                print(f"loadgen {g} wrote no results (exit {p.returncode}):\n{log.read_text(errors='replace')[-3000:]}", file=sys.stderr)
    return _summarize_deploy(protocol, n, records, server_cpu, meter, gens, ids, seed, rate, numel, registered_s=registered_s, loadgens=loadgens)


def _tail(procs: Sequence[tuple[Any, Path, Path]]) -> str:
    return "\n".join(log.read_text(errors="replace")[-2000:] for _, _, log in procs)


def _summarize_deploy(protocol: str, n: int, records: Sequence[Any], server_cpu: Sequence[float], meter: Meter, gens: Sequence[dict[str, Any]],
                      ids: Sequence[str], seed: int, rate: float, numel: int, *, registered_s: float, loadgens: int) -> dict[str, Any]:  # fmt: skip
    rounds = [r.round for r in records]
    clients: dict[str, dict[str, Any]] = {}
    dropped: set[tuple[int, str]] = set()
    for g in gens:
        clients.update(g["clients"])
        dropped |= {(r, c) for r, c, _ in g["dropped"]}
    full_proto, all_proto, full_thread, all_thread = [], [], [], []
    full_up, full_down, all_up, all_down, wire_up, wire_down = [], [], [], [], [], []
    for cid in ids:
        c = clients.get(cid)
        if c is None:
            continue
        for rnd in rounds:
            p = c["protocol_cpu"].get(str(rnd), 0.0)
            t = p + c["serve_cpu"].get(str(rnd), 0.0)
            up, down = c["bytes"].get(str(rnd), [0, 0])
            all_proto.append(p)
            all_thread.append(t)
            all_up.append(up)
            all_down.append(down)
            if (rnd, cid) not in dropped:
                full_proto.append(p)
                full_thread.append(t)
                full_up.append(up)
                full_down.append(down)
        r = c["report"]
        if not any((rnd, cid) in dropped for rnd in rounds):  # the agent's counters are cumulative: clients that never dropped
            wire_up.append(r["wire_bytes_up"] / max(1, len(rounds)))
            wire_down.append(r["wire_bytes_down"] / max(1, len(rounds)))
    gen_cpu = sum(g["process_cpu_s"] for g in gens)
    row: dict[str, Any] = {
        **_row_head("deployment", protocol, n, records),
        "summed_per_round": [len(r.clients) for r in records],
        "dropped_per_round": [sum(1 for r, _ in dropped if r == rnd) for rnd in rounds],
        "dropout_plan": {"rate": rate, "before_input": math.ceil(round(rate * n) / 2), "after_input": round(rate * n) // 2},
        "client_cpu_s": {"mean": _stats(full_proto)["mean"], "max": _stats(all_proto)["max"], "mean_all": _stats(all_proto)["mean"]},
        "client_thread_cpu_s": {"mean": _stats(full_thread)["mean"], "max": _stats(all_thread)["max"]},
        "loadgen_cpu_s_per_client_round": gen_cpu / (n * max(1, len(rounds))),
        "loadgen_cpu_s": gen_cpu,
        "server_cpu_s": _stats(list(server_cpu)),
        "server_cpu_parts_s": _server_parts(meter, len(rounds)),
        "bytes_up_per_client": {"mean": _stats(full_up)["mean"], "max": _stats(all_up)["max"]},
        "bytes_down_per_client": {"mean": _stats(full_down)["mean"], "max": _stats(all_down)["max"]},
        "wire_bytes_up_per_client": _stats(wire_up),
        "wire_bytes_down_per_client": _stats(wire_down),
        "round_s": _stats([r.seconds for r in records]),
        "loop_bytes_up_per_round": sum(r.bytes_up for r in records) / max(1, len(records)),
        "loop_bytes_down_per_round": sum(r.bytes_down for r in records) / max(1, len(records)),
        "registered_s": registered_s,
        "loadgens": loadgens,
        "agent_errors": [c["error"] for c in clients.values() if c.get("error")][:5],
        "agent_refused": sum(len(c["report"]["refused"]) for c in clients.values()),
        "agent_reconnects": sum(c["report"]["reconnects"] for c in clients.values()),
        "clients_reporting": len(clients),
        "numel": numel,
    }
    row["bytes_check"] = {
        "clients_up": sum(sum(b[0] for b in c["bytes"].values()) for c in clients.values()),
        "loop_up": sum(r.bytes_up for r in records),
        "clients_down": sum(sum(b[1] for b in c["bytes"].values()) for c in clients.values()),
        "loop_down": sum(r.bytes_down for r in records),
    }
    _expansion(row, numel)
    return row


def _server_parts(meter: Meter, rounds: int) -> dict[str, float]:
    parts: dict[str, float] = defaultdict(float)
    for key, v in meter.cpu.items():
        if key[0] == "server":
            parts[key[2]] += v / max(1, rounds)
    return dict(parts)


def loadgen(spec_path: Path) -> None:
    """A load-generator process: ClientAgents ``lo..hi`` of n as threads, until the server ends the run."""
    import logging

    import fedloom.agent.agent as agent_module
    from fedloom.agent import AgentOptions, ClientAgent
    from fedloom.core.params import ParamSpec
    from fedloom.data.mnist_federated import MNIST_TASK, client_id
    from fedloom.models.registry import build_model

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(created).3f %(levelname)s %(name)s: %(message)s")
    spec = json.loads(spec_path.read_text())
    n, protocol = spec["n"], spec["protocol"]
    ids = [client_id(i, n) for i in range(n)]
    drops = Dropouts(ids, spec["rate"], spec["seed"])
    model = build_model(MODEL, MNIST_TASK)  # one module shared by the agents: only its layout is used
    pspec = ParamSpec.from_module(model)
    meter, patches = Meter(), Patches()
    instrument(meter, patches, seal_bytes=True)
    fake = make_fake_train(fixed_delta(pspec.numel, spec["seed"]), meter, drops if protocol == "plain" else None, count_task=True)
    patches.set(agent_module, "train_local", fake)

    def finish_bucket(a: tuple[Any, ...], r: Any) -> tuple[Any, ...]:
        return ("client", a[1][0].client_id, a[1][0].round)

    def plain_bytes(a: tuple[Any, ...], r: Any) -> None:
        for ins, up in zip(a[1], r[0], strict=True):
            if ins.protocol is None:  # a sealed update is counted by seal
                meter.add_bytes(up.client_id, up.round, up=up.nbytes)

    patches.set(agent_module, "finish_clients", meter.wrap(agent_module.finish_clients, finish_bucket, plain_bytes))

    class BenchAgent(ClientAgent):
        """A ClientAgent with its own TCP connection (not one shared by the process's channels)."""

        def _open_channel(self, *extra: tuple[str, Any]) -> Any:
            if not any(k == "grpc.use_local_subchannel_pool" for k, _ in extra):
                extra = (*extra, ("grpc.use_local_subchannel_pool", 1))
            return super()._open_channel(*extra)

    def serve_bucket(a: tuple[Any, ...], r: Any) -> tuple[Any, ...]:
        rnd = meter.thread_round
        meter.thread_round = None
        return ("serve", a[0].client_id, rnd)

    patches.set(BenchAgent, "_serve_one", meter.wrap(ClientAgent._serve_one, serve_bucket))
    agents = []
    for i in range(spec["lo"], spec["hi"]):
        data = SimpleNamespace(num_examples=spec["examples"], test=None, train=range(spec["examples"]))
        a = BenchAgent(data, AgentOptions(server=spec["server"], client_id=ids[i], pull_wait=5.0, give_up_after=600))  # type: ignore[arg-type]
        a._model, a._spec, a._task = model, pspec, MNIST_TASK  # skip building a model per client
        a._protocols.drop = drops
        agents.append(a)
    errors: dict[str, str] = {}

    def serve(a: Any) -> None:
        try:
            a.run()
        except Exception as exc:  # noqa: BLE001 - recorded in the results
            errors[a.client_id] = f"{type(exc).__name__}: {exc}"

    c0 = time.process_time()
    threads = [threading.Thread(target=serve, args=(a,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu = time.process_time() - c0
    clients: dict[str, Any] = {}
    for a in agents:
        cid = a.client_id
        proto: dict[str, float] = defaultdict(float)
        serve_cpu: dict[str, float] = defaultdict(float)
        for key, v in meter.cpu.items():
            if key[0] == "client" and key[1] == cid:
                proto[str(key[2])] += v
            elif key[0] == "serve" and key[1] == cid:
                serve_cpu[str(key[2])] += v
        by_round: dict[str, list[int]] = {}
        for (c, rnd), b in meter.bytes.items():
            if c == cid:
                by_round[str(rnd)] = list(b)
        r = a.report
        clients[cid] = {
            "protocol_cpu": proto,
            "serve_cpu": serve_cpu,
            "bytes": by_round,
            "report": {"tasks": r.tasks, "refused": r.refused, "reconnects": r.reconnects, "bytes_up": r.bytes_up,
                       "bytes_down": r.bytes_down, "wire_bytes_up": r.wire_bytes_up, "wire_bytes_down": r.wire_bytes_down},  # fmt: skip
            "error": errors.get(cid, ""),
        }
    ru = resource.getrusage(resource.RUSAGE_SELF)
    Path(spec["out"]).write_text(json.dumps({
        "clients": clients, "dropped": drops.dropped, "process_cpu_s": cpu, "maxrss_mb": ru.ru_maxrss / 1024,
        "train_stub_cpu_s": meter.cpu.get(("train",), 0.0),
    }))  # fmt: skip


# ---------------------------------------------------------------------------- rows, tables
def _fmt(v: Any, spec: str = ".3f") -> str:
    return "" if v is None else format(v, spec)


def _kb(v: Any) -> str:
    return "" if v is None else f"{v / 1e3:,.0f}"


def markdown(out: dict[str, Any]) -> str:
    lines = [
        f"McMahan {MODEL} (199,210 float32 parameters), FedAvg with every client in every round, local training stubbed out, "
        f"{out.get('dropout_rate', 0.1):.0%} dropout per round (half before, half after the masked input). CPU seconds per client "
        "per round and per server round, bytes per client per round; k, t: SecAgg neighbours and threshold. Machine, commit "
        "and commands in the JSON; what is counted in bench/secure.py's docstring. The machine's 2 cores were shared with "
        "other work: compare CPU seconds, not round seconds.",
        "",
        "| mode | protocol | n | k | t | rounds | dropped/round (summed) | client CPU s mean | client CPU s max | "
        "server CPU s/round | up kB/client | down kB/client | up x f32 | up x 16-bit | down x f32 | round s |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    rows = sorted(out["rows"].values(), key=lambda r: (r["mode"] != "simulation", order.get(r["protocol"], 9), r["clients"]))
    skipped = []
    for r in rows:
        if r.get("skipped"):
            skipped.append(f"- {r['mode']} {r['protocol']} n={r['clients']}: not run — {r['skipped']}")
            continue
        x = r["expansion"]
        drops = ", ".join(f"{d} ({s})" for d, s in zip(r["dropped_per_round"], r["summed_per_round"], strict=True))
        bad = [s for s in r["status"] if s != "ok"]
        lines.append(
            f"| {r['mode']} | {r['protocol']} | {r['clients']:,} | {r['neighbours_k'] if r['neighbours_k'] is not None else ''} | "
            f"{r['threshold_t'] if r['threshold_t'] is not None else ''} | {r['rounds']}{' (' + ','.join(bad) + ')' if bad else ''} | "
            f"{drops} | {_fmt(r['client_cpu_s']['mean'], '.4f')} | {_fmt(r['client_cpu_s']['max'], '.4f')} | "
            f"{_fmt(r['server_cpu_s']['mean'], '.3f')} | {_kb(r['bytes_up_per_client']['mean'])} | {_kb(r['bytes_down_per_client']['mean'])} | "
            f"{_fmt(x['up_vs_float32'], '.2f')} | {_fmt(x['up_vs_16bit_clear'], '.2f')} | {_fmt(x['down_vs_float32_model'], '.2f')} | "
            f"{_fmt(r['round_s']['mean'], '.1f')} |"
        )
    dep = [r for r in rows if r["mode"] == "deployment" and not r.get("skipped")]
    if dep:
        lines += [
            "",
            "Deployment, per client per round: protocol CPU (as above), the client thread's CPU for every message "
            "(adds wire decode/encode), the load generators' process CPU (adds gRPC threads, heartbeats, idle polls), "
            "protobuf bytes with framing.",
            "",
            "| protocol | n | protocol CPU s | thread CPU s (mean / max) | process CPU s | wire up kB | wire down kB | server CPU s/round | round s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in dep:
            lines.append(
                f"| {r['protocol']} | {r['clients']} | {_fmt(r['client_cpu_s']['mean'], '.4f')} | "
                f"{_fmt(r['client_thread_cpu_s']['mean'], '.4f')} / {_fmt(r['client_thread_cpu_s']['max'], '.4f')} | "
                f"{_fmt(r['loadgen_cpu_s_per_client_round'], '.4f')} | {_kb(r['wire_bytes_up_per_client']['mean'])} | "
                f"{_kb(r['wire_bytes_down_per_client']['mean'])} | {_fmt(r['server_cpu_s']['mean'], '.3f')} | {_fmt(r['round_s']['mean'], '.1f')} |"
            )
    sim = [r for r in rows if r["mode"] == "simulation" and not r.get("skipped")]
    sizes = sorted({r["clients"] for r in sim})
    if len(sizes) > 1:
        lines += [
            "",
            "Growth with n (simulation): client CPU s per client per round / server CPU s per round / uplink kB per client.",
            "",
            "| protocol | " + " | ".join(f"n = {n:,}" for n in sizes) + " |",
            "|---|" + "---:|" * len(sizes),
        ]
        for p in PROTOCOLS:
            by_n = {r["clients"]: r for r in sim if r["protocol"] == p}
            if not by_n:
                continue
            cells = []
            for n in sizes:
                r = by_n.get(n)
                cells.append("" if r is None else f"{_fmt(r['client_cpu_s']['mean'], '.4f')} / {_fmt(r['server_cpu_s']['mean'], '.2f')} / "
                             f"{_kb(r['bytes_up_per_client']['mean'])}")  # fmt: skip
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", *skipped]
    return "\n".join(lines) + "\n"


def project(out: dict[str, Any], mode: str, protocol: str, n: int, rounds: int) -> tuple[float, str] | None:
    """Projected wall seconds of a row from the same protocol's largest smaller measured row, or None."""
    prior = [r for r in out["rows"].values() if r["mode"] == mode and r["protocol"] == protocol and not r.get("skipped") and r["clients"] < n]
    if not prior:
        return None
    p = max(prior, key=lambda r: r["clients"])
    per_round = p["round_s"]["mean"]
    ratio = n / p["clients"]
    scale = ratio ** SCALING[protocol]
    if protocol == "secagg+":
        scale *= math.log2(n) / math.log2(p["clients"])
    return per_round * scale * rounds, f"the n={p['clients']} row's {per_round:.1f} s/round × {scale:.0f} × {rounds} round(s)"


def machine() -> dict[str, Any]:
    import fedloom

    src = Path(fedloom.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if src != ROOT / "src":  # a snapshot of the sources (e.g. `git archive HEAD src`), with its commit in COMMIT beside it
        stamp = src.parent / "COMMIT"
        commit = stamp.read_text().strip() if stamp.exists() else f"unknown (fedloom imported from {src})"
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": 1,
        "fedloom": fedloom.__version__,
        "commit": commit,
        "fedloom_path": str(src),
        "shared": "the machine's 2 cores are shared with other work (other processes ran during the measurement); CPU seconds are steadier than wall seconds",
    }
    for mod in ("tenseal", "cryptography", "grpc", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            info[mod] = None
    try:
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, type=str)
    ap.add_argument("--protocols", default=",".join(PROTOCOLS))
    ap.add_argument("--sizes", default="10,100,1000", help="clients per round in simulation ('' for none)")
    ap.add_argument("--deploy-sizes", default="10,100", help="clients per round over gRPC ('' for none)")
    ap.add_argument("--rounds", default="", help="simulation rounds per size, e.g. 10=3,100=2,1000=1 (default)")
    ap.add_argument("--deploy-rounds", type=int, default=2)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loadgens", type=int, default=0, help="load-generator processes (default: 1 below 50 clients, else 2)")
    ap.add_argument("--max-row-s", type=float, default=600.0, help="skip a row projected to take longer (0: no limit)")
    ap.add_argument("--_loadgen", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._loadgen:
        loadgen(Path(args._loadgen))
        return
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    out["benchmark"] = "secure"
    out["dropout_rate"] = args.dropout
    out["setting"] = {
        "model": f"McMahan {MODEL} (199,210 float32 parameters)",
        "data": "MNIST IID, 60,000 / n examples per client (only the example counts matter: training is a stub)",
        "strategy": "fedavg, fraction 1.0 (every client every round)",
        "training": "not run: a stub returns a fixed delta (N(0, 1e-6)) with the client's example count",
        "secure": {"threshold": 0.5, "bits": CLEAR_BITS, "modulus_bits": 32, "clip": 1.0, "weight_scale": "60000 / n",
                   "secagg+ neighbours": "default 2*ceil(1.5*log2 n)", "ckks poly_modulus_degree": 8192},  # fmt: skip
        "dropout": f"{args.dropout:.0%} per round: ceil(d/2) clients leave after their shares, before their input; floor(d/2) after their input, before unmasking",
        "simulation": "sequential engine, one thread; CPU = exclusive thread CPU of client calls (handle, seal, client stages) and server calls (the round minus the clients)",
        "deployment": "gRPC on 127.0.0.1 without TLS, the server in the benchmark's process, ClientAgent threads in load-generator processes, own TCP connection each",
    }
    out["machine"] = machine()
    command = "python bench/secure.py " + " ".join(
        f"--{k.replace('_', '-')} {v if v != '' else chr(39) * 2}" for k, v in vars(args).items() if v is not None and not k.startswith("_")
    )
    out.pop("command", None)
    run_log = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "wall_s": 0.0, "loadavg_at_start": list(os.getloadavg())}
    out.setdefault("runs", []).append(run_log)
    rounds_for = {**SIM_ROUNDS, **{int(k): int(v) for k, v in (x.split("=") for x in args.rounds.split(",") if x)}}
    protocols = [p for p in args.protocols.split(",") if p]
    for p in protocols:
        if p not in PROTOCOLS:
            raise SystemExit(f"unknown protocol {p!r}; known: {', '.join(PROTOCOLS)}")
    if "ckks" in protocols:
        try:
            import tenseal  # noqa: F401
        except ImportError:
            print("tenseal is not installed: CKKS rows are skipped (pip install 'fedloom[he]')", file=sys.stderr)
            protocols.remove("ckks")
    sizes = [int(x) for x in args.sizes.split(",") if x]
    deploy_sizes = [int(x) for x in args.deploy_sizes.split(",") if x]
    t_all = time.perf_counter()

    def save() -> None:
        run_log["wall_s"] = time.perf_counter() - t_all
        run_log["loadavg_at_end"] = list(os.getloadavg())
        path.write_text(json.dumps(out, indent=1))
        path.with_suffix(".md").write_text(markdown(out))

    jobs = [("simulation", p, n) for n in sizes for p in protocols] + [("deployment", p, n) for n in deploy_sizes for p in protocols]
    jobs.sort(key=lambda j: (j[0] != "simulation", j[2], list(PROTOCOLS).index(j[1])))
    for mode, protocol, n in jobs:
        key = f"{mode}/{protocol}/{n}"
        rounds = rounds_for.get(n, 1) if mode == "simulation" else args.deploy_rounds
        guess = project(out, mode, protocol, n, rounds)
        if guess is not None and args.max_row_s > 0 and guess[0] > args.max_row_s:
            if key in out["rows"] and not out["rows"][key].get("skipped"):
                print(f"skip {key}: projected {guess[0]:,.0f} s; the earlier measurement in the JSON is kept", flush=True)
                continue
            reason = (f"projected {guess[0]:,.0f} s ({guess[1]}) > --max-row-s {args.max_row_s:.0f}; "
                      f"run it alone with --sizes/--deploy-sizes {n} --protocols {protocol} --max-row-s 0")  # fmt: skip
            print(f"skip {key}: {reason}", flush=True)
            out["rows"][key] = {"mode": mode, "protocol": protocol, "clients": n, "skipped": reason, "projected_s": guess[0]}
            save()
            continue
        print(f"{key}: {rounds} round(s)", flush=True)
        load_before = list(os.getloadavg())
        t0 = time.perf_counter()
        if mode == "simulation":
            row = sim_row(protocol, n, rounds, args.seed, args.dropout)
        else:
            loadgens = args.loadgens or (1 if n < 50 else 2)
            with tempfile.TemporaryDirectory(prefix="secure-bench-") as tmp:
                row = deploy_row(protocol, n, rounds, args.seed, args.dropout, loadgens, Path(tmp))
        row["row_wall_s"] = time.perf_counter() - t0
        row["command"] = command
        row["commit"] = out["machine"]["commit"]
        row["loadavg_before"] = load_before
        row["loadavg_after"] = list(os.getloadavg())
        out["rows"][key] = row
        print(
            f"{key}: client CPU {row['client_cpu_s']['mean']:.4f} s (max {row['client_cpu_s']['max']:.4f}), "
            f"server CPU {row['server_cpu_s']['mean']:.3f} s, up {row['bytes_up_per_client']['mean']:,.0f} B "
            f"({row['expansion']['up_vs_float32']:.2f}x), round {row['round_s']['mean']:.1f} s",
            flush=True,
        )
        save()
    save()


if __name__ == "__main__":
    main()
