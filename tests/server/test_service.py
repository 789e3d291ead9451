"""The gRPC service over real TLS: who may connect, and which results are accepted.

Each test posts tasks straight to the coordinator and plays the client over the wire, so
the refusals (unknown CA, revoked, impersonation, forged, replayed, late, malformed) are
exercised deterministically.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
from torch import nn

from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientUpdate
from fedloom.engines.coordinator import Collector, Coordinator
from fedloom.server import certs
from fedloom.server.limits import Limits
from fedloom.server.service import FleetService, RevocationList, ServiceSettings, start_server
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.transport.protocol import spec_digest
from fedloom.transport.wire import decode, encode, encode_body

SPEC = ParamSpec.from_module(nn.Linear(3, 2))  # 8 values


@dataclass
class Env:
    port: int
    coord: Coordinator
    service: FleetService
    pki: Path

    def stub(self, who: str | None, *, other_ca: bool = False) -> pb_grpc.FleetStub:
        ca = (self.pki / "ca" / "ca.pem").read_bytes()
        if who is None:
            tls = grpc.ssl_channel_credentials(root_certificates=ca)
        else:
            d = self.pki / ("other" if other_ca else "clients") / who
            c = certs.load_client_credentials(d)
            tls = grpc.ssl_channel_credentials(root_certificates=ca, private_key=c.key_pem, certificate_chain=c.cert_pem)
        return pb_grpc.FleetStub(grpc.secure_channel(f"localhost:{self.port}", tls))

    def key(self, who: str) -> bytes:
        return certs.load_client_credentials(self.pki / "clients" / who).key_pem

    def register(self, who: str, n: int = 100) -> tuple[pb_grpc.FleetStub, str]:
        stub = self.stub(who)
        reply = stub.Register(pb.RegisterRequest(client_id=who, num_examples=n, num_test_examples=10), timeout=10)
        return stub, reply.session

    def post(self, who: str, *, rnd: int = 1, deadline_s: float = 30.0) -> Collector:
        body = encode_body({"params": torch.arange(8, dtype=torch.float32)})
        return self.coord.post([(who, "task", {"round": rnd, "seed": 7}, body)], deadline=time.monotonic() + deadline_s)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    pki = tmp_path_factory.mktemp("pki")
    certs.create_ca(pki / "ca")
    certs.issue_server(pki / "ca", pki / "server", hosts=["localhost"])
    for who in ("eve", "bob", "rita"):
        certs.issue_client(pki / "ca", pki / "clients" / who, who)
    certs.create_ca(pki / "otherca")
    certs.issue_client(pki / "otherca", pki / "other" / "eve", "eve")
    certs.revoke(pki / "ca", pki / "clients" / "rita" / certs.CLIENT_CERT)
    coord = Coordinator(heartbeat_timeout=30)
    service = FleetService(
        coord,
        spec=SPEC,
        dtype=torch.float32,
        settings=ServiceSettings(  # these tests register the same client many times a second
            run_info={"model": {"name": "linear"}}, max_pull_wait=2.0, limits=Limits(register_burst=1000, log_every=0)
        ),
        revoked=RevocationList(pki / "ca" / certs.REVOKED),
    )
    server, port = start_server(service, "127.0.0.1:0", credentials=certs.load_server_credentials(pki / "server"), max_workers=16)
    yield Env(port, coord, service, pki)
    server.stop(0)


def _pull(stub: pb_grpc.FleetStub, session: str):  # type: ignore[no-untyped-def]
    return decode(stub.PullTask(pb.PullTaskRequest(session=session, wait_seconds=2), timeout=10), max_bytes=1 << 20)


def _update(session: str, task_id: str, *, rnd: int = 1, delta: torch.Tensor | None = None, n: int = 50, **meta) -> tuple:  # type: ignore[no-untyped-def]
    m = {"session": session, "task_id": task_id, "round": rnd, "num_examples": n, "num_steps": 5, "metrics": {"train_loss": 0.5}}
    m.update(meta)
    return "update", m, {"delta": torch.full((8,), 0.25) if delta is None else delta}


def _push(stub: pb_grpc.FleetStub, msg: tuple, key: bytes | None) -> pb.PushReply:  # type: ignore[type-arg]
    sign = (lambda b: certs.sign(key, b)) if key is not None else None
    return stub.PushResult(encode(*msg, sign=sign), timeout=10)


def test_register_returns_session_and_model_layout(env: Env) -> None:
    stub = env.stub("eve")
    reply = stub.Register(pb.RegisterRequest(client_id="eve", num_examples=100, num_test_examples=10), timeout=10)
    assert len(reply.session) == 32 and reply.spec_digest == spec_digest(SPEC)
    assert "eve" in env.coord.live_clients()


def test_unknown_ca_and_missing_certificate_are_refused(env: Env) -> None:
    for stub in (env.stub("eve", other_ca=True), env.stub(None)):
        with pytest.raises(grpc.RpcError) as err:
            stub.Register(pb.RegisterRequest(client_id="eve", num_examples=1), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails


def test_revoked_client_is_refused(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as err:
        env.stub("rita").Register(pb.RegisterRequest(client_id="rita", num_examples=1), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in (err.value.details() or "")


def test_claiming_another_identity_is_refused(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as err:
        env.stub("bob").Register(pb.RegisterRequest(client_id="eve", num_examples=1), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    _, eve_session = env.register("eve")
    with pytest.raises(grpc.RpcError) as err:  # bob presents eve's session token
        _pull(env.stub("bob"), eve_session)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_signed_update_is_accepted_once_and_replay_is_refused(env: Env) -> None:
    stub, session = env.register("eve")
    collector = env.post("eve")
    task = _pull(stub, session)
    assert task.kind == "task" and task.meta["round"] == 1 and task.meta["seed"] == 7
    assert torch.equal(task.tensors["params"], torch.arange(8, dtype=torch.float32))
    msg = _update(session, task.meta["task_id"])
    assert _push(stub, msg, env.key("eve")).accepted
    res = collector.get(5)
    assert res is not None and isinstance(res.payload, ClientUpdate)
    assert res.payload.client_id == "eve" and res.payload.num_examples == 50 and res.payload.num_steps == 5
    assert torch.equal(res.payload.delta, torch.full((8,), 0.25))
    replay = _push(stub, msg, env.key("eve"))
    assert not replay.accepted and "closed" in replay.reason
    assert _pull(stub, session).kind == "idle"


def test_forged_signatures_are_refused(env: Env) -> None:
    stub, session = env.register("eve")
    env.post("eve")
    tid = _pull(stub, session).meta["task_id"]
    for key in (env.key("bob"), None):  # signed with another client's key; not signed
        reply = _push(stub, _update(session, tid), key)
        assert not reply.accepted and reply.reason == "bad signature (forged or tampered result)"
    # the task is still open: the genuine update goes through
    assert _push(stub, _update(session, tid), env.key("eve")).accepted


def test_result_for_someone_elses_task_is_refused(env: Env) -> None:
    eve, eve_session = env.register("eve")
    bob, bob_session = env.register("bob")
    env.post("eve")
    tid = _pull(eve, eve_session).meta["task_id"]
    reply = _push(bob, _update(bob_session, tid), env.key("bob"))
    assert not reply.accepted and reply.reason == "task belongs to another client"
    reply = _push(bob, _update(eve_session, tid), env.key("bob"))
    assert not reply.accepted and reply.reason == "certificate 'bob' sent a result for client 'eve'"
    reply = _push(bob, _update(bob_session, "f" * 32), env.key("bob"))
    assert not reply.accepted and reply.reason == "unknown task (forged or replayed?)"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"delta": torch.zeros(7)}, "delta has shape (7,), expected (8,)"),
        ({"delta": torch.zeros(8, dtype=torch.float64)}, "delta has dtype torch.float64, expected torch.float32"),
        ({"delta": torch.tensor([0.0] * 7 + [float("nan")])}, "delta contains NaN or Inf"),
        ({"n": 101}, "num_examples 101 exceeds the limit 100"),
        ({"n": 0}, "num_examples must be an integer >= 1, got 0"),
        ({"rnd": 2}, "update is for round 2, not 1"),
        ({"metrics": {"train_loss": "x"}}, "metric 'train_loss' is not a finite number: 'x'"),
    ],
)
def test_invalid_updates_are_rejected_with_reason(env: Env, change: dict, reason: str) -> None:  # type: ignore[type-arg]
    stub, session = env.register("bob")
    collector = env.post("bob")
    tid = _pull(stub, session).meta["task_id"]
    reply = _push(stub, _update(session, tid, **change), env.key("bob"))
    assert not reply.accepted and reply.reason == reason
    res = collector.get(5)  # the round learns of it and goes on
    assert res is not None and res.payload is None and res.failure == f"rejected: {reason}"


def test_malformed_streams_are_refused_and_the_task_stays_open(env: Env) -> None:
    stub, session = env.register("bob")
    env.post("bob")
    tid = _pull(stub, session).meta["task_id"]
    chunks = list(encode(*_update(session, tid), sign=lambda b: certs.sign(env.key("bob"), b)))
    truncated = stub.PushResult(iter(chunks[:-1]), timeout=10)
    assert not truncated.accepted and truncated.reason.startswith("malformed: truncated")
    huge = _update(session, tid, delta=torch.zeros(1 << 20))  # 4 MiB announced, far above 3 x the model
    reply = _push(stub, huge, env.key("bob"))
    assert not reply.accepted and "oversized" in reply.reason
    assert _push(stub, _update(session, tid), env.key("bob")).accepted


def test_late_result_after_the_deadline_is_discarded(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    stub, session = env.register("bob")
    collector = env.post("bob")
    tid = _pull(stub, session).meta["task_id"]
    assert env.coord.close(collector, "deadline of 1 s passed") == ["bob"]
    reply = _push(stub, _update(session, tid), env.key("bob"))
    assert not reply.accepted and reply.reason == "task is closed (deadline of 1 s passed)"
    assert "refused a result from 'bob'" in caplog.text


def test_client_failure_report_reaches_the_round(env: Env) -> None:
    stub, session = env.register("eve")
    collector = env.post("eve")
    tid = _pull(stub, session).meta["task_id"]
    reply = _push(stub, ("failure", {"session": session, "task_id": tid, "reason": "out of memory"}, {}), env.key("eve"))
    assert reply.accepted
    res = collector.get(5)
    assert res is not None and res.failure == "client error: out of memory"
