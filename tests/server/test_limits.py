"""Resource attacks on the gRPC service over real mutual TLS: one participant cannot stall a round or starve the server.

Each test plays a hostile client (``eve``) over the wire against a real server with short
limits, and checks that the honest client (``bob``) is served within the round and that
every thread, decoder slot and upload claim the attacker took is given back.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from torch import nn

from fedloom.core.config import DeploySection
from fedloom.core.params import ParamSpec
from fedloom.engines.coordinator import Collector, Coordinator
from fedloom.server import certs
from fedloom.server.deploy import limits as deploy_limits
from fedloom.server.limits import DEFAULT_MAX_LONG_POLLS, Guard, LimitExceeded, Limits
from fedloom.server.service import FleetService, ServiceSettings, start_server
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.transport.wire import decode, encode, encode_body

sys.path.insert(0, str(Path(__file__).parent))
from test_service import Env as TLSEnv  # noqa: E402

SPEC = ParamSpec.from_module(nn.Linear(3, 2))  # 8 values
IDLE_TIMEOUT = 1.0
LIMITS = Limits(
    max_streams_per_client=4, stream_idle_timeout=IDLE_TIMEOUT, max_long_polls=4, register_rate=1.0, register_burst=3
)
CROWD = [f"site-{i:02d}" for i in range(12)]


class Env(TLSEnv):
    """test_service's TLS environment (stubs per identity, keys, registration), with an attacker's helpers."""

    def post(self, who: str, body_values: int = 8) -> Collector:  # type: ignore[override]
        body = encode_body({"params": torch.arange(body_values, dtype=torch.float32)})
        return self.coord.post([(who, "task", {"round": 1, "seed": 7}, body)], deadline=time.monotonic() + 60)

    def task_id(self, stub: pb_grpc.FleetStub, session: str) -> str:
        msg = decode(stub.PullTask(pb.PullTaskRequest(session=session, wait_seconds=2), timeout=10), max_bytes=1 << 26)
        return str(msg.meta["task_id"])

    def update(self, who: str, session: str, task_id: str) -> list[pb.Chunk]:
        meta = {"session": session, "task_id": task_id, "round": 1, "num_examples": 50, "num_steps": 5, "metrics": {}}
        key = self.key(who)
        return list(encode("update", meta, {"delta": torch.full((8,), 0.25)}, sign=lambda b: certs.sign(key, b), chunk_bytes=8))

    def settled(self, who: str) -> bool:
        """Everything ``who`` held is given back: no open call, every decoder slot free."""
        g = self.service.guard
        return g.open_streams(who) == 0 and self.service.decoders_free == self.service.settings.max_decoding


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    pki = tmp_path_factory.mktemp("pki")
    certs.create_ca(pki / "ca")
    certs.issue_server(pki / "ca", pki / "server", hosts=["localhost"])
    for who in ("eve", "bob", "carol", "mallory", "trent", *CROWD):
        certs.issue_client(pki / "ca", pki / "clients" / who, who)
    coord = Coordinator(heartbeat_timeout=30)
    settings = ServiceSettings(run_info={"model": {"name": "linear"}}, max_pull_wait=2.0, limits=LIMITS)
    service = FleetService(coord, spec=SPEC, dtype=torch.float32, settings=settings)
    server, port = start_server(service, "127.0.0.1:0", credentials=certs.load_server_credentials(pki / "server"), max_workers=12)
    yield Env(port, coord, service, pki)
    server.stop(0)
    service.close()


class Stall:
    """A request stream that sends ``chunks`` and then nothing until released."""

    def __init__(self, chunks: list[pb.Chunk]) -> None:
        self.chunks = chunks
        self.release = threading.Event()

    def __iter__(self) -> Iterator[pb.Chunk]:
        yield from self.chunks
        self.release.wait(30)


def _wait_until(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return bool(cond())


def _honest_round(env: Env, who: str = "bob") -> float:
    """Bob registers, pulls his task and uploads: seconds until his update is taken."""
    t0 = time.monotonic()
    stub, session = env.register(who)
    collector = env.post(who)
    tid = env.task_id(stub, session)
    reply = stub.PushResult(iter(env.update(who, session, tid)), timeout=20)
    assert reply.accepted, reply.reason
    assert collector.get(5) is not None
    return time.monotonic() - t0


# ---------------------------------------------------------------- the reported attacks
def test_six_stalled_uploads_for_one_task_do_not_block_the_honest_client(env: Env) -> None:
    stub, session = env.register("eve")
    collector = env.post("eve")
    tid = env.task_id(stub, session)
    header_and_one_chunk = env.update("eve", session, tid)[:2]
    stalls = [Stall(header_and_one_chunk) for _ in range(6)]
    futures = [stub.PushResult.future(iter(s), timeout=20) for s in stalls]
    try:
        refused = []
        for f in futures:  # five are answered at once: a second upload of a task, or past the stream limit
            try:
                reply = f.result(timeout=IDLE_TIMEOUT / 2)
                refused.append(reply.reason)
            except grpc.FutureTimeoutError:
                pass
        assert len(refused) == 5
        assert all(r == "an upload for this task is already in progress" or "calls open" in r for r in refused)
        assert "an upload for this task is already in progress" in refused
        assert _honest_round(env) < 5  # bob is not held up by the one stalled upload
        # the stalled one is cut off after the idle timeout, and that fails eve's task for this
        # round (she cannot stall it again); the round hears why
        assert _wait_until(lambda: env.settled("eve"))
        late = [f for f in futures if f.exception(timeout=5) is not None]
        assert len(late) == 1 and late[0].exception().code() == grpc.StatusCode.CANCELLED
        res = collector.get(5)
        assert res is not None and res.payload is None
        assert res.failure == f"upload cut off: no data for {IDLE_TIMEOUT:g} s (deploy.stream_idle_timeout)"
        reply = stub.PushResult(iter(env.update("eve", session, tid)), timeout=10)
        assert not reply.accepted and reply.reason.startswith("task is closed (upload cut off")
    finally:
        for s in stalls:
            s.release.set()


def test_long_polls_cannot_starve_registration(env: Env) -> None:
    """Twelve sites hammer long polls (4 may wait at once); a new site still registers at once."""
    stop = threading.Event()
    retry_hints = []

    def hammer(who: str) -> None:
        stub, session = env.register(who)
        while not stop.is_set():  # hostile: ignores retry_after and pulls again at once
            try:
                msg = decode(stub.PullTask(pb.PullTaskRequest(session=session, wait_seconds=10), timeout=20), max_bytes=1 << 20)
            except grpc.RpcError:
                continue
            if "retry_after" in msg.meta:
                retry_hints.append(msg.meta["retry_after"])

    threads = [threading.Thread(target=hammer, args=(who,), daemon=True) for who in CROWD]
    for t in threads:
        t.start()
    try:
        assert _wait_until(lambda: env.service.guard.long_polls == LIMITS.max_long_polls)
        t0 = time.monotonic()
        stub = env.stub("carol")
        reply = stub.Register(pb.RegisterRequest(client_id="carol", num_examples=5), timeout=5)
        assert stub.Heartbeat(pb.HeartbeatRequest(session=reply.session), timeout=5).known
        assert time.monotonic() - t0 < 3
        assert _honest_round(env) < 5
        assert env.service.guard.long_polls <= LIMITS.max_long_polls
        assert retry_hints and set(retry_hints) == {LIMITS.idle_retry_after}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)


# ---------------------------------------------------------------- more of the same family
def test_slowloris_before_the_header_is_cut_off_without_taking_a_decoder_slot(env: Env) -> None:
    stub = env.stub("eve")
    stalls = [Stall([]) for _ in range(4)]
    futures = [stub.PushResult.future(iter(s), timeout=20) for s in stalls]
    try:
        assert _wait_until(lambda: env.service.guard.open_streams("eve") == 4)
        assert env.service.decoders_free == env.service.settings.max_decoding
        assert _honest_round(env) < 5
        for f in futures:
            assert f.exception(timeout=10).code() == grpc.StatusCode.CANCELLED
        assert _wait_until(lambda: env.settled("eve"))
    finally:
        for s in stalls:
            s.release.set()


def test_header_claiming_the_maximum_size_then_nothing(env: Env) -> None:
    stub, session = env.register("eve")
    env.post("eve")
    tid = env.task_id(stub, session)
    biggest = 3 * SPEC.numel * 4 + (1 << 20)  # what the server accepts at most, in bytes
    meta = {"session": session, "task_id": tid, "round": 1, "num_examples": 50, "num_steps": 5, "metrics": {}}
    header = next(iter(encode("update", meta, {"delta": torch.zeros(biggest // 4)})))
    assert header.WhichOneof("body") == "header"
    stall = Stall([header])
    fut = stub.PushResult.future(iter(stall), timeout=20)
    try:
        time.sleep(IDLE_TIMEOUT / 2)
        assert env.service.decoders_free == env.service.settings.max_decoding  # no slot, no buffer yet
        assert fut.exception(timeout=10).code() == grpc.StatusCode.CANCELLED
        assert _wait_until(lambda: env.settled("eve"))
    finally:
        stall.release.set()


def test_a_flood_of_garbage_streams_is_refused_and_the_round_goes_on(env: Env) -> None:
    stub, _ = env.register("eve")
    garbage = pb.Chunk(header=pb.Header(kind="update", meta_json="{not json"))
    futures = [stub.PushResult.future(iter([garbage]), timeout=20) for _ in range(40)]
    reasons = []
    for f in futures:
        try:
            reasons.append(f.result(timeout=10).reason)
        except grpc.RpcError as exc:  # noqa: PERF203
            reasons.append(exc.code().name)
    assert len(reasons) == 40 and all(r.startswith("malformed") or "calls open" in r for r in reasons)
    assert _honest_round(env) < 5
    assert _wait_until(lambda: env.settled("eve"))


def test_register_leave_churn_is_rate_limited_per_identity(env: Env) -> None:
    stub = env.stub("carol")
    refused = None
    for _ in range(LIMITS.register_burst + 3):
        try:
            session = stub.Register(pb.RegisterRequest(client_id="carol", num_examples=5), timeout=5).session
            stub.Leave(pb.LeaveRequest(session=session), timeout=5)
        except grpc.RpcError as exc:
            refused = exc
            break
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "registers too often" in (refused.details() or "")
    assert _honest_round(env) < 5  # others are not affected
    time.sleep(1.0 / LIMITS.register_rate + 0.1)  # the bucket refills at the configured rate
    stub.Register(pb.RegisterRequest(client_id="carol", num_examples=5), timeout=5)


def test_a_client_that_stops_reading_its_task_is_cut_off(env: Env) -> None:
    stub, session = env.register("eve")
    env.post("eve", body_values=8 << 20)  # 32 MiB: far more than the flow-control window
    call = stub.PullTask(pb.PullTaskRequest(session=session, wait_seconds=2), timeout=30)
    next(call)  # the header arrives; eve reads nothing more
    assert _wait_until(lambda: env.service.guard.open_streams("eve") == 0, timeout=15)
    assert env.service.guard.refusals.get("idle", 0) >= 1
    call.cancel()
    assert _honest_round(env) < 5


def test_a_drip_that_holds_a_decoder_slot_is_cut_off_and_its_task_failed(env: Env) -> None:
    """One byte at a time is never idle, but far below deploy.min_upload_rate: cut once the slot is held a timeout."""
    stub, session = env.register("eve")
    collector = env.post("eve")
    tid = env.task_id(stub, session)
    meta = {"session": session, "task_id": tid, "round": 1, "num_examples": 50, "num_steps": 5, "metrics": {}}
    chunks = list(encode("update", meta, {"delta": torch.zeros(8)}, chunk_bytes=1))
    release = threading.Event()

    def drip() -> Iterator[pb.Chunk]:
        for c in chunks:
            yield c
            if release.wait(IDLE_TIMEOUT / 4):
                return

    fut = stub.PushResult.future(drip(), timeout=20)
    try:
        res = collector.get(4 * IDLE_TIMEOUT)
        assert res is not None and res.payload is None
        assert res.failure.startswith("upload cut off: uploading at ") and "below deploy.min_upload_rate (8192 B/s)" in res.failure
        assert fut.exception(timeout=5).code() == grpc.StatusCode.CANCELLED
        assert _wait_until(lambda: env.settled("eve"))
    finally:
        release.set()


def test_re_registering_cannot_raise_the_declared_example_count(env: Env) -> None:
    stub = env.stub("mallory")
    stub.Register(pb.RegisterRequest(client_id="mallory", num_examples=100), timeout=10)  # what eve declared first
    with pytest.raises(grpc.RpcError) as err:
        stub.Register(pb.RegisterRequest(client_id="mallory", num_examples=1_000_000), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "may not claim more (1000000 / 0)" in (err.value.details() or "")
    stub.Register(pb.RegisterRequest(client_id="mallory", num_examples=60), timeout=10)  # fewer is fine


def test_a_task_is_downloaded_a_bounded_number_of_times(env: Env) -> None:
    stub, session = env.register("trent")
    env.post("trent")
    for _ in range(LIMITS.max_task_downloads):
        env.task_id(stub, session)
    with pytest.raises(grpc.RpcError) as err:
        env.task_id(stub, session)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "task downloaded 3 times already (deploy.max_task_downloads = 3)" in (err.value.details() or "")


def test_pulls_are_rate_limited_per_identity() -> None:
    g = Guard(Limits(pull_rate=1.0, pull_burst=2))
    g.admit_pull("a")
    g.admit_pull("a")
    with pytest.raises(LimitExceeded, match=r"'a' pulls tasks too often \(deploy.pull_rate = 1/s\)"):
        g.admit_pull("a")
    g.admit_pull("b")


def test_refusal_logs_are_throttled_per_client_and_kind(caplog: pytest.LogCaptureFixture) -> None:
    g = Guard(Limits(log_every=0.3))
    for _ in range(5):
        g.warn("eve", "push", "refused %s", "x")
    g.warn("bob", "push", "refused %s", "y")
    time.sleep(0.35)
    g.warn("eve", "push", "refused %s", "z")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused x", "refused y", "refused z (and 4 more like it since the last report)"]


# ---------------------------------------------------------------- the guard itself
def test_registration_bucket_refills_at_the_rate() -> None:
    g = Guard(Limits(register_rate=2.0, register_burst=2))
    g.admit_registration("a")
    g.admit_registration("a")
    with pytest.raises(LimitExceeded, match=r"'a' registers too often \(deploy.register_rate = 2/s\): retry in 0.5 s"):
        g.admit_registration("a")
    g.admit_registration("b")  # per identity
    time.sleep(0.55)
    g.admit_registration("a")


def test_stream_counting_and_one_upload_per_task() -> None:
    g = Guard(Limits(max_streams_per_client=2))
    with g.stream("pull", lambda: None, "a"), g.stream("push", lambda: None, "a") as s:
        with pytest.raises(LimitExceeded, match=r"'a' already has 2 calls open \(deploy.max_streams_per_client = 2\)"):
            with g.stream("push", lambda: None, "a"):
                pass
        assert g.open_streams("a") == 2
        g.claim_upload("t1", s)
        with g.stream("push", lambda: None, "b") as other:
            with pytest.raises(LimitExceeded, match="already in progress"):
                g.claim_upload("t1", other)
        g.release_upload("t1", s)
        g.claim_upload("t1", s)
    assert g.open_streams("a") == 0


def test_sweep_cancels_idle_and_orphaned_streams_only() -> None:
    g = Guard(Limits(stream_idle_timeout=0.2))
    cancelled: list[str] = []
    with (
        g.stream("push", lambda: cancelled.append("idle"), "a") as idle,
        g.stream("push", lambda: cancelled.append("busy"), "b") as busy,
        g.stream("push", lambda: cancelled.append("orphan"), "c") as orphan,
        g.stream("pull", lambda: cancelled.append("waiting"), "d"),  # not watched: a long poll waits on us
    ):
        for s in (idle, busy, orphan):
            s.watch()
        orphan.alive = lambda: False
        time.sleep(0.25)
        busy.progress()
        orphan.progress()  # moving, but its task is gone
        g.sweep()
        assert sorted(cancelled) == ["idle", "orphan"]
        assert idle.aborted == "no data for 0.2 s (deploy.stream_idle_timeout)" and orphan.aborted == "its task was closed"
        g.sweep()  # once only
        assert len(cancelled) == 2


def test_long_poll_slots_one_per_client() -> None:
    g = Guard(Limits(max_long_polls=2))
    with g.long_poll("a") as a1, g.long_poll("a") as a2, g.long_poll("b") as b, g.long_poll("c") as c:
        assert (a1, a2, b, c) == (True, False, True, False)
        assert g.long_polls == 2
    assert g.long_polls == 0


def test_deploy_limits_from_config() -> None:
    lim = deploy_limits(DeploySection(max_workers=64, stream_idle_timeout=5.0, register_burst=2))
    assert (lim.max_long_polls, lim.stream_idle_timeout, lim.register_burst) == (DEFAULT_MAX_LONG_POLLS, 5.0, 2)
    assert DEFAULT_MAX_LONG_POLLS == 16_384
    # waiting pulls hold no thread any more: more of them than pool threads is a valid (old or new) config
    assert deploy_limits(DeploySection(max_workers=8, max_long_polls=8)).max_long_polls == 8
