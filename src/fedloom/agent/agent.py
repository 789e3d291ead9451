"""The client process of a deployment: connect, pull work, train locally, push the result.

:class:`ClientAgent` dials the server (so a site behind a firewall only needs outbound
access), registers, and loops: long-poll for a task, run the same
:func:`~fedloom.client.training.train_local` the simulation engines run, sign and stream
the update back. A background thread heartbeats at the interval the server advertises (it
grows with the server's number of clients, :mod:`fedloom.server.control`), and pauses while
a long poll waits if the server says an open poll keeps the client live; the long poll asks
for the wait the server advertises. If the server goes away (crash, restart,
network cut) the agent reconnects with exponential backoff and registers again, up to
``give_up_after`` seconds without contact; it stops when the server says the run is over.
Client state that must survive rounds (SCAFFOLD's c_i) stays in the agent.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import grpc
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from fedloom.client.evaluate import evaluate_personal, evaluate_vector
from fedloom.client.training import personal_instruction, train_local
from fedloom.core.errors import ConfigError, FedloomError, PayloadError
from fedloom.core.params import ParamSpec
from fedloom.core.types import Payload
from fedloom.data.base import ClientData, TaskSpec
from fedloom.models.registry import build_model
from fedloom.pipeline import StageContext, build_stage, finish_clients
from fedloom.secure.host import ProtocolClients
from fedloom.store.checkpoint import atomic_write
from fedloom.transport import codec
from fedloom.transport.credentials import load_client_credentials
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.transport.protocol import (
    EVAL_RESULT,
    EVALUATE,
    FAILURE,
    GRPC_OPTIONS,
    IDLE,
    PROTOCOL,
    PROTOCOL_REPLY,
    SERVER_KINDS,
    SHUTDOWN,
    UPDATE,
    spec_digest,
)
from fedloom.transport.signing import sign as sign_result
from fedloom.transport.wire import Message, WireError, decode, encode

__all__ = ["AgentError", "AgentOptions", "AgentReport", "ClientAgent", "task_from_dict"]

log = logging.getLogger("fedloom.client")

# Results go up in 256 KiB messages: the server counts progress per message and cuts off a
# stream idle for deploy.stream_idle_timeout (60 s), so this keeps links down to ~4.4 kB/s alive.
UPLOAD_CHUNK_BYTES = 256 << 10
MAX_ANNOUNCED_BYTES = 16 << 30  # the most a server may say one message holds (16 GiB)

_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}


def _version() -> str:
    try:
        return version("fedloom")
    except PackageNotFoundError:
        return "unknown"


class AgentError(FedloomError):
    """The client cannot go on (refused credentials, incompatible model, server gone for good)."""


@dataclass(frozen=True)
class AgentOptions:
    """How a client connects. ``credentials`` is a directory from ``fedloom certs client``;
    None means insecure mode, where ``client_id`` must be given."""

    server: str
    credentials: Path | None = None
    client_id: str | None = None
    device: str = "cpu"
    pull_wait: float = 10.0  # long-poll wait when the server advertises none (an older server)
    retry_initial: float = 0.2
    retry_max: float = 5.0
    give_up_after: float = 300.0
    server_name: str | None = None  # TLS name to check if ``server`` is an address not in the certificate
    state_file: Path | None = None  # client state (SCAFFOLD's c_i, an error-feedback residual) kept across restarts
    delay: float = 0.0  # seconds added to every training task: emulates a slow device (benchmarks, tests)


@dataclass
class AgentReport:
    """What an agent did before it stopped."""

    tasks: int = 0
    evaluations: int = 0
    refused: list[str] = field(default_factory=list)
    reconnects: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    wire_bytes_up: int = 0
    wire_bytes_down: int = 0
    """Serialized gRPC message bytes of the results sent and tasks received (header, chunks with
    their checksums, trailer): ``bytes_up``/``bytes_down`` (tensor data only) plus framing."""


def task_from_dict(data: dict[str, Any]) -> TaskSpec:
    """A :class:`TaskSpec` from its JSON form (lists back to tuples)."""
    d = dict(data)
    for key in ("input_shape", "metrics", "feature_names"):
        if key in d:
            d[key] = tuple(d[key])
    return TaskSpec(**d)


class ClientAgent:
    """One data holder's process (see the module docstring)."""

    def __init__(self, data: ClientData | None, options: AgentOptions) -> None:
        self.data = data  # None: a process that does not train itself (an edge aggregator overrides _work)
        self.options = options
        self.creds = load_client_credentials(options.credentials) if options.credentials is not None else None
        if self.creds is None and not options.client_id:
            raise AgentError("insecure mode needs a client id (--client-id)")
        if self.creds is not None and options.client_id and options.client_id != self.creds.client_id:
            raise AgentError(f"--client-id {options.client_id!r} differs from the certificate's {self.creds.client_id!r}")
        self.client_id = self.creds.client_id if self.creds is not None else str(options.client_id)
        self.device = torch.device(options.device)
        self.state: dict[str, torch.Tensor] = self._load_state(options.state_file)
        self.report = AgentReport()
        self._session: str | None = None
        self._model: nn.Module | None = None
        self._spec: ParamSpec | None = None
        self._task: TaskSpec | None = None
        self._stop = threading.Event()
        self._hb_channel: grpc.Channel | None = None
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.FleetStub | None = None
        self._hb_interval = 0.5  # until the server says otherwise at registration
        self._pull_wait = 0.0  # the server's advertised long-poll wait (0: none, use options.pull_wait)
        self._polling = False  # a long poll is waiting (the server keeps the client live meanwhile)
        self._max_message_bytes = 0
        self._protocols = ProtocolClients()  # this client's side of secure aggregation (one round at a time)

    # ------------------------------------------------------------ connection
    def _open_channel(self, *extra: tuple[str, Any]) -> grpc.Channel:
        opts = [*GRPC_OPTIONS, *extra]
        if self.creds is None:
            return grpc.insecure_channel(self.options.server, options=opts)
        tls = grpc.ssl_channel_credentials(
            root_certificates=self.creds.ca_pem, private_key=self.creds.key_pem, certificate_chain=self.creds.cert_pem
        )
        if self.options.server_name:
            opts.append(("grpc.ssl_target_name_override", self.options.server_name))
        return grpc.secure_channel(self.options.server, tls, options=opts)

    def _connect(self) -> pb_grpc.FleetStub:
        if self._stub is None:
            self._channel = self._open_channel()
            self._stub = pb_grpc.FleetStub(self._channel)
        return self._stub

    def _register(self) -> None:
        stub = self._connect()
        num, test_n = self._registration_counts()
        reply = stub.Register(
            pb.RegisterRequest(client_id=self.client_id, num_examples=num, num_test_examples=test_n, version=_version()),
            timeout=30,
        )
        info = json.loads(reply.run_json)
        limit = info.get("max_message_bytes", 0)
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit <= MAX_ANNOUNCED_BYTES:
            self._max_message_bytes = limit  # e.g. a model's worth of CKKS ciphertexts to decrypt
        if self._model is None:
            self._task = task_from_dict(info["task"])
            self._model = build_model(info["model"]["name"], self._task, **info["model"].get("options", {})).to(self.device)
            self._spec = ParamSpec.from_module(self._model)
        assert self._spec is not None
        if spec_digest(self._spec) != reply.spec_digest:
            raise AgentError("the server's model layout differs from the one this client built (version mismatch?)")
        self._session = reply.session
        self._hb_interval = max(0.5, reply.heartbeat_interval)
        self._pull_wait = max(0.0, reply.pull_wait)
        log.info("client %r registered with %s", self.client_id, self.options.server)

    def _registration_counts(self) -> tuple[int, int]:
        """The training and test examples this client declares when it registers."""
        assert self.data is not None
        return self.data.num_examples, len(self.data.test) if self.data.test is not None else 0

    def _heartbeat_loop(self) -> None:
        # Its own TCP connection, so heartbeats never queue behind a model transfer on a slow link.
        channel = self._hb_channel = self._open_channel(("grpc.use_local_subchannel_pool", 1))
        stub = pb_grpc.FleetStub(channel)
        try:
            while not self._stop.wait(self._hb_interval):
                session = self._session
                if session is None or (self._polling and self._pull_wait > 0):
                    continue  # an open long poll keeps this client live on a server that advertises its wait
                try:
                    reply = stub.Heartbeat(pb.HeartbeatRequest(session=session), timeout=10)
                    if not reply.known:
                        if self._session == session:
                            self._session = None  # the main loop registers again
                    else:
                        if reply.heartbeat_interval > 0:
                            self._hb_interval = max(0.5, reply.heartbeat_interval)
                        if reply.pull_wait > 0:
                            self._pull_wait = reply.pull_wait
                except grpc.RpcError:
                    pass  # the main loop handles reconnection
        finally:
            channel.close()

    # ------------------------------------------------------------ main loop
    def run(self, *, max_tasks: int | None = None) -> AgentReport:
        """Serve the run until the server ends it (or ``max_tasks`` training tasks are done)."""
        hb = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        hb.start()
        delay = self.options.retry_initial
        last_contact = time.monotonic()
        try:
            while max_tasks is None or self.report.tasks < max_tasks:
                try:
                    if self._session is None:
                        self._register()
                        delay = self.options.retry_initial
                    if not self._serve_one():
                        break
                    delay = self.options.retry_initial
                    last_contact = time.monotonic()
                except grpc.RpcError as exc:
                    code = exc.code()
                    if code == grpc.StatusCode.NOT_FOUND:
                        self._session = None
                        continue
                    if code not in _RETRYABLE:
                        raise AgentError(f"server refused this client: {code.name}: {exc.details()}") from None
                    if time.monotonic() - last_contact > self.options.give_up_after:
                        raise AgentError(
                            f"no contact with {self.options.server} for {self.options.give_up_after:.0f} s: giving up"
                        ) from None
                    log.info("server unreachable (%s); retrying in %.1f s", code.name, delay)
                    self._reset_channel()
                    self.report.reconnects += 1
                    time.sleep(delay * (0.5 + random.random()))
                    delay = min(delay * 2, self.options.retry_max)
        finally:
            self._stop.set()
            self._leave()
            # Close the heartbeat channel (cancelling a heartbeat in flight on a dead link) and wait
            # for its thread: a daemon thread still inside gRPC when the interpreter exits can abort
            # the process (SIGABRT) after a run that ended well.
            hb_channel = self._hb_channel
            if hb_channel is not None:
                hb_channel.close()
            hb.join(timeout=15)
        return self.report

    def _reset_channel(self) -> None:
        """Drop the connection and the session (the next call registers again)."""
        self._fresh_connection()
        self._session = None

    def _leave(self) -> None:
        if self._stub is not None and self._session is not None:
            try:
                self._stub.Leave(pb.LeaveRequest(session=self._session), timeout=5)
            except grpc.RpcError:
                pass
        if self._channel is not None:
            self._channel.close()

    def _serve_one(self) -> bool:
        """Pull one message and act on it; False when the run is over."""
        stub = self._connect()
        assert self._spec is not None and self._session is not None
        wait = self._pull_wait or self.options.pull_wait
        max_bytes = max(2 * self._spec.numel * 8 + (1 << 20), self._max_message_bytes)
        chunks = stub.PullTask(pb.PullTaskRequest(session=self._session, wait_seconds=wait), timeout=wait + 120)
        seen = [0]

        def counted(it: Iterator[pb.Chunk]) -> Iterator[pb.Chunk]:
            for c in it:
                self._polling = False  # the wait is over: heartbeats resume during the download and the work
                seen[0] += c.ByteSize()
                yield c

        self._polling = True
        try:
            msg = decode(counted(chunks), max_bytes=max_bytes, kinds=SERVER_KINDS)
        except WireError as exc:
            log.warning("malformed message from the server (%s); pulling again", exc)
            return True
        finally:
            self._polling = False
        if msg.kind == IDLE:
            retry = msg.meta.get("retry_after")
            if isinstance(retry, (int, float)) and 0 < retry <= 60:  # the server has too many waiting pulls
                time.sleep(float(retry) * (0.5 + random.random()))
            return True
        if msg.kind == SHUTDOWN:
            log.info("the server ended the run")
            self._session = None  # the run's end closed the session: no Leave (10,000 of them would arrive at once)
            return False
        self.report.bytes_down += sum(t.numel() * t.element_size() for t in msg.tensors.values())
        self.report.wire_bytes_down += seen[0]
        try:
            kind, meta, tensors = self._work(msg)
        except (FedloomError, ValueError, TypeError, KeyError, RuntimeError) as exc:
            log.warning("task failed: %s", exc)
            kind, meta, tensors = FAILURE, codec.encode_failure(f"{type(exc).__name__}: {exc}"), {}
        meta = {**meta, "session": self._session, "task_id": msg.meta.get("task_id", "")}
        creds = self.creds
        sign = (lambda data: sign_result(creds.key_pem, data)) if creds is not None else None
        chunks = encode(kind, meta, tensors, sign=sign, chunk_bytes=UPLOAD_CHUNK_BYTES)
        reply = stub.PushResult(self._counted(chunks), timeout=600)
        if not reply.accepted:
            log.warning("server refused our %s: %s", kind, reply.reason)
            self.report.refused.append(reply.reason)
        self._fresh_connection()
        return True

    def _fresh_connection(self) -> None:
        """Close the connection that carried the task and its result; the next call opens a new one (same session).

        The server's gRPC transport keeps memory on a connection that carried a model-sized
        transfer (~0.4 MB per connection for the McMahan CNN, measured with bench/deploy.py;
        not returned while the connection lives): an idle client that keeps that connection
        open costs the server that much until the run ends, so 10,000 clients sampled 100 per
        round made the server grow ~40 MB a round. A new connection per task costs one
        handshake per round, made during the next long poll (off the round's critical path).
        """
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    def _counted(self, chunks: Iterator[pb.Chunk]) -> Iterator[pb.Chunk]:
        for c in chunks:
            self.report.bytes_up += len(c.data.payload)
            self.report.wire_bytes_up += c.ByteSize()
            yield c

    @staticmethod
    def _load_state(path: Path | None) -> dict[str, torch.Tensor]:
        """The client state saved by an earlier run of this agent (empty if none yet)."""
        if path is None or not path.exists():
            return {}
        try:
            return dict(safetensors_load(path.read_bytes()))
        except Exception as exc:  # noqa: BLE001 - any unreadable file is one clear error
            raise AgentError(f"cannot read the client state file {str(path)!r}: {exc}") from None

    def _save_state(self) -> None:
        """Persist the client state (atomically: a crash leaves the old or the new file)."""
        path = self.options.state_file
        if path is not None:
            atomic_write(path, safetensors_save({k: v.detach().cpu().contiguous() for k, v in self.state.items()}))

    def _received(self, broadcast: Payload, rnd: int) -> torch.Tensor:
        """The global model a broadcast stage encoded, decoded exactly as the server decoded it.

        The stage is rebuilt from the payload's codec name with its metadata as options (an
        encoding stage that can broadcast records its options there).
        """
        assert self._spec is not None
        try:
            stage = build_stage(broadcast.codec, dict(broadcast.meta), key="broadcast")
            return stage.decode_model(broadcast, StageContext(self._spec, rnd, self._spec.dtype))  # type: ignore[attr-defined]
        except (ConfigError, PayloadError, AttributeError) as exc:
            raise AgentError(f"cannot decode the global model sent as {broadcast.codec!r}: {exc}") from None

    def _work(self, msg: Message) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
        """Do the task in ``msg``; return the result's ``(kind, meta, tensors)``."""
        assert self._spec is not None and self._model is not None and self._task is not None and self.data is not None
        if msg.kind == EVALUATE:
            params = codec.decode_evaluation(msg.meta, msg.tensors)
            personal = codec.decode_personal(msg.meta)
            self._spec.check_vector(params)
            test = self.data.test
            if test is None or len(test) == 0:
                self.report.evaluations += 1
                return EVAL_RESULT, codec.encode_eval_result(0, {}), {}
            if personal is None:
                metrics = evaluate_vector(self._model, self._spec, params.to(self.device), test, self._task)
            else:  # this client's own model: its personal layers, fine-tuned on its data; its state is not changed
                metrics = evaluate_personal(
                    self._model, self._spec, params.to(self.device), self.data.train, test, self._task,
                    personal, self.client_id, self.state,
                )  # fmt: skip
            self.report.evaluations += 1
            return EVAL_RESULT, codec.encode_eval_result(len(test), metrics), {}
        if msg.kind == PROTOCOL:
            pm = codec.decode_protocol(msg.meta, msg.tensors, client_id=self.client_id)
            reply = self._protocols.handle(pm)
            if reply is None:
                return FAILURE, codec.encode_failure(f"secure aggregation refused: {self._protocols.last_error}"), {}
            log.info("round %d: %s %s answered", pm.round, pm.protocol, pm.stage)
            meta, tensors = codec.encode_protocol(reply)
            return PROTOCOL_REPLY, meta, tensors
        task = codec.decode_instruction(msg.meta, msg.tensors)
        ins = task.instruction
        params = task.params if task.broadcast is None else self._received(task.broadcast, ins.round)
        self._spec.check_vector(params)
        g = params.to(self.device)
        ins = replace(ins, client_id=self.client_id, payload={k: v.to(self.device) for k, v in ins.payload.items()})
        if self.options.delay > 0:
            time.sleep(self.options.delay)
        result = train_local(self._model, self._spec, g, self.data.train, ins, client_state=self.state)
        state = result.state
        personal = personal_instruction(ins)
        if personal is not None:  # Ditto: the personal run, only its client state kept
            state = train_local(self._model, self._spec, g, self.data.train, personal, client_state=state).state
        # the instruction's client stages (weighting, compression), as every engine runs them
        ups, states = finish_clients(self._spec, [ins], [result.update], [state])
        self.state = dict(states[0])
        self._save_state()
        up = ups[0]
        if ins.protocol is not None:  # secure aggregation: the update leaves masked
            sealed = self._protocols.seal(ins, up)
            if sealed is None:
                return FAILURE, codec.encode_failure(f"secure aggregation refused: {self._protocols.last_error}"), {}
            up = sealed
            log.info("round %d: %s input answered", ins.round, ins.protocol.protocol)
        self.report.tasks += 1
        log.info("round %d: trained on %d examples (%d steps)", ins.round, up.num_examples, up.num_steps)
        meta, tensors = codec.encode_update(up)
        return UPDATE, meta, tensors
