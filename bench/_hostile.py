"""Hostile participants for ``bench/chaos.py``: authenticated sites that attack the Fleet service over the wire.

Each hostile site holds a valid client certificate of its own (``hostile-<kind>``, or
``hostile-<kind>-<i>`` when several sites run one attack: ``drip:4``; an authenticated but
malicious participant), registers like an honest client (with
:data:`REGISTERED_EXAMPLES` examples, so the server's sampler selects it and posts it
tasks), heartbeats, and runs one attack in a loop, written with the raw gRPC stubs
(:mod:`fedloom.transport.proto`) and the wire encoder (:mod:`fedloom.transport.wire`), never
with the honest agent. The attacks, per task the site is given unless said otherwise:

``stall``      6 concurrent PushResult streams, each the header and the first data chunk of
               a valid signed update, then silence (the attack that used to stall rounds)
``hammer``     (not per task) PullTask long polls from several threads, each pulling again as
               soon as it is answered, ignoring ``retry_after``; plus bursts of 6 concurrent
               push streams that send nothing, beyond ``max_streams_per_client``
``slowloris``  a push stream that sends nothing, together with a header announcing the largest
               size the server accepts followed by silence
``drip``       that header and one data byte at once, then one byte every 0.6 x
               ``stream_idle_timeout``: never idle, it holds a decoder slot until its task closes
``replay``     first task: a valid signed update (legitimate, counted apart) and then the same
               result again; later tasks: that first result verbatim, and with its header
               rewritten to name the new task (its old signature kept)
``forged``     signed with a fresh key; with another site's key; unsigned; data tampered after
               signing (CRC-32 and SHA-256 recomputed); header tampered after signing
``nan``        one of: a NaN in the delta, +Inf in the delta, a NaN training metric (signed)
``oversized``  a header announcing more bytes than the server allows; more data than the header
               announced; then one of: a delta of the wrong length, of the wrong dtype, 2-D
``inflate``    ``num_examples`` above the registered count (10x it, or one more), or a weight 10x the
               example count (the service takes that one; the round's weighting stage must not)
``malformed``  metadata that is not JSON, data before the header, a CRC mismatch, a stale
               digest, a truncated stream, an unknown dtype, a chunk after the trailer, an empty
               stream, an empty chunk, a server message kind, no session/task id, an unknown task id
``churn``      (not per task) Register, a short pull, Leave, in a tight loop

Every push is tallied per site and variant: accepted (``PushReply.accepted``) or refused,
with the reason (the reply's, or the gRPC status when the server cut the stream), digits
replaced by ``N`` so that reasons group; each accepted push is also listed with its round and
time, so that the bench can look up in the store whether the round aggregated it. Pushes a
well-behaved client would make too (replay's first update) are counted as ``legit``. The
``--probe-reregister`` probe (inflate site, once, from its third task on) registers again
declaring a million examples and pushes a result claiming them: a client's registered count
is its own word, and the probe records what the server makes of that (``probe``, apart from
the attacks). Task downloads are counted too (a site may pull its outstanding task again).

Started by ``bench/chaos.py`` as its own process; it writes its tallies to ``--out`` every
second and when it stops (SIGTERM, the end of the run, ``--max-seconds``, or its parent gone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import signal
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedloom.server import certs
from fedloom.transport.credentials import ClientCredentials, load_client_credentials
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.transport.protocol import GRPC_OPTIONS, IDLE, SERVER_KINDS, SHUTDOWN, TASK, UPDATE
from fedloom.transport.wire import Message, WireError, decode, encode
from fedloom.transport.wire import trailer_digest as wire_digest

__all__ = ["KINDS", "REGISTERED_EXAMPLES", "hostile_sites", "normalize_reason"]

KINDS = ("stall", "hammer", "slowloris", "drip", "replay", "forged", "nan", "oversized", "inflate", "malformed", "churn")
REGISTERED_EXAMPLES = 500
PROBE_EXAMPLES = 1_000_000
CHUNK_BYTES = 1024  # hostile uploads use small chunks: several data chunks even for a small model
MAX_TASK_BYTES = 1 << 28


def hostile_sites(attacks: Sequence[str]) -> list[tuple[str, str]]:
    """``(client id, kind)`` of the hostile sites for attack specs such as ``stall`` or ``drip:4``
    (four sites running that attack, each its own identity); ValueError for an unknown kind."""
    sites = []
    for spec in attacks:
        kind, _, count = spec.partition(":")
        if kind not in KINDS:
            raise ValueError(f"unknown attack {kind!r}; known: {', '.join(KINDS)}")
        n = int(count) if count else 1
        if n < 1:
            raise ValueError(f"attack {spec!r}: the count must be at least 1")
        sites += [(f"hostile-{kind}" if n == 1 else f"hostile-{kind}-{i + 1}", kind) for i in range(n)]
    return sites


def normalize_reason(reason: str) -> str:
    """A refusal reason with numbers replaced by ``N`` (so that reasons group), at most 160 characters."""
    return re.sub(r"\d+(\.\d+)?", "N", " ".join(reason.split()))[:160]


# ---------------------------------------------------------------------------- tallies
@dataclass
class Variant:
    """The pushes of one variant of an attack."""

    pushes: int = 0
    accepted: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {"pushes": self.pushes, "accepted": self.accepted, "refused": dict(self.reasons.most_common())}


class Tally:
    """What one hostile site did and what the server answered (thread-safe)."""

    def __init__(self, kind: str, client_id: str) -> None:
        self.kind = kind  # the attack
        self.client_id = client_id
        self._lock = threading.Lock()
        self.roles: dict[str, dict[str, Variant]] = {"attack": {}, "legit": {}, "probe": {}}
        self.events: Counter[str] = Counter()
        self.accepted: list[dict[str, Any]] = []  # every accepted push: role, variant, round, task
        self.tasks = 0
        self.errors: list[str] = []

    def push(self, variant: str, outcome: tuple[bool, str], *, task: Task | None, role: str = "attack") -> None:
        accepted, reason = outcome
        with self._lock:
            v = self.roles[role].setdefault(variant, Variant())
            v.pushes += 1
            if accepted:
                v.accepted += 1
                self.accepted.append(
                    {"role": role, "variant": variant, "round": None if task is None else task.round, "t": time.time()}
                )
            else:
                v.reasons[normalize_reason(reason)] += 1

    def event(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.events[name] += n

    def error(self, what: str) -> None:
        with self._lock:
            if len(self.errors) < 20:
                self.errors.append(what[:500])

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {"client_id": self.client_id, "kind": self.kind, "tasks": self.tasks}
            for role, variants in self.roles.items():
                out[role] = {
                    "pushes": sum(v.pushes for v in variants.values()),
                    "accepted": sum(v.accepted for v in variants.values()),
                    "variants": {k: v.to_json() for k, v in variants.items()},
                }
            out["accepted_pushes"] = list(self.accepted)
            out["events"] = dict(self.events.most_common())
            out["errors"] = list(self.errors)
            return out


# ---------------------------------------------------------------------------- the wire
@dataclass(frozen=True)
class Task:
    """A training task the server gave this site."""

    task_id: str
    round: int
    numel: int
    model_version: int | None

    @classmethod
    def of(cls, msg: Message) -> Task:
        params = msg.tensors.get("params")
        if params is None:
            raise WireError("task without params")
        version = msg.meta.get("model_version")
        return cls(str(msg.meta["task_id"]), int(msg.meta["round"]), int(params.numel()), version if isinstance(version, int) else None)

    @property
    def limit_bytes(self) -> int:
        """The most tensor bytes the server's decoder accepts in a result (3 float32 models + 1 MiB)."""
        return 3 * self.numel * 4 + (1 << 20)


def _channel(server: str, creds: ClientCredentials, *extra: tuple[str, Any]) -> grpc.Channel:
    tls = grpc.ssl_channel_credentials(root_certificates=creds.ca_pem, private_key=creds.key_pem, certificate_chain=creds.cert_pem)
    return grpc.secure_channel(server, tls, options=[*GRPC_OPTIONS, *extra])


def _data_chunk(payload: bytes) -> pb.Chunk:
    return pb.Chunk(data=pb.Data(payload=payload, crc32=zlib.crc32(payload)))


def _copy(chunk: pb.Chunk) -> pb.Chunk:
    c = pb.Chunk()
    c.CopyFrom(chunk)
    return c


def _parts(chunks: Sequence[pb.Chunk]) -> tuple[pb.Chunk, list[pb.Chunk], pb.Chunk]:
    """(header, data chunks, trailer) of an encoded message with at least one data chunk."""
    header, data, trailer = chunks[0], list(chunks[1:-1]), chunks[-1]
    assert header.WhichOneof("body") == "header" and trailer.WhichOneof("body") == "trailer" and data
    return header, data, trailer


def _with_meta(header: pb.Chunk, **changes: Any) -> pb.Chunk:
    """A copy of ``header`` with its JSON metadata changed (None deletes a key)."""
    h = _copy(header)
    meta = json.loads(h.header.meta_json)
    for k, v in changes.items():
        if v is None:
            meta.pop(k, None)
        else:
            meta[k] = v
    h.header.meta_json = json.dumps(meta)
    return h


class Held:
    """A request stream: send ``chunks``, then hold the call open sending nothing (or ``drip`` every
    ``every`` seconds) until released or the process stops."""

    def __init__(self, chunks: Sequence[pb.Chunk], stop: threading.Event, drip: pb.Chunk | None = None, every: float = 1.0) -> None:
        self.chunks = list(chunks)
        self.stop = stop
        self.drip = drip
        self.every = every
        self.release = threading.Event()

    def _held(self) -> bool:
        return not (self.release.is_set() or self.stop.is_set())

    def __iter__(self) -> Iterator[pb.Chunk]:
        yield from self.chunks
        last = time.monotonic()
        while self._held():
            self.release.wait(0.1)
            if self.drip is not None and time.monotonic() - last >= self.every and self._held():
                last = time.monotonic()
                yield self.drip


def _rpc_reason(exc: grpc.RpcError) -> str:
    code = exc.code()
    return f"rpc {code.name if code is not None else '?'}: {exc.details() or ''}"


# ---------------------------------------------------------------------------- a site
class Site:
    """One hostile identity: its channel, session and heartbeat, and helpers to push results."""

    def __init__(
        self,
        kind: str,
        creds: ClientCredentials,
        *,
        server: str,
        stop: threading.Event,
        heartbeat: float,
        idle_timeout: float,
        round_timeout: float,
    ) -> None:
        self.kind = kind
        self.creds = creds
        self.server = server
        self.tally = Tally(kind, creds.client_id)
        self.stub = pb_grpc.FleetStub(_channel(server, creds))
        self.stop = stop
        self.done = threading.Event()  # the server said the run is over
        self.heartbeat = heartbeat
        self.idle_timeout = idle_timeout
        self.round_timeout = round_timeout
        self.session: str | None = None
        self.examples = REGISTERED_EXAMPLES
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return not (self.stop.is_set() or self.done.is_set())

    # ------------------------------------------------------------ session
    def register(self, examples: int | None = None) -> str | None:
        """Register (again, when ``examples`` is given); None if refused or unreachable."""
        with self._lock:
            if self.session is not None and examples is None:
                return self.session
            n = self.examples if examples is None else examples
            try:
                reply = self.stub.Register(
                    pb.RegisterRequest(client_id=self.creds.client_id, num_examples=n, num_test_examples=0), timeout=10
                )
            except grpc.RpcError as exc:
                self.tally.event(f"register failed: {exc.code().name}")
                return None
            self.session = reply.session
            self.examples = n
            self.tally.event("registered")
            return self.session

    def ensure_session(self) -> str | None:
        session = self.register()
        if session is None:
            self.stop.wait(0.5)
        return session

    def lost(self, exc: grpc.RpcError) -> None:
        """A call failed: forget the session if the server does not know it (or went away)."""
        code = exc.code()
        self.tally.event(f"call failed: {code.name}")
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            with self._lock:
                self.session = None
        if code != grpc.StatusCode.NOT_FOUND:
            self.stop.wait(0.5)

    def heartbeat_loop(self) -> None:
        """Heartbeat on a connection of its own, as the honest agent does, so the site stays live."""
        channel = _channel(self.server, self.creds, ("grpc.use_local_subchannel_pool", 1))
        stub = pb_grpc.FleetStub(channel)
        try:
            while self.running and not self.stop.wait(self.heartbeat):
                session = self.session
                if session is None:
                    continue
                try:
                    if not stub.Heartbeat(pb.HeartbeatRequest(session=session), timeout=10).known:
                        with self._lock:
                            if self.session == session:
                                self.session = None
                except grpc.RpcError:
                    pass
        finally:
            channel.close()

    # ------------------------------------------------------------ calls
    def pull(self, wait: float) -> Message | None:
        """The server's answer to one PullTask: a task message, or None (idle, or the run is over)."""
        session = self.session
        if session is None:
            return None
        call = self.stub.PullTask(pb.PullTaskRequest(session=session, wait_seconds=wait), timeout=wait + 60)
        msg = decode(call, max_bytes=MAX_TASK_BYTES, kinds=SERVER_KINDS)
        if msg.kind == SHUTDOWN:
            self.tally.event("told the run is over")
            self.done.set()
            return None
        if msg.kind == IDLE:
            self.tally.event("pull: idle, retry_after" if "retry_after" in msg.meta else "pull: idle")
            return None
        self.tally.event("task downloads")
        self.tally.event("task bytes downloaded", sum(t.numel() * t.element_size() for t in msg.tensors.values()))
        return msg

    def push(self, chunks: Sequence[pb.Chunk], timeout: float = 30.0) -> tuple[bool, str]:
        """(accepted, reason) of one PushResult of ``chunks``."""
        try:
            reply = self.stub.PushResult(iter(list(chunks)), timeout=timeout)
        except grpc.RpcError as exc:
            return False, _rpc_reason(exc)
        return bool(reply.accepted), "accepted" if reply.accepted else reply.reason

    def held_pushes(self, streams: Sequence[Held], timeout: float) -> list[tuple[bool, str]]:
        """Open every stream at once; (accepted, reason) of each once the server answered or cut it."""
        futures = [self.stub.PushResult.future(iter(h), timeout=timeout) for h in streams]
        outcomes: list[tuple[bool, str]] = []
        try:
            for f in futures:
                try:
                    reply = f.result(timeout=timeout + 5)
                    outcomes.append((bool(reply.accepted), "accepted" if reply.accepted else reply.reason))
                except grpc.FutureTimeoutError:
                    f.cancel()
                    outcomes.append((False, "no answer within the client's own timeout"))
                except grpc.RpcError as exc:
                    outcomes.append((False, _rpc_reason(exc)))
        finally:
            for h in streams:
                h.release.set()
        return outcomes

    def meta(self, task: Task, **changes: Any) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "round": task.round,
            "num_examples": self.examples,
            "num_steps": 1,
            "metrics": {},
            "model_version": task.model_version,
            "session": self.session or "",
            "task_id": task.task_id,
        }
        meta.update(changes)
        meta.setdefault("weight", float(meta["num_examples"]))  # FedAvg's weighting stage: w = n (a zero delta stays zero)
        return meta

    def update(
        self,
        task: Task,
        *,
        delta: torch.Tensor | None = None,
        key_pem: bytes | None = None,
        signed: bool = True,
        **meta: Any,
    ) -> list[pb.Chunk]:
        """The chunks of an update for ``task`` (a zero delta unless given), signed with this site's key
        (or ``key_pem``; unsigned if not ``signed``)."""
        key = key_pem or self.creds.key_pem
        sign: Callable[[bytes], bytes] | None = (lambda b: certs.sign(key, b)) if signed else None
        d = torch.zeros(task.numel, dtype=torch.float32) if delta is None else delta
        return list(encode(UPDATE, self.meta(task, **meta), {"delta": d}, sign=sign, chunk_bytes=CHUNK_BYTES))

    def huge_header(self, task: Task, extra_bytes: int = 0) -> pb.Chunk:
        """A header announcing the largest result the server accepts (plus ``extra_bytes``)."""
        n = (task.limit_bytes + extra_bytes) // 4
        return pb.Chunk(
            header=pb.Header(
                kind=UPDATE,
                meta_json=json.dumps(self.meta(task)),
                tensors=[pb.TensorMeta(name="delta", dtype="float32", shape=[n])],
                total_bytes=n * 4,
            )
        )


# ---------------------------------------------------------------------------- attacks per task
def attack_stall(site: Site, task: Task) -> None:
    header, data, _ = _parts(site.update(task))
    streams = [Held([header, data[0]], site.stop) for _ in range(6)]
    for outcome in site.held_pushes(streams, timeout=6 * site.idle_timeout + 20):
        site.tally.push("6 concurrent streams: header + one data chunk, then silence", outcome, task=task)


def attack_slowloris(site: Site, task: Task) -> None:
    silent, header = Held([], site.stop), Held([site.huge_header(task)], site.stop)
    silent_out, header_out = site.held_pushes([silent, header], timeout=6 * site.idle_timeout + 20)
    site.tally.push("stream sending nothing", silent_out, task=task)
    site.tally.push("maximum-size header, then silence", header_out, task=task)


def attack_drip(site: Site, task: Task) -> None:
    byte = _data_chunk(b"\0")
    drip = Held([site.huge_header(task), byte], site.stop, drip=byte, every=0.6 * site.idle_timeout)
    (outcome,) = site.held_pushes([drip], timeout=3 * site.round_timeout + 6 * site.idle_timeout + 20)
    site.tally.push("maximum-size header and 1 byte, then 1 byte per 0.6 x idle timeout", outcome, task=task)


class Replay:
    """The replay site's memory: its first accepted result."""

    def __init__(self) -> None:
        self.saved: list[pb.Chunk] | None = None

    def __call__(self, site: Site, task: Task) -> None:
        if self.saved is None:
            chunks = site.update(task)
            outcome = site.push(chunks)
            site.tally.push("first update (well-formed, signed)", outcome, task=task, role="legit")
            if outcome[0]:
                self.saved = chunks
                site.tally.push("the same result again, same task", site.push(chunks), task=task)
            return
        site.tally.push("earlier accepted result, verbatim", site.push(self.saved), task=task)
        header, data, trailer = _parts(self.saved)
        moved = _with_meta(header, task_id=task.task_id, round=task.round, session=site.session or "")
        site.tally.push("earlier result, header rewritten for the new task", site.push([moved, *data, trailer]), task=task)


class Forged:
    """Results whose signature cannot verify: wrong key, none, or content changed after signing."""

    def __init__(self, other_key: bytes | None) -> None:
        fresh = ec.generate_private_key(ec.SECP256R1())
        self.fresh_key = fresh.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.other_key = other_key

    def __call__(self, site: Site, task: Task) -> None:
        site.tally.push("signed with a fresh key", site.push(site.update(task, key_pem=self.fresh_key)), task=task)
        if self.other_key is not None:
            site.tally.push("signed with another site's key", site.push(site.update(task, key_pem=self.other_key)), task=task)
        site.tally.push("unsigned", site.push(site.update(task, signed=False)), task=task)
        header, data, trailer = _parts(site.update(task))
        first = bytearray(data[0].data.payload)
        first[:4] = torch.tensor([1.0], dtype=torch.float32).numpy().tobytes()
        tampered = [_data_chunk(bytes(first)), *data[1:]]
        digest = wire_digest(hashlib.sha256(b"".join(c.data.payload for c in tampered)), header.header.tensors)
        new_trailer = pb.Chunk(trailer=pb.Trailer(sha256=digest, signature=trailer.trailer.signature))
        site.tally.push("data tampered after signing (CRC, digest recomputed)", site.push([header, *tampered, new_trailer]), task=task)
        smaller = _with_meta(header, num_examples=max(1, site.examples - 1))
        site.tally.push("header tampered after signing", site.push([smaller, *data, trailer]), task=task)


def attack_nan(site: Site, task: Task) -> None:
    which = site.tally.tasks % 3
    delta = torch.zeros(task.numel, dtype=torch.float32)
    if which == 0:
        delta[0] = float("nan")
        site.tally.push("NaN in the delta", site.push(site.update(task, delta=delta)), task=task)
    elif which == 1:
        delta[-1] = float("inf")
        site.tally.push("+Inf in the delta", site.push(site.update(task, delta=delta)), task=task)
    else:
        site.tally.push("NaN training metric", site.push(site.update(task, metrics={"loss": float("nan")})), task=task)


def attack_oversized(site: Site, task: Task) -> None:
    site.tally.push("header announcing more than the limit", site.push([site.huge_header(task, extra_bytes=4)]), task=task)
    header, data, trailer = _parts(site.update(task))
    site.tally.push("more data than the header announced", site.push([header, *data, _data_chunk(b"\0" * 64), trailer]), task=task)
    which = site.tally.tasks % 3
    if which == 0:
        delta, variant = torch.zeros(task.numel + 1, dtype=torch.float32), "delta one value too long"
    elif which == 1:
        delta, variant = torch.zeros(task.numel, dtype=torch.float64), "float64 delta"
    else:
        delta, variant = torch.zeros(1, task.numel, dtype=torch.float32), "2-D delta"
    site.tally.push(variant, site.push(site.update(task, delta=delta)), task=task)


class Inflate:
    """More examples than registered; and, once, the re-registration probe."""

    def __init__(self, probe: bool) -> None:
        self.probe = probe

    def __call__(self, site: Site, task: Task) -> None:
        if self.probe and site.tally.tasks >= 3:
            self.probe = False
            registered = site.examples
            if site.register(examples=PROBE_EXAMPLES) is not None:
                outcome = site.push(site.update(task, num_examples=PROBE_EXAMPLES))
                site.tally.push(f"registered again with {PROBE_EXAMPLES} examples, then claimed them", outcome, task=task, role="probe")
                site.register(examples=registered)
                return
        n = site.examples
        which = site.tally.tasks % 3
        if which == 0:
            site.tally.push("registered examples + 1", site.push(site.update(task, num_examples=n + 1)), task=task)
        elif which == 1:
            site.tally.push("10x the registered examples", site.push(site.update(task, num_examples=10 * n)), task=task)
        else:  # the service takes it; the round's weighting stage must refuse it
            variant = "weight 10x its example count"
            site.tally.push(variant, site.push(site.update(task, weight=10.0 * n)), task=task)


def attack_malformed(site: Site, task: Task) -> None:
    good = site.update(task)
    header, data, trailer = _parts(good)
    bad_crc = pb.Chunk(data=pb.Data(payload=data[0].data.payload, crc32=data[0].data.crc32 ^ 1))
    changed = bytearray(data[0].data.payload)
    changed[0] ^= 0xFF
    unknown_dtype = _copy(header)
    unknown_dtype.header.tensors[0].dtype = "float128"
    server_kind = _copy(header)
    server_kind.header.kind = TASK
    stranger = site.update(task, task_id=secrets.token_hex(16))
    variants: dict[str, list[pb.Chunk]] = {
        "metadata not JSON": [pb.Chunk(header=pb.Header(kind=UPDATE, meta_json="{not json"))],
        "data before the header": [data[0], header, *data[1:], trailer],
        "CRC-32 mismatch": [header, bad_crc, *data[1:], trailer],
        "stale digest (data changed, CRC fixed)": [header, _data_chunk(bytes(changed)), *data[1:], trailer],
        "truncated (no trailer)": [header, *data[: max(1, len(data) // 2)]],
        "unknown dtype": [unknown_dtype, *data, trailer],
        "chunk after the trailer": [*good, data[0]],
        "empty stream": [],
        "empty chunk": [pb.Chunk()],
        "server message kind": [server_kind, *data, trailer],
        "no session or task id": [_with_meta(header, session=None, task_id=None), *data, trailer],
        "unknown task id (signed)": stranger,
    }
    for variant, chunks in variants.items():
        site.tally.push(variant, site.push(chunks), task=task)


# ---------------------------------------------------------------------------- loops
def task_loop(site: Site, attack: Callable[[Site, Task], None]) -> None:
    """Pull tasks; attack each new one once (the same outstanding task is pulled again until it closes)."""
    seen: set[str] = set()
    while site.running:
        if site.ensure_session() is None:
            continue
        try:
            msg = site.pull(wait=5.0)
        except grpc.RpcError as exc:
            site.lost(exc)
            continue
        except WireError as exc:
            site.tally.error(f"malformed message from the server: {exc}")
            continue
        if msg is None or msg.kind != TASK:
            continue
        task = Task.of(msg)
        if task.task_id in seen:
            site.stop.wait(0.5)
            continue
        seen.add(task.task_id)
        site.tally.tasks += 1
        try:
            attack(site, task)
        except grpc.RpcError as exc:
            site.lost(exc)


def hammer_pulls(site: Site) -> None:
    """Pull again as soon as answered: ignore retry_after, never back off except when the server is gone."""
    while site.running:
        if site.ensure_session() is None:
            continue
        try:
            msg = site.pull(wait=60.0)
        except grpc.RpcError as exc:
            code = exc.code()
            site.tally.event(f"pull refused: {code.name}")
            if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                site.lost(exc)
            continue
        site.tally.event("pulls answered")
        if msg is not None and msg.kind == TASK:
            site.tally.event("pull: task (ignored)")


def hammer_streams(site: Site, n: int = 6) -> None:
    """Bursts of ``n`` concurrent push streams that send nothing."""
    while site.running:
        if site.ensure_session() is None:
            continue
        for outcome in site.held_pushes([Held([], site.stop) for _ in range(n)], timeout=6 * site.idle_timeout + 20):
            site.tally.push(f"{n} concurrent push streams sending nothing", outcome, task=None)


def churn(site: Site, interval: float) -> None:
    """Register, pull once without waiting, leave; again."""
    while site.running:
        try:
            session = site.stub.Register(
                pb.RegisterRequest(client_id=site.creds.client_id, num_examples=site.examples), timeout=10
            ).session
        except grpc.RpcError as exc:
            site.tally.event(f"register refused: {exc.code().name}")
            site.stop.wait(0.5 if exc.code() == grpc.StatusCode.UNAVAILABLE else interval)
            continue
        site.tally.event("register ok")
        try:
            msg = decode(
                site.stub.PullTask(pb.PullTaskRequest(session=session, wait_seconds=0.0), timeout=10),
                max_bytes=MAX_TASK_BYTES,
                kinds=SERVER_KINDS,
            )
            if msg.kind == SHUTDOWN:
                site.tally.event("told the run is over")
                site.done.set()
            elif msg.kind == TASK:
                site.tally.event("pull: task (abandoned)")
            site.stub.Leave(pb.LeaveRequest(session=session), timeout=10)
            site.tally.event("leave ok")
        except grpc.RpcError as exc:
            site.tally.event(f"pull/leave failed: {exc.code().name}")
        except WireError as exc:
            site.tally.error(f"malformed message from the server: {exc}")
        site.stop.wait(interval)


def _guarded(site: Site, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with any exception recorded as an error of the bench (and the site stopped)."""

    def run() -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a bug here must show up in the results, not vanish in a thread
            site.tally.error(f"{type(exc).__name__}: {exc}")
            site.done.set()

    return run


# ---------------------------------------------------------------------------- main
def _work(site: Site, args: argparse.Namespace, *, other_key: bytes | None) -> list[Callable[[], None]]:
    """The loops one site runs, a thread each: its heartbeat (churn has none) and its attack."""
    if site.kind == "churn":
        return [partial(churn, site, args.churn_interval)]
    work: list[Callable[[], None]] = [site.heartbeat_loop]
    if site.kind == "hammer":
        return work + [partial(hammer_pulls, site)] * args.hammer_threads + [partial(hammer_streams, site)]
    attacks: dict[str, Callable[[Site, Task], None]] = {
        "stall": attack_stall,
        "slowloris": attack_slowloris,
        "drip": attack_drip,
        "replay": Replay(),
        "forged": Forged(other_key),
        "nan": attack_nan,
        "oversized": attack_oversized,
        "inflate": Inflate(args.probe_reregister),
        "malformed": attack_malformed,
    }
    return [*work, partial(task_loop, site, attacks[site.kind])]


def _write(path: Path, sites: Sequence[Site], started: float, final: bool) -> None:
    data = {
        "started": started,
        "written": time.time(),
        "final": final,
        "sites": {s.creds.client_id: s.tally.to_json() for s in sites},
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server", required=True, help="HOST:PORT of the fedloom server")
    ap.add_argument("--pki", type=Path, required=True, help="directory with clients/<site id>/ credentials")
    ap.add_argument("--attacks", default=",".join(KINDS), help="attack specs: kind or kind:count, comma-separated")
    ap.add_argument("--out", type=Path, required=True, help="JSON tallies, rewritten every second")
    ap.add_argument("--heartbeat", type=float, default=1.0)
    ap.add_argument("--idle-timeout", type=float, required=True, help="the server's deploy.stream_idle_timeout")
    ap.add_argument("--round-timeout", type=float, required=True, help="the server's deploy.round_timeout")
    ap.add_argument("--hammer-threads", type=int, default=3)
    ap.add_argument("--churn-interval", type=float, default=0.02)
    ap.add_argument("--probe-reregister", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-seconds", type=float, default=1800.0)
    args = ap.parse_args()

    try:
        wanted = hostile_sites([a for a in args.attacks.split(",") if a])
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    started = time.time()
    creds = {cid: load_client_credentials(args.pki / "clients" / cid) for cid, _ in wanted}
    sites = [
        Site(
            kind,
            creds[cid],
            server=args.server,
            stop=stop,
            heartbeat=args.heartbeat,
            idle_timeout=args.idle_timeout,
            round_timeout=args.round_timeout,
        )
        for cid, kind in wanted
    ]
    threads: list[threading.Thread] = []
    for site in sites:
        others = [c.key_pem for cid, c in creds.items() if cid != site.creds.client_id]
        work = _work(site, args, other_key=others[0] if others else None)
        for i, fn in enumerate(work):
            t = threading.Thread(target=_guarded(site, fn), name=f"{site.kind}-{i}", daemon=True)
            t.start()
            threads.append(t)
    while not stop.is_set() and any(t.is_alive() for t in threads):
        if os.getppid() != parent or time.time() - started > args.max_seconds:
            stop.set()
            break
        _write(args.out, sites, started, final=False)
        stop.wait(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    _write(args.out, sites, started, final=True)


if __name__ == "__main__":
    main()
