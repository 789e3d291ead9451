"""The asyncio server: waiting calls hold no thread, the pool stays small, the limits still hold.

A server whose pool has ONE thread and ONE decoder slot serves hundreds of concurrent long
polls (each woken by the coordinator when its task is posted, not by a timeout), caps the
long polls that may wait at exactly ``max_long_polls``, and keeps its decoder slots exact
when waiters are cancelled. The clients are plain gRPC calls on one channel, started all
at once and read afterwards, so the test itself needs no thread per client either.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from torch import nn

from fedloom.core.errors import FedloomError
from fedloom.core.params import ParamSpec
from fedloom.engines.coordinator import Coordinator
from fedloom.server.aio import FleetServer, Slots, wait_for_task
from fedloom.server.limits import Limits
from fedloom.server.service import FleetService, ServiceSettings, start_server
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.transport.wire import Message, decode, encode_body

SPEC = ParamSpec.from_module(nn.Linear(3, 2))  # 8 values
CROWD = 300
WAIT_S = 30.0  # far longer than the test may take: a pull answered early was woken, not timed out


@dataclass
class Env:
    coord: Coordinator
    service: FleetService
    server: FleetServer
    port: int


def _env(limits: Limits) -> Env:
    coord = Coordinator(heartbeat_timeout=60)
    settings = ServiceSettings(run_info={}, secure=False, max_pull_wait=WAIT_S, max_decoding=1, limits=limits)
    service = FleetService(coord, spec=SPEC, dtype=torch.float32, settings=settings)
    server, port = start_server(service, "127.0.0.1:0", credentials=None, max_workers=1)
    return Env(coord, service, server, port)


@pytest.fixture
def env() -> Iterator[Env]:
    e = _env(Limits(register_burst=1000, pull_burst=1000, log_every=0))
    yield e
    e.coord.shutdown()
    assert e.server.stop(0).wait(10)
    e.service.close()


def _fleet_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("fleet_"))


def _register(stub: pb_grpc.FleetStub, names: list[str]) -> list[str]:
    futures = [stub.Register.future(pb.RegisterRequest(client_id=n, num_examples=5), timeout=30) for n in names]
    return [f.result().session for f in futures]


def _start_pulls(stub: pb_grpc.FleetStub, sessions: list[str], wait: float) -> list[grpc.Call]:
    """Start one long poll per session: a call is sent when made, read when iterated (no thread per call)."""
    return [stub.PullTask(pb.PullTaskRequest(session=s, wait_seconds=wait), timeout=wait + 30) for s in sessions]


def _read(call: grpc.Call) -> Message:
    return decode(call, max_bytes=1 << 20)  # type: ignore[arg-type]


def _wait_until(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_hundreds_of_long_polls_wait_on_a_one_thread_pool_and_all_get_their_tasks(env: Env) -> None:
    names = [f"site-{i:03d}" for i in range(CROWD)]
    stub = pb_grpc.FleetStub(grpc.insecure_channel(f"127.0.0.1:{env.port}"))  # one connection, CROWD streams
    sessions = _register(stub, names)
    pulls = _start_pulls(stub, sessions, WAIT_S)
    _wait_until(lambda: env.service.guard.long_polls == CROWD)  # every pull is waiting on the server at once ...
    assert _fleet_threads() <= 1  # ... and no more than the pool's one thread exists
    t0 = time.monotonic()
    body = encode_body({"params": torch.arange(8, dtype=torch.float32)})
    collector = env.coord.post([(n, "task", {"round": 1, "seed": i}, body) for i, n in enumerate(names)], deadline=t0 + 60)
    msgs = [_read(c) for c in pulls]
    woken_after = time.monotonic() - t0
    assert [m.kind for m in msgs] == ["task"] * CROWD
    assert [m.meta["seed"] for m in msgs] == list(range(CROWD))  # each client got its own task
    assert {m.meta["task_id"] for m in msgs} == set(collector.task_ids)
    assert all(torch.equal(m.tensors["params"], torch.arange(8, dtype=torch.float32)) for m in msgs)
    assert woken_after < WAIT_S / 3  # woken by the post, not by the end of the wait
    assert env.service.guard.long_polls == 0
    assert env.service.bytes_sent == CROWD * 8 * 4


def test_long_polls_past_the_cap_are_answered_at_once_with_a_retry_hint() -> None:
    e = _env(Limits(max_long_polls=3, idle_retry_after=2.0, log_every=0))
    try:
        stub = pb_grpc.FleetStub(grpc.insecure_channel(f"127.0.0.1:{e.port}"))
        sessions = _register(stub, [f"c{i}" for i in range(8)])
        waiting = _start_pulls(stub, sessions[:3], WAIT_S)
        _wait_until(lambda: e.service.guard.long_polls == 3)
        t0 = time.monotonic()
        turned_away = [_read(c) for c in _start_pulls(stub, sessions[3:], WAIT_S)]
        assert time.monotonic() - t0 < WAIT_S / 3
        assert e.service.guard.long_polls == 3
        e.coord.shutdown()  # the run ends: the waiting ones are told at once
        told = [_read(c) for c in waiting]
        assert time.monotonic() - t0 < WAIT_S / 3
        assert [(m.kind, m.meta) for m in turned_away] == [("idle", {"retry_after": 2.0})] * 5
        assert [m.kind for m in told] == ["shutdown"] * 3
        assert e.service.guard.long_polls == 0
    finally:
        e.coord.shutdown()
        e.server.stop(0).wait(10)
        e.service.close()


def test_a_busy_decoder_slot_does_not_stall_other_calls(env: Env) -> None:
    """The one slot held by a stalled upload; registrations, heartbeats and pulls are still answered."""
    from fedloom.transport.wire import encode

    stall = threading.Event()
    stub = pb_grpc.FleetStub(grpc.insecure_channel(f"127.0.0.1:{env.port}"))
    session = stub.Register(pb.RegisterRequest(client_id="slow", num_examples=5), timeout=10).session
    env.coord.post([("slow", "task", {"round": 1, "seed": 0}, encode_body({"params": torch.zeros(8)}))], deadline=time.monotonic() + 60)
    tid = decode(stub.PullTask(pb.PullTaskRequest(session=session, wait_seconds=1), timeout=10), max_bytes=1 << 20).meta["task_id"]
    meta = {"session": session, "task_id": tid, "round": 1, "num_examples": 5, "num_steps": 1, "metrics": {}}
    chunks = list(encode("update", meta, {"delta": torch.zeros(8)}, chunk_bytes=8))

    def upload() -> Iterator[pb.Chunk]:
        yield from chunks[:2]  # header and the first data chunk: the slot is taken
        stall.wait(20)
        yield from chunks[2:]

    fut = stub.PushResult.future(upload(), timeout=30)
    try:
        deadline = time.monotonic() + 10
        while env.service.decoders_free != 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        t0 = time.monotonic()
        other = stub.Register(pb.RegisterRequest(client_id="other", num_examples=5), timeout=5).session
        assert stub.Heartbeat(pb.HeartbeatRequest(session=other), timeout=5).known
        idle = decode(stub.PullTask(pb.PullTaskRequest(session=other, wait_seconds=0), timeout=5), max_bytes=1 << 20)
        assert idle.kind == "idle" and time.monotonic() - t0 < 5
    finally:
        stall.set()
    assert fut.result(timeout=10).accepted
    assert env.service.decoders_free == 1


def test_an_address_it_cannot_listen_on_is_one_clear_error() -> None:
    coord = Coordinator()
    service = FleetService(coord, spec=SPEC, dtype=torch.float32, settings=ServiceSettings(run_info={}, secure=False))
    try:
        with pytest.raises(FedloomError, match=r"cannot listen on 192\.0\.2\.1:0"):
            start_server(service, "192.0.2.1:0", credentials=None)
    finally:
        service.close()


# ---------------------------------------------------------------- the pieces
def test_slots_stay_exact_when_waiters_are_cancelled() -> None:
    async def main() -> None:
        slots = Slots(1)
        await slots.acquire()
        assert slots.free == 0
        ticks: list[int] = []
        waiter = asyncio.ensure_future(slots.acquire(every=0.01, waiting=lambda: ticks.append(1)))
        await asyncio.sleep(0.05)
        assert ticks and not waiter.done()  # told it waits, periodically
        waiter.cancel()  # cancelled while waiting: it took nothing
        with pytest.raises(asyncio.CancelledError):
            await waiter
        handed = asyncio.ensure_future(slots.acquire())
        after = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # the slot passes to `handed` ...
        handed.cancel()  # ... which is cancelled before it runs: the slot passes on to `after`
        with pytest.raises(asyncio.CancelledError):
            await handed
        await asyncio.wait_for(after, 1)
        assert slots.free == 0
        slots.release()
        assert slots.free == 1
        with pytest.raises(RuntimeError, match="nobody held"):
            slots.release()

    asyncio.run(main())


def test_wait_for_task_is_woken_by_a_post_from_another_thread_and_by_shutdown() -> None:
    coord = Coordinator()
    coord.register("a", num_examples=1)
    coord.register("b", num_examples=1)
    body = encode_body({"params": torch.zeros(2)})

    async def main() -> tuple[object, object, object, float]:
        t0 = time.monotonic()
        none = await wait_for_task(coord, "a", 0.05)  # nothing posted: None when the time is up
        waiting = asyncio.ensure_future(wait_for_task(coord, "a", WAIT_S))
        await asyncio.sleep(0.05)
        threading.Thread(target=coord.post, args=([("a", "task", {"round": 1}, body)],), kwargs={"deadline": t0 + 60}).start()
        task = await asyncio.wait_for(waiting, WAIT_S / 3)
        other = asyncio.ensure_future(wait_for_task(coord, "b", WAIT_S))
        await asyncio.sleep(0.05)
        threading.Thread(target=coord.shutdown).start()
        ended = await asyncio.wait_for(other, WAIT_S / 3)
        return none, task, ended, time.monotonic() - t0

    none, task, ended, took = asyncio.run(main())
    assert none is None and ended is None
    assert task is not None and task.client_id == "a" and task.pulled == 1  # type: ignore[attr-defined]
    assert took < WAIT_S / 3
    assert coord._watchers == {}  # every wait stopped watching


def test_a_cancelled_or_timed_out_wait_stops_watching_and_leaves_no_timer() -> None:
    coord = Coordinator()
    coord.register("a", num_examples=1)

    async def main() -> tuple[object, int]:
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(wait_for_task(coord, "a", WAIT_S))
        await asyncio.sleep(0.05)
        assert set(coord._watchers) == {"a"}  # the waiting poll watches its client
        waiting.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await waiting
        timed_out = await wait_for_task(coord, "a", 0.01)
        return timed_out, len(loop._scheduled)  # type: ignore[attr-defined]

    timed_out, timers = asyncio.run(main())
    assert timed_out is None and coord._watchers == {}
    assert timers == 0  # neither wait left its timer behind
