"""The gRPC service a server exposes to its clients (``fedloom.v1.Fleet``), and its startup.

Every call is authenticated: with TLS (the default) the client's identity is the CN of the
certificate it presented in the mutual-TLS handshake, which the server's CA must have
issued and which must not be on the revocation list (re-read when the file changes).
A result must also carry a valid ECDSA signature, by that certificate's key, over its
header (which names the task) and its data digest, and must answer that client's
outstanding task: a forged, tampered or replayed result is refused. ``insecure`` mode
trusts the claimed client id and checks no signatures: loopback development only.

A result is decoded defensively (:class:`~fedloom.transport.wire.Decoder`), turned into a
:class:`~fedloom.core.types.ClientUpdate` by the transport's codec
(:func:`~fedloom.transport.codec.decode_update`: unknown tensors, wrong kinds, badly typed
metadata are refused) and validated against the model (shape, dtype, finite values,
example count no larger than the client registered) before it reaches the round; anything
wrong is refused with a logged reason, and the round goes on. An update carrying an encoded
payload has its header checked here and its payload checked and decoded by the round loop's
pipeline (the stage that made it). At most ``max_decoding``
results are decoded at once, so memory stays O(model) per decoder; a decoder slot is taken
only when a result's data starts to arrive.

The handlers are coroutines of a ``grpc.aio`` server running its own event loop in a thread
of its own (:mod:`fedloom.server.aio`), while the round loop stays synchronous in the
caller's thread: a long poll waits on the loop, woken by the coordinator when its task is
posted, and holds no thread; decoding, signature checks, validation and the hand-over to
the round run on a bounded thread pool (``max_workers`` threads, of which at most
``max_decoding`` hold a decoder), never on the loop.

What one participant may hold (open calls, uploads per task, long polls, registrations per
second) and how long a stream may sit idle are bounded by :mod:`fedloom.server.limits`; what
all of them may spend on control calls (heartbeats, idle long polls) by
:mod:`fedloom.server.control`: the heartbeat interval and long-poll wait the service
advertises grow with the number of connected clients, and a client's open long poll keeps
it live (the service touches the clients waiting in one every ``heartbeat_timeout / 3`` s).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch

from fedloom.core.errors import FedloomError, InvalidUpdateError
from fedloom.core.params import ParamSpec
from fedloom.engines.coordinator import Coordinator, RegistrationRefused, Task
from fedloom.server import certs
from fedloom.server.aio import FleetServer, Slots, offload, thread_safe_cancel, wait_for_task
from fedloom.server.control import DEFAULT_MAX_CONTROL_RATE, ControlPlan
from fedloom.server.limits import DEFAULT_MAX_LONG_POLLS, Guard, LimitExceeded, Limits, Stream
from fedloom.server.results import Refused as _Refused
from fedloom.server.results import result_payload
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.transport.protocol import CLIENT_KINDS, GRPC_OPTIONS, IDLE, SHUTDOWN, spec_digest
from fedloom.transport.wire import Decoder, Message, WireError, encode

__all__ = [
    "GRPC_OPTIONS",
    "FleetServer",
    "FleetService",
    "RevocationList",
    "ServiceSettings",
    "spec_digest",
    "start_server",
]

log = logging.getLogger("fedloom.server")

T = TypeVar("T")

# A fixed 1 MiB flow-control window per stream instead of BDP probing: otherwise each push
# stream waiting for a decoder slot buffers megabytes in the transport (grpc/grpc#29836) and
# server memory grows with the number of clients. 1 MiB per round trip still fills a WAN link.
# Clients send keepalive pings every 30 s (GRPC_OPTIONS), also while they only wait in a long
# poll; gRPC's server default (one ping per 5 min without data) answers them with GOAWAY
# "too_many_pings" and every idle client reconnects: accept one every 20 s.
# Calls the event loop has not yet picked up wait in gRPC core's pending queue, which by default
# cancels new calls past 1,000 (some) and 3,000 (all) waiting: a burst of registrations or polls
# from thousands of clients on a busy loop then came back CANCELLED, and every cancelled client
# reconnected and registered again (tens of thousands of reconnects at 10,000 clients). Let the
# queue hold what DEFAULT_MAX_LONG_POLLS lets wait (a few hundred bytes per pending call).
SERVER_OPTIONS = [
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1 << 20),
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.server.max_pending_requests", DEFAULT_MAX_LONG_POLLS),
    ("grpc.server.max_pending_requests_hard_limit", 2 * DEFAULT_MAX_LONG_POLLS),
]

LOOP_HEADER_BYTES = 64 << 10  # a result header larger than this (its metadata) is parsed on the pool


class RevocationList:
    """Serial numbers of revoked client certificates, re-read whenever the file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mtime: float | None = None
        self._serials: frozenset[int] = frozenset()
        self._lock = threading.Lock()

    def __contains__(self, serial: int) -> bool:
        if self.path is None:
            return False
        with self._lock:
            try:
                mtime = os.stat(self.path).st_mtime
            except FileNotFoundError:
                mtime = None
            if mtime != self._mtime:
                self._serials = certs.load_revoked(self.path) if mtime is not None else frozenset()
                self._mtime = mtime
            return serial in self._serials


@dataclass(frozen=True)
class ServiceSettings:
    """What the service tells clients and how much it accepts."""

    run_info: dict[str, Any]  # model + task description sent at registration
    heartbeat_interval: float = 5.0  # the shortest interval advertised (fedloom.server.control)
    max_pull_wait: float = 10.0  # the shortest long-poll wait advertised
    heartbeat_timeout: float = 30.0  # a client silent this long is not live (the coordinator's)
    max_control_rate: float = DEFAULT_MAX_CONTROL_RATE  # control calls/s of all clients together (0: unscaled)
    max_decoding: int = 4
    secure: bool = True
    limits: Limits = Limits()
    max_message_bytes: int = 0  # tensor bytes a client message may carry (0: three models' worth); CKKS needs more
    max_examples: int | None = None  # the most training examples any client may declare
    client_max_examples: Mapping[str, int] = field(default_factory=dict)  # per-client caps
    roster: frozenset[str] | None = None  # the only client ids that may register (an edge's clients; a root's edges)
    roster_name: str = "this run"  # whose roster, for the refusal


class FleetService(pb_grpc.FleetServicer):
    """Implements the Fleet RPCs (as ``grpc.aio`` coroutines) on top of a :class:`Coordinator`."""

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        spec: ParamSpec,
        dtype: torch.dtype,
        settings: ServiceSettings,
        revoked: RevocationList | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.spec = spec
        self.dtype = dtype
        self.settings = settings
        self.revoked = revoked or RevocationList(None)
        self._decoding = Slots(settings.max_decoding)
        self._param_bytes = spec.numel * torch.empty((), dtype=dtype).element_size()
        self._pool: Executor | None = None  # set by start_server
        self.bytes_received = 0
        self.bytes_sent = 0
        self._count_lock = threading.Lock()
        self.guard = Guard(settings.limits)
        self.guard.start()
        self.control = ControlPlan(
            settings.heartbeat_interval, settings.max_pull_wait, settings.heartbeat_timeout, settings.max_control_rate
        )
        self._intervals = self.control.intervals(0)
        self._counted_at = -float("inf")
        self._polling: dict[str, int] = {}  # clients waiting in a long poll (event loop only)
        self._keeper: asyncio.Task[None] | None = None
        self._keeper_loop: asyncio.AbstractEventLoop | None = None

    def bind(self, pool: Executor) -> None:
        """The thread pool the handlers offload blocking work to (the server's)."""
        self._pool = pool

    @property
    def decoders_free(self) -> int:
        """Decoder slots free now (``max_decoding`` when no result is being decoded)."""
        return self._decoding.free

    def close(self) -> None:
        """Stop the idle-stream watchdog and the long polls' keeper (after the gRPC server has stopped)."""
        self.guard.stop()
        keeper, loop = self._keeper, self._keeper_loop
        if keeper is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(keeper.cancel)

    COUNT_EVERY = 2.0  # seconds between two counts of the connected clients

    def intervals(self) -> tuple[float, float]:
        """``(heartbeat_interval, pull_wait)`` advertised now (the clients are counted every :attr:`COUNT_EVERY` s)."""
        now = time.monotonic()
        if now - self._counted_at >= self.COUNT_EVERY:
            self._counted_at = now
            self._intervals = self.control.intervals(len(self.coordinator.clients()))
        return self._intervals

    async def _keep_polls_alive(self) -> None:
        """Touch the clients waiting in a long poll every ``heartbeat_timeout / 3`` s: an open poll is a sign of life."""
        every = self.settings.heartbeat_timeout / 3.0
        while True:
            await asyncio.sleep(every)
            for cid in list(self._polling):
                self.coordinator.touch(cid)

    async def _offload(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._pool is not None, "start the service with start_server"
        return await offload(self._pool, fn, *args)

    # ----------------------------------------------------------- identity
    async def _identity(self, context: grpc.aio.ServicerContext) -> tuple[certs.PeerIdentity | None, bytes | None]:
        """(the peer certificate's identity, its PEM) under TLS; (None, None) in insecure mode."""
        if not self.settings.secure:
            return None, None
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        pem = pems[0]
        try:
            ident = certs.peer_identity(pem)
        except certs.CertError as exc:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"unusable certificate: {exc}")
        if ident.serial in self.revoked:
            log.warning("refused revoked certificate %r (serial %x) from %s", ident.common_name, ident.serial, context.peer())
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")
        return ident, pem

    async def _peer(self, context: grpc.aio.ServicerContext) -> tuple[str | None, bytes | None]:
        """(certificate CN, certificate PEM) under TLS; (None, None) in insecure mode."""
        ident, pem = await self._identity(context)
        return (ident.common_name if ident is not None else None), pem

    def _example_cap(self, cid: str, ident: certs.PeerIdentity | None) -> tuple[int, str] | None:
        """The most training examples ``cid`` may declare, and where the cap comes from (None: no cap)."""
        caps = [
            (self.settings.client_max_examples.get(cid), "deploy.client_max_examples"),
            (self.settings.max_examples, "deploy.max_examples"),
            (ident.max_examples if ident is not None else None, "its certificate"),
        ]
        given = [(n, where) for n, where in caps if n is not None]
        return min(given) if given else None

    async def _session_client(self, session: str, context: grpc.aio.ServicerContext) -> tuple[str, bytes | None]:
        cn, pem = await self._peer(context)
        cid = self.coordinator.client_of(session)
        if cid is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown session: register again")
        assert cid is not None
        if cn is not None and cn != cid:
            log.warning("certificate %r used the session of client %r: refused", cn, cid)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "session belongs to another client")
        return cid, pem

    # ----------------------------------------------------------- RPCs
    async def Register(self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext) -> pb.RegisterReply:
        ident, _ = await self._identity(context)
        cn = ident.common_name if ident is not None else None
        cid = request.client_id
        if cn is not None:
            if cid and cid != cn:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"client id {cid!r} does not match the certificate ({cn!r})")
            cid = cn
        try:
            certs.validate_client_id(cid)
        except certs.CertError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        roster = self.settings.roster
        if roster is not None and cid not in roster:
            reason = f"{cid!r} is not in the roster of {self.settings.roster_name}"
            self.guard.warn(cid, "register", "refused a registration of %r (%s): %s", cid, context.peer(), reason)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        try:
            self.guard.admit_registration(cid)
        except LimitExceeded as exc:
            self.guard.warn(cid, "register", "refused a registration of %r (%s): %s", cid, context.peer(), exc.reason)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.reason)
        cap = self._example_cap(cid, ident)
        if cap is not None and request.num_examples > cap[0]:
            reason = f"{cid!r} declares {request.num_examples} training examples, above its cap of {cap[0]} ({cap[1]})"
            self.guard.warn(cid, "register", "refused a registration of %r (%s): %s", cid, context.peer(), reason)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)
        try:
            session = self.coordinator.register(
                cid, num_examples=request.num_examples, num_test_examples=request.num_test_examples, peer=context.peer()
            )
        except RegistrationRefused as exc:
            self.guard.warn(cid, "register", "refused a registration of %r (%s): %s", cid, context.peer(), exc)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        heartbeat, pull_wait = self.intervals()
        return pb.RegisterReply(
            session=session,
            heartbeat_interval=heartbeat,
            run_json=self._run_json,
            spec_digest=self._spec_digest,
            pull_wait=pull_wait,
        )

    @functools.cached_property
    def _run_json(self) -> str:
        return json.dumps(self.settings.run_info)

    @functools.cached_property
    def _spec_digest(self) -> str:
        return spec_digest(self.spec)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pb.HeartbeatReply:
        await self._peer(context)
        heartbeat, pull_wait = self.intervals()
        known = self.coordinator.client_of(request.session) is not None
        return pb.HeartbeatReply(known=known, heartbeat_interval=heartbeat, pull_wait=pull_wait)

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveReply:
        await self._session_client(request.session, context)
        await self._offload(self.coordinator.leave, request.session)  # may wait on the round's queue
        return pb.LeaveReply()

    async def PullTask(self, request: pb.PullTaskRequest, context: grpc.aio.ServicerContext) -> None:
        cid, _ = await self._session_client(request.session, context)
        stream: Stream | None = None
        try:
            self.guard.admit_pull(cid)
            with self.guard.stream("pull", thread_safe_cancel(), cid) as stream:
                await self._pull(cid, request, stream, context)
        except LimitExceeded as exc:
            self.guard.warn(cid, "pull", "refused a task pull from %r (%s): %s", cid, context.peer(), exc.reason)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.reason)
        except asyncio.CancelledError:
            if stream is None or stream.aborted is None:
                raise  # the client went away, or the server is stopping
            await context.abort(grpc.StatusCode.CANCELLED, f"cancelled: {stream.aborted}")

    async def _long_poll(self, cid: str, wait: float) -> Task | None:
        """:func:`wait_for_task`, with ``cid`` kept live while it waits."""
        if self._keeper is None:
            self._keeper_loop = asyncio.get_running_loop()
            self._keeper = asyncio.ensure_future(self._keep_polls_alive())
        self._polling[cid] = self._polling.get(cid, 0) + 1
        try:
            return await wait_for_task(self.coordinator, cid, wait)
        finally:
            left = self._polling.pop(cid) - 1
            if left:
                self._polling[cid] = left

    async def _pull(self, cid: str, request: pb.PullTaskRequest, stream: Stream, context: grpc.aio.ServicerContext) -> None:
        wait = min(max(request.wait_seconds, 0.0), self.intervals()[1])
        with self.guard.long_poll(cid) as may_wait:
            if may_wait and wait > 0:
                task = await self._long_poll(cid, wait)
            else:
                task = await wait_for_task(self.coordinator, cid, 0.0)
        if task is None:
            if self.coordinator.is_shutdown:
                self.coordinator.told_shutdown(cid)
                reply = encode(SHUTDOWN, {})
            elif may_wait or wait == 0.0:
                reply = encode(IDLE, {})
            else:  # too many long polls waiting: come back later
                reply = encode(IDLE, {"retry_after": self.settings.limits.idle_retry_after})
            for chunk in reply:
                await context.write(chunk)
            return
        if task.pulled > self.settings.limits.max_task_downloads:
            raise LimitExceeded(
                f"task downloaded {task.pulled - 1} times already (deploy.max_task_downloads = "
                f"{self.settings.limits.max_task_downloads})"
            )
        sent = 0
        stream.watch()  # a client that stops reading its task is cut off after the idle timeout
        for chunk in encode(task.kind, task.meta, task.body):
            sent += len(chunk.data.payload)
            await context.write(chunk)  # waits while the client's flow-control window is full
            stream.progress()
        stream.watch(False)
        with self._count_lock:
            self.bytes_sent += sent

    async def PushResult(self, request_iterator: AsyncIterator[pb.Chunk], context: grpc.aio.ServicerContext) -> pb.PushReply:
        cn, pem = await self._peer(context)
        stream: Stream | None = None
        try:
            with self.guard.stream("push", thread_safe_cancel(), cn) as stream:  # under TLS counted from the first byte
                return await self._push(request_iterator, cn, pem, stream, context)
        except LimitExceeded as exc:
            self.guard.warn(cn or "?", "push", "refused a result from %r (%s): %s", cn or "?", context.peer(), exc.reason)
            return pb.PushReply(accepted=False, reason=exc.reason)
        except asyncio.CancelledError:
            if stream is None or stream.aborted is None:  # the stream ended under us: the client went away
                client = (stream.who if stream is not None else None) or cn or "?"
                self.guard.warn(client, "push", "a result upload from %r (%s) broke off", client, context.peer())
                raise
            await context.abort(grpc.StatusCode.CANCELLED, f"cancelled: {stream.aborted}")
        raise AssertionError("unreachable")  # context.abort raises

    async def _push(
        self,
        chunks: AsyncIterator[pb.Chunk],
        cn: str | None,
        pem: bytes | None,
        stream: Stream,
        context: grpc.aio.ServicerContext,
    ) -> pb.PushReply:
        who = cn or "?"
        try:
            cid, task_id, msg = await self._receive(chunks, cn, pem, stream)
            who = cid
        except (_Refused, LimitExceeded) as exc:
            client = getattr(exc, "client", None) or stream.who or who
            self.guard.warn(client, "push", "refused a result from %r (%s): %s", client, context.peer(), exc.reason)
            return pb.PushReply(accepted=False, reason=exc.reason)
        except WireError as exc:
            client = stream.who or who
            self.guard.warn(client, "push", "refused a malformed result from %r (%s): %s", client, context.peer(), exc)
            return pb.PushReply(accepted=False, reason=f"malformed: {exc}")
        try:
            return await self._offload(self._hand_over, cid, task_id, msg)
        finally:
            self._decoding.release()
            self.guard.release_upload(task_id, stream)

    def _hand_over(self, cid: str, task_id: str, msg: Message) -> pb.PushReply:
        """Check a decoded result and give it to its round (on the pool: it may wait for the round loop)."""
        try:
            payload = result_payload(self, cid, task_id, msg)
        except _Refused as exc:  # its task closed while it was decoded: nothing to tell the round
            log.warning("discarded result from %r for task %s: %s", cid, task_id[:8], exc.reason)
            return pb.PushReply(accepted=False, reason=exc.reason)
        except (InvalidUpdateError, FedloomError) as exc:
            reason = getattr(exc, "reason", str(exc))
            log.warning("rejected result from %r: %s", cid, reason)
            self.coordinator.deliver(cid, task_id, None, failure=f"rejected: {reason}")
            return pb.PushReply(accepted=False, reason=reason)
        if isinstance(payload, str):  # the client reports that it failed
            why = self.coordinator.deliver(cid, task_id, None, failure=f"client error: {payload}")
        else:
            why = self.coordinator.deliver(cid, task_id, payload)
        if why is not None:
            log.warning("discarded result from %r for task %s: %s", cid, task_id[:8], why)
            return pb.PushReply(accepted=False, reason=why)
        return pb.PushReply(accepted=True)

    # ----------------------------------------------------------- results
    async def _receive(
        self, chunks: AsyncIterator[pb.Chunk], cn: str | None, pem: bytes | None, stream: Stream
    ) -> tuple[str, str, Message]:
        """Decode a pushed result, checking who sends it before reading the data.

        The stream is watched from its first byte (a slowloris before the header is cut off),
        counted against its client, and must be the only upload of its task; the decoder slot
        is taken when the first data chunk arrives and released on any failure here. Data
        chunks are checked (CRC-32, SHA-256) and copied on the pool, not on the event loop.
        """
        dec = Decoder(max_bytes=max(3 * self._param_bytes + (1 << 20), self.settings.max_message_bytes), kinds=CLIENT_KINDS)
        it = aiter(chunks)
        stream.watch()
        first = await anext(it, None)
        if first is None:
            raise WireError("empty stream: no header")
        if first.ByteSize() > LOOP_HEADER_BYTES:  # a large metadata document is parsed off the loop
            await self._offload(dec.feed, first)
        else:
            dec.feed(first)
        header = dec.header
        assert header is not None
        meta = json.loads(header.meta_json or "{}")
        session, task_id = meta.get("session"), meta.get("task_id")
        if not isinstance(session, str) or not isinstance(task_id, str):
            raise _Refused("result metadata needs a session and a task_id")
        cid = self.coordinator.client_of(session)
        if cid is None:
            raise _Refused("unknown session")
        if cn is not None and cn != cid:
            raise _Refused(f"certificate {cn!r} sent a result for client {cid!r}")
        why = self.coordinator.outstanding(cid, task_id)
        if why is not None:
            raise _Refused(why, cid)
        self.guard.assign(stream, cid)
        self.guard.claim_upload(task_id, stream)
        stream.alive = lambda: self.coordinator.outstanding(cid, task_id) is None
        stream.on_abort = lambda why: self.coordinator.fail(task_id, f"upload cut off: {why}")
        received = 0
        slot = False
        last_touch = time.monotonic()

        def waiting() -> None:  # waiting for a slot is our doing, not the client's
            self.coordinator.touch(cid)
            stream.progress()

        try:
            async for chunk in it:
                stream.progress(len(chunk.data.payload))
                is_data = chunk.WhichOneof("body") == "data"
                if not slot and is_data:
                    await self._decoding.acquire(waiting=waiting)
                    slot = True
                    stream.took_slot()
                    stream.progress(len(chunk.data.payload))
                received += len(chunk.data.payload)
                if is_data:
                    await self._offload(dec.feed, chunk)
                else:
                    dec.feed(chunk)
                now = time.monotonic()
                if now - last_touch > 0.5:  # an upload in progress is a sign of life (slow links)
                    self.coordinator.touch(cid)
                    last_touch = now
            stream.watch(False)
            msg = dec.finish()
            with self._count_lock:
                self.bytes_received += received
            if pem is not None and not await self._offload(certs.verify, pem, msg.signature, msg.signed):
                raise _Refused("bad signature (forged or tampered result)", cid)
            if not slot:  # a message without data (a failure report) still holds a slot while handed over
                await self._decoding.acquire(waiting=lambda: self.coordinator.touch(cid))
                slot = True
        except BaseException:
            if slot:
                self._decoding.release()
            self.guard.release_upload(task_id, stream)
            raise
        return cid, task_id, msg  # the decoder slot stays held until the result is delivered


def start_server(
    service: FleetService,
    address: str,
    *,
    credentials: certs.ServerCredentials | None,
    max_workers: int = 256,
) -> tuple[FleetServer, int]:
    """Start a ``grpc.aio`` server for ``service`` on ``address`` (``host:port``, port 0 = any); return it and its port.

    ``credentials`` None means plaintext (insecure mode). The server's event loop runs in a
    thread of its own; ``max_workers`` is the size of the thread pool that decodes, checks
    and hands over results (threads are started as needed: at most ``max_decoding`` of
    them hold a decoder at once). Waiting calls hold no thread, so it does not bound the
    number of clients. ``stop(grace)`` on the returned server returns an event set once
    it has stopped, like ``grpc.Server.stop``.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="fleet")
    service.bind(pool)
    creds = None
    if credentials is not None:
        creds = grpc.ssl_server_credentials(
            [(credentials.key_pem, credentials.cert_pem)],
            root_certificates=credentials.ca_pem,
            require_client_auth=True,
        )
    server = FleetServer(
        lambda s: pb_grpc.add_FleetServicer_to_server(service, s),
        address,
        credentials=creds,
        options=GRPC_OPTIONS + SERVER_OPTIONS,
        pool=pool,
    )
    try:
        server.start()
    except BaseException:
        pool.shutdown(wait=False)
        raise
    return server, server.port
