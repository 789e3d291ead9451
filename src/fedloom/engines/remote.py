"""The ``remote`` engine: a cohort's work done by real client processes over gRPC.

It implements the same :class:`~fedloom.engines.base.Engine` interface as the simulation
engines, so the round loop and the strategies run unchanged. Each round it encodes the
global model once (dense, or the encoded broadcast payload when given one), posts one task
per selected client to the :class:`~fedloom.engines.coordinator.Coordinator`, and yields
updates as clients push them (the gRPC service, :mod:`fedloom.server`, decodes them).
The round's deadline drops stragglers (their late updates are refused with a log line);
clients that leave or stop heartbeating are counted out early instead of waited for.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch

from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, ClientUpdate, Payload, PersonalEval, ProtocolMessage
from fedloom.engines.base import Engine
from fedloom.engines.coordinator import Collector, Coordinator
from fedloom.transport import codec
from fedloom.transport.protocol import PROTOCOL, TASK
from fedloom.transport.wire import Body, encode_body, extend_body

__all__ = ["TASK_CHUNK_BYTES", "RemoteEngine"]

log = logging.getLogger("fedloom.server")

TASK_CHUNK_BYTES = 256 << 10
"""Size of the messages a task is streamed in. A download waiting on its client's flow-control
window holds about one message in the server's transport, so this bounds the server's memory
per concurrent download (a cohort of 100 downloading at once: ~50 MB, not 200 MB at 1 MiB)."""


class RemoteEngine(Engine):
    """Dispatches each cohort to connected clients through ``coordinator``.

    ``round_timeout``: seconds a round waits for updates; ``min_available``: live clients
    needed before a round is selected, waited for up to ``wait_timeout`` seconds.
    ``on_close`` is called by :meth:`close` (it stops the gRPC server); ``port`` is the
    port that server listens on.
    """

    name = "remote"
    live = True

    def __init__(
        self,
        *,
        spec: ParamSpec,
        coordinator: Coordinator,
        round_timeout: float = 600.0,
        min_available: int = 1,
        wait_timeout: float = 600.0,
        chunk_bytes: int = TASK_CHUNK_BYTES,
        on_close: Callable[[], None] | None = None,
        port: int = 0,
    ) -> None:
        super().__init__(spec=spec)
        self.port = port  # where the gRPC server listens (0 if not started by this engine)
        self.coordinator = coordinator
        self.round_timeout = round_timeout
        self.min_available = min_available
        self.wait_timeout = wait_timeout
        self.chunk_bytes = chunk_bytes
        self._on_close = on_close
        self._rejections: dict[str, str] = {}

    def available_clients(self) -> list[str]:
        live = self.coordinator.wait_for_clients(self.min_available, self.wait_timeout)
        if len(live) < self.min_available:
            log.warning("only %d live clients after waiting %.0f s (want %d)", len(live), self.wait_timeout, self.min_available)
        return live

    def clients_now(self) -> list[str]:
        return self.coordinator.live_clients()

    def take_rejections(self) -> dict[str, str]:
        out, self._rejections = self._rejections, {}
        return out

    def _bodies(
        self, global_vec: torch.Tensor | None, broadcast: Payload | None, instructions: Sequence[ClientInstruction]
    ) -> list[Body]:
        """One body per instruction; identical payloads (the common case) share one encoding.

        A protocol message (secure aggregation's per-client input stage) is each client's own:
        it is appended to the shared encoding of the model, which is never encoded twice.
        """
        cache: dict[tuple[int, ...], Body] = {}
        out = []
        for ins in instructions:
            key = tuple(id(v) for v in ins.payload.values())
            if key not in cache:
                shared = codec.instruction_tensors(replace(ins, protocol=None), params=global_vec, broadcast=broadcast)
                cache[key] = encode_body(shared, chunk_bytes=self.chunk_bytes)
            own = codec.protocol_tensors(ins)
            out.append(extend_body(cache[key], own, chunk_bytes=self.chunk_bytes) if own else cache[key])
        return out

    def _collect(
        self, collector: Collector, pending: set[str], what: str, cancel: threading.Event | None = None
    ) -> Iterator[Any]:
        """Yield the results' payloads until every client answered, the deadline passed or ``cancel`` is set."""
        reason = "round complete"
        try:
            while pending:
                if cancel is not None and cancel.is_set():
                    reason = "the run stopped"
                    break
                left = collector.deadline - time.monotonic()
                if left <= 0:
                    reason = f"deadline of {self.round_timeout:.0f} s passed"
                    break
                res = collector.get(min(left, 1.0))
                if res is None:
                    self.coordinator.reap(collector)
                    continue
                pending.discard(res.client_id)
                if res.failure:
                    log.warning("%s: client %r: %s", what, res.client_id, res.failure)
                    if res.failure.startswith("rejected: "):
                        self._rejections[res.client_id] = res.failure.removeprefix("rejected: ")
                    continue
                yield res.payload
        except GeneratorExit:
            reason = "round closed early (enough updates)"
            raise
        finally:
            dropped = self.coordinator.close(collector, reason)
            if dropped:
                log.warning("%s: dropped %d unanswered client(s) %s: %s; late results will be discarded", what, len(dropped), dropped, reason)

    def run_cohort(
        self,
        global_vec: torch.Tensor,
        instructions: Sequence[ClientInstruction],
        *,
        broadcast: Payload | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[ClientUpdate]:
        """Post the cohort's tasks and yield the updates as they arrive.

        With ``broadcast``, the clients receive that encoded payload instead of the dense
        ``global_vec`` (a broadcast stage's encoding of it). Setting ``cancel`` ends the wait
        (buffered rounds: the run stopped with work in flight).
        """
        if not instructions:
            return
        g = None if broadcast is not None else global_vec.detach().cpu()
        bodies = self._bodies(g, broadcast, instructions)
        deadline = time.monotonic() + self.round_timeout
        tasks = [
            (ins.client_id, TASK, codec.instruction_meta(ins, broadcast=broadcast, deadline_s=self.round_timeout), body)
            for ins, body in zip(instructions, bodies, strict=True)
        ]
        collector = self.coordinator.post(tasks, deadline=deadline)
        rnd = instructions[0].round
        yield from self._collect(collector, {ins.client_id for ins in instructions}, f"round {rnd}", cancel)

    def exchange(self, requests: Sequence[ProtocolMessage]) -> Iterator[ProtocolMessage]:
        """Send each protocol message to its client as a ``protocol`` task; yield the replies as they come.

        Clients that do not answer by the round timeout, leave, or stop heartbeating are
        counted out (the protocol treats them as dropped); a refusal arrives as a failure.
        """
        if not requests:
            return
        tasks = []
        for m in requests:
            meta, tensors = codec.encode_protocol(m)
            tasks.append((m.client_id, PROTOCOL, meta, encode_body(tensors, chunk_bytes=self.chunk_bytes)))
        collector = self.coordinator.post(tasks, deadline=time.monotonic() + self.round_timeout)
        what = f"round {requests[0].round} {requests[0].protocol} {requests[0].stage}"
        yield from self._collect(collector, {m.client_id for m in requests}, what)

    def evaluate_clients(
        self, global_vec: torch.Tensor, client_ids: Sequence[str], *, personal: PersonalEval | None = None
    ) -> Iterator[tuple[str, int, dict[str, float]]]:
        if not client_ids:
            return
        g = global_vec.detach().cpu()
        body: Body | None = None
        tasks = []
        for cid in client_ids:
            kind, meta, tensors = codec.encode_evaluation(cid, g, personal)
            if body is None:  # the same tensors for every client: encoded once
                body = encode_body(tensors, chunk_bytes=self.chunk_bytes)
            tasks.append((cid, kind, meta, body))
        collector = self.coordinator.post(tasks, deadline=time.monotonic() + self.round_timeout)
        for cid, n, metrics in self._collect(collector, set(client_ids), "federated evaluation"):
            if n > 0:
                yield cid, n, metrics

    def close(self) -> None:
        self.coordinator.shutdown()
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
