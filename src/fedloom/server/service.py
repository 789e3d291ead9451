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

What one participant may hold (open calls, uploads per task, long polls, registrations per
second) and how long a stream may sit idle are bounded by :mod:`fedloom.server.limits`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from fedloom.core.errors import FedloomError, InvalidUpdateError
from fedloom.core.params import ParamSpec
from fedloom.engines.coordinator import Coordinator, RegistrationRefused
from fedloom.server import certs
from fedloom.server.limits import Guard, LimitExceeded, Limits, Stream
from fedloom.transport import codec
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.transport.protocol import (
    CLIENT_KINDS,
    EVAL_RESULT,
    EVALUATE,
    FAILURE,
    PROTOCOL,
    PARTIAL,
    PROTOCOL_REPLY,
    GRPC_OPTIONS,
    IDLE,
    SHUTDOWN,
    TASK,
    UPDATE,
    spec_digest,
)
from fedloom.transport.wire import Decoder, Message, WireError, encode

__all__ = ["GRPC_OPTIONS", "FleetService", "RevocationList", "ServiceSettings", "spec_digest", "start_server"]

log = logging.getLogger("fedloom.server")

# A fixed 1 MiB flow-control window per stream instead of BDP probing: otherwise each push
# stream waiting for a decoder slot buffers megabytes in the transport (grpc/grpc#29836) and
# server memory grows with the number of clients. 1 MiB per round trip still fills a WAN link.
SERVER_OPTIONS = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1 << 20)]


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
    heartbeat_interval: float = 5.0
    max_pull_wait: float = 10.0
    max_decoding: int = 4
    secure: bool = True
    limits: Limits = Limits()
    max_message_bytes: int = 0  # tensor bytes a client message may carry (0: three models' worth); CKKS needs more
    max_examples: int | None = None  # the most training examples any client may declare
    client_max_examples: Mapping[str, int] = field(default_factory=dict)  # per-client caps
    roster: frozenset[str] | None = None  # the only client ids that may register (an edge's clients; a root's edges)
    roster_name: str = "this run"  # whose roster, for the refusal


class _Refused(Exception):
    def __init__(self, reason: str, client: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.client = client


class FleetService(pb_grpc.FleetServicer):
    """Implements the Fleet RPCs on top of a :class:`Coordinator`."""

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
        self._decoding = threading.BoundedSemaphore(settings.max_decoding)
        self._param_bytes = spec.numel * torch.empty((), dtype=dtype).element_size()
        self.bytes_received = 0
        self.bytes_sent = 0
        self._count_lock = threading.Lock()
        self.guard = Guard(settings.limits)
        self.guard.start()

    def close(self) -> None:
        """Stop the idle-stream watchdog (after the gRPC server has stopped)."""
        self.guard.stop()

    # ----------------------------------------------------------- identity
    def _identity(self, context: grpc.ServicerContext) -> tuple[certs.PeerIdentity | None, bytes | None]:
        """(the peer certificate's identity, its PEM) under TLS; (None, None) in insecure mode."""
        if not self.settings.secure:
            return None, None
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        pem = pems[0]
        try:
            ident = certs.peer_identity(pem)
        except certs.CertError as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"unusable certificate: {exc}")
        if ident.serial in self.revoked:
            log.warning("refused revoked certificate %r (serial %x) from %s", ident.common_name, ident.serial, context.peer())
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "certificate revoked")
        return ident, pem

    def _peer(self, context: grpc.ServicerContext) -> tuple[str | None, bytes | None]:
        """(certificate CN, certificate PEM) under TLS; (None, None) in insecure mode."""
        ident, pem = self._identity(context)
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

    def _session_client(self, session: str, context: grpc.ServicerContext) -> tuple[str, bytes | None]:
        cn, pem = self._peer(context)
        cid = self.coordinator.client_of(session)
        if cid is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown session: register again")
        if cn is not None and cn != cid:
            log.warning("certificate %r used the session of client %r: refused", cn, cid)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "session belongs to another client")
        return cid, pem

    # ----------------------------------------------------------- RPCs
    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> pb.RegisterReply:
        ident, _ = self._identity(context)
        cn = ident.common_name if ident is not None else None
        cid = request.client_id
        if cn is not None:
            if cid and cid != cn:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"client id {cid!r} does not match the certificate ({cn!r})")
            cid = cn
        try:
            certs.validate_client_id(cid)
        except certs.CertError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        roster = self.settings.roster
        if roster is not None and cid not in roster:
            reason = f"{cid!r} is not in the roster of {self.settings.roster_name}"
            self.guard.warn(cid, "register", "refused a registration of %r (%s): %s", cid, context.peer(), reason)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        try:
            self.guard.admit_registration(cid)
        except LimitExceeded as exc:
            self.guard.warn(cid, "register", "refused a registration of %r (%s): %s", cid, context.peer(), exc.reason)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.reason)
        cap = self._example_cap(cid, ident)
        if cap is not None and request.num_examples > cap[0]:
            reason = f"{cid!r} declares {request.num_examples} training examples, above its cap of {cap[0]} ({cap[1]})"
            self.guard.warn(cid, "register", "refused a registration of %r (%s): %s", cid, context.peer(), reason)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)
        try:
            session = self.coordinator.register(
                cid, num_examples=request.num_examples, num_test_examples=request.num_test_examples, peer=context.peer()
            )
        except RegistrationRefused as exc:
            self.guard.warn(cid, "register", "refused a registration of %r (%s): %s", cid, context.peer(), exc)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.RegisterReply(
            session=session,
            heartbeat_interval=self.settings.heartbeat_interval,
            run_json=json.dumps(self.settings.run_info),
            spec_digest=spec_digest(self.spec),
        )

    def Heartbeat(self, request: pb.HeartbeatRequest, context: grpc.ServicerContext) -> pb.HeartbeatReply:
        self._peer(context)
        return pb.HeartbeatReply(known=self.coordinator.client_of(request.session) is not None)

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        self._session_client(request.session, context)
        self.coordinator.leave(request.session)
        return pb.LeaveReply()

    def PullTask(self, request: pb.PullTaskRequest, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        cid, _ = self._session_client(request.session, context)
        try:
            self.guard.admit_pull(cid)
            with self.guard.stream("pull", context.cancel, cid) as stream:
                yield from self._pull(cid, request, stream)
        except LimitExceeded as exc:
            self.guard.warn(cid, "pull", "refused a task pull from %r (%s): %s", cid, context.peer(), exc.reason)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.reason)

    def _pull(self, cid: str, request: pb.PullTaskRequest, stream: Stream) -> Iterator[pb.Chunk]:
        wait = min(max(request.wait_seconds, 0.0), self.settings.max_pull_wait)
        with self.guard.long_poll(cid) as may_wait:
            task = self.coordinator.pull(cid, wait if may_wait else 0.0)
        if task is None:
            if self.coordinator.is_shutdown:
                self.coordinator.told_shutdown(cid)
                yield from encode(SHUTDOWN, {})
            elif may_wait or wait == 0.0:
                yield from encode(IDLE, {})
            else:  # too many long polls waiting: come back later rather than hold a thread
                yield from encode(IDLE, {"retry_after": self.settings.limits.idle_retry_after})
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
            yield chunk
            stream.progress()
        stream.watch(False)
        with self._count_lock:
            self.bytes_sent += sent

    def PushResult(self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext) -> pb.PushReply:
        cn, pem = self._peer(context)
        try:
            with self.guard.stream("push", context.cancel, cn) as stream:  # under TLS counted from the first byte
                return self._push(request_iterator, cn, pem, stream, context)
        except LimitExceeded as exc:
            self.guard.warn(cn or "?", "push", "refused a result from %r (%s): %s", cn or "?", context.peer(), exc.reason)
            return pb.PushReply(accepted=False, reason=exc.reason)

    def _push(
        self, chunks: Iterator[pb.Chunk], cn: str | None, pem: bytes | None, stream: Stream, context: grpc.ServicerContext
    ) -> pb.PushReply:
        who = cn or "?"
        try:
            cid, task_id, msg = self._receive(chunks, cn, pem, stream)
            who = cid
        except (_Refused, LimitExceeded) as exc:
            client = getattr(exc, "client", None) or stream.who or who
            self.guard.warn(client, "push", "refused a result from %r (%s): %s", client, context.peer(), exc.reason)
            return pb.PushReply(accepted=False, reason=exc.reason)
        except WireError as exc:
            client = stream.who or who
            self.guard.warn(client, "push", "refused a malformed result from %r (%s): %s", client, context.peer(), exc)
            return pb.PushReply(accepted=False, reason=f"malformed: {exc}")
        except grpc.RpcError:  # the stream ended under us: the client went away, or the watchdog cut it
            if stream.aborted is None:
                client = stream.who or who
                self.guard.warn(client, "push", "a result upload from %r (%s) broke off", client, context.peer())
            return pb.PushReply(accepted=False, reason=f"cancelled: {stream.aborted or 'stream broke off'}")
        try:
            return self._hand_over(cid, task_id, msg)
        finally:
            self._decoding.release()
            self.guard.release_upload(task_id, stream)

    def _hand_over(self, cid: str, task_id: str, msg: Message) -> pb.PushReply:
        try:
            payload = self._payload(cid, task_id, msg)
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
    def _receive(
        self, chunks: Iterator[pb.Chunk], cn: str | None, pem: bytes | None, stream: Stream
    ) -> tuple[str, str, Message]:
        """Decode a pushed result, checking who sends it before reading the data.

        The stream is watched from its first byte (a slowloris before the header is cut off),
        counted against its client, and must be the only upload of its task; the decoder slot
        is taken when the first data chunk arrives and released on any failure here.
        """
        dec = Decoder(max_bytes=max(3 * self._param_bytes + (1 << 20), self.settings.max_message_bytes), kinds=CLIENT_KINDS)
        it = iter(chunks)
        stream.watch()
        first = next(it, None)
        if first is None:
            raise WireError("empty stream: no header")
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
        try:
            for chunk in it:
                stream.progress(len(chunk.data.payload))
                if not slot and chunk.WhichOneof("body") == "data":
                    while not self._decoding.acquire(timeout=0.5):  # waiting for a slot is our doing, not the client's
                        self.coordinator.touch(cid)
                        stream.progress()
                    slot = True
                    stream.took_slot()
                    stream.progress(len(chunk.data.payload))
                received += len(chunk.data.payload)
                dec.feed(chunk)
                now = time.monotonic()
                if now - last_touch > 0.5:  # an upload in progress is a sign of life (slow links)
                    self.coordinator.touch(cid)
                    last_touch = now
            stream.watch(False)
            msg = dec.finish()
            with self._count_lock:
                self.bytes_received += received
            if pem is not None and not certs.verify(pem, msg.signature, msg.signed):
                raise _Refused("bad signature (forged or tampered result)", cid)
            if not slot:  # a message without data (a failure report) still holds a slot while handed over
                while not self._decoding.acquire(timeout=0.5):
                    self.coordinator.touch(cid)
                slot = True
        except BaseException:
            if slot:
                self._decoding.release()
            self.guard.release_upload(task_id, stream)
            raise
        return cid, task_id, msg  # the decoder slot stays held until the result is delivered

    def _payload(self, cid: str, task_id: str, msg: Message) -> Any:
        meta = msg.meta
        if msg.kind == FAILURE:
            return codec.decode_failure(meta)
        task = self.coordinator.task(task_id)
        if task is None:
            raise _Refused("task closed")
        expected = {TASK: UPDATE, EVALUATE: EVAL_RESULT, PROTOCOL: PROTOCOL_REPLY}[task.kind]
        if msg.kind == PARTIAL and task.kind == TASK:  # an edge aggregator's answer (hierarchical FL)
            part = codec.decode_partial(meta, msg.tensors, client_id=cid, round=task.meta["round"])
            part.validate(numel=self.spec.numel)
            return part
        if msg.kind != expected:
            raise InvalidUpdateError(f"a {task.kind} task needs a {expected!r} message, got {msg.kind!r}", client_id=cid)
        registered = self.coordinator.info(cid)
        if msg.kind == PROTOCOL_REPLY:  # the sender is the session's client; the protocol's server checks the rest
            return codec.decode_protocol(meta, msg.tensors, client_id=cid)
        if msg.kind == EVAL_RESULT:
            n, metrics = codec.decode_eval_result(
                meta, client_id=cid, max_examples=registered.num_test_examples if registered is not None else None
            )
            return cid, n, metrics
        limit = registered.num_examples if registered else None
        update = codec.decode_update(meta, msg.tensors, client_id=cid, round=task.meta["round"])
        if update.payload is not None:
            # An encoded update: the header is checked here; the round loop's pipeline (the
            # stage that names the codec) checks every payload tensor and decodes it.
            update.validate_header(max_examples=limit)
        else:
            update.validate(numel=self.spec.numel, dtype=self.dtype, max_examples=limit)
        return update


def start_server(
    service: FleetService,
    address: str,
    *,
    credentials: certs.ServerCredentials | None,
    max_workers: int = 256,
) -> tuple[grpc.Server, int]:
    """Start a gRPC server for ``service`` on ``address`` (``host:port``, port 0 = any); return it and its port.

    ``credentials`` None means plaintext (insecure mode). Long polls hold a worker thread
    each, so ``max_workers`` should exceed the number of clients.
    """
    server = grpc.server(
        ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fleet"), options=GRPC_OPTIONS + SERVER_OPTIONS
    )
    pb_grpc.add_FleetServicer_to_server(service, server)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            creds = grpc.ssl_server_credentials(
                [(credentials.key_pem, credentials.cert_pem)],
                root_certificates=credentials.ca_pem,
                require_client_auth=True,
            )
            port = server.add_secure_port(address, creds)
    except RuntimeError as exc:
        raise FedloomError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise FedloomError(f"cannot listen on {address} (address in use or invalid)")
    server.start()
    return server, port
