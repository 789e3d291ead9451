"""The control-RPC budget: advertised heartbeat / long-poll intervals scale with the connected clients.

:class:`ControlPlan` with hand-computed values; the service advertising them at registration
and in heartbeat replies, capping long polls at the current wait, and keeping a client whose
long poll waits live without heartbeats.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from torch import nn

from fedloom.core.params import ParamSpec
from fedloom.engines.coordinator import Coordinator
from fedloom.server.aio import FleetServer
from fedloom.server.control import DEFAULT_MAX_CONTROL_RATE, MAX_PULL_WAIT, ControlPlan
from fedloom.server.limits import Limits
from fedloom.server.service import FleetService, ServiceSettings, start_server
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.transport.wire import decode

SPEC = ParamSpec.from_module(nn.Linear(3, 2))


# ----------------------------------------------------------------- the plan
def test_defaults_are_unchanged_while_the_clients_fit_the_budget() -> None:
    plan = ControlPlan(heartbeat_interval=5.0, pull_wait=10.0, heartbeat_timeout=120.0)
    assert plan.max_rate == DEFAULT_MAX_CONTROL_RATE == 500.0
    # 1,000 clients at 5 s / 10 s make 200 + 100 = 300 calls/s <= 500: unchanged
    assert plan.intervals(0) == (5.0, 10.0) and plan.intervals(1000) == (5.0, 10.0)
    assert plan.scale(1000) == 1.0 and plan.rate(1000) == 300.0
    # 5,000 clients: 1,500 calls/s -> both intervals x3
    assert plan.scale(5000) == pytest.approx(3.0)
    assert plan.intervals(5000) == pytest.approx((15.0, 30.0))


def test_ten_thousand_clients_stay_within_the_budget() -> None:
    plan = ControlPlan(heartbeat_interval=5.0, pull_wait=10.0, heartbeat_timeout=120.0)
    # 10,000 x (1/5 + 1/10) = 3,000 calls/s -> x6: 30 s heartbeats, 60 s long polls, 500 calls/s
    assert plan.scale(10_000) == pytest.approx(6.0)
    assert plan.intervals(10_000) == pytest.approx((30.0, 60.0))
    assert plan.rate(10_000) == pytest.approx(500.0)
    assert plan.rate(10_000, idle_heartbeats=False) == pytest.approx(10_000 / 60.0)  # clients idle in a long poll


def test_the_heartbeat_stays_under_a_third_of_the_timeout_and_the_wait_under_the_cap() -> None:
    plan = ControlPlan(heartbeat_interval=5.0, pull_wait=10.0, heartbeat_timeout=30.0)
    assert plan.intervals(10_000) == pytest.approx((10.0, 60.0))  # 30 s heartbeats would time clients out
    assert plan.intervals(10_000_000) == (10.0, MAX_PULL_WAIT)
    # a configured interval above the caps is kept (never shortened)
    slow = ControlPlan(heartbeat_interval=20.0, pull_wait=900.0, heartbeat_timeout=30.0)
    assert slow.intervals(1_000_000) == (20.0, 900.0)


def test_zero_rate_turns_scaling_off_and_bad_values_are_refused() -> None:
    plan = ControlPlan(heartbeat_interval=5.0, pull_wait=10.0, heartbeat_timeout=30.0, max_rate=0.0)
    assert plan.intervals(1_000_000) == (5.0, 10.0)
    with pytest.raises(ValueError, match="heartbeat_interval must be > 0"):
        ControlPlan(heartbeat_interval=0.0, pull_wait=10.0, heartbeat_timeout=30.0)
    with pytest.raises(ValueError, match="max_rate must be >= 0"):
        ControlPlan(heartbeat_interval=5.0, pull_wait=10.0, heartbeat_timeout=30.0, max_rate=-1.0)


# ----------------------------------------------------------------- the service
@dataclass
class Env:
    coord: Coordinator
    service: FleetService
    server: FleetServer
    stub: pb_grpc.FleetStub


@pytest.fixture
def env() -> Iterator[Env]:
    coord = Coordinator(heartbeat_timeout=1.5)
    settings = ServiceSettings(
        run_info={}, secure=False, heartbeat_interval=0.1, max_pull_wait=0.2, heartbeat_timeout=1.5,
        max_control_rate=40.0, limits=Limits(register_burst=1000, pull_burst=1000, log_every=0),
    )  # fmt: skip
    service = FleetService(coord, spec=SPEC, dtype=torch.float32, settings=settings)
    service.COUNT_EVERY = 0.0  # count the clients at every call
    server, port = start_server(service, "127.0.0.1:0", credentials=None, max_workers=2)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield Env(coord, service, server, pb_grpc.FleetStub(channel))
    channel.close()
    coord.shutdown()
    assert server.stop(0).wait(10)
    service.close()


def test_registration_and_heartbeats_advertise_the_scaled_intervals(env: Env) -> None:
    first = env.stub.Register(pb.RegisterRequest(client_id="a", num_examples=1), timeout=10)
    # counted before "a" registered: no client, the configured intervals
    assert (first.heartbeat_interval, first.pull_wait) == pytest.approx((0.1, 0.2))
    for i in range(3):
        env.stub.Register(pb.RegisterRequest(client_id=f"b{i}", num_examples=1), timeout=10)
    # 4 clients x (1/0.1 + 1/0.2) = 60 calls/s against 40: x1.5 (under the heartbeat cap, 1.5 / 3)
    beat = env.stub.Heartbeat(pb.HeartbeatRequest(session=first.session), timeout=10)
    assert beat.known
    assert (beat.heartbeat_interval, beat.pull_wait) == pytest.approx((0.15, 0.3))
    assert env.service.intervals() == pytest.approx((0.15, 0.3))


def test_a_client_waiting_in_a_long_poll_stays_live_without_heartbeats(env: Env) -> None:
    reply = env.stub.Register(pb.RegisterRequest(client_id="a", num_examples=1), timeout=10)
    call = env.stub.PullTask(pb.PullTaskRequest(session=reply.session, wait_seconds=5.0), timeout=30)
    # the long poll is capped at the advertised wait (0.2 s with one client), then answers idle;
    # re-polling for 4 s, over twice the heartbeat timeout, with no heartbeat
    msg = decode(call, max_bytes=1 << 20)  # type: ignore[arg-type]
    assert msg.kind == "idle"
    end = time.monotonic() + 4.0
    while time.monotonic() < end:
        call = env.stub.PullTask(pb.PullTaskRequest(session=reply.session, wait_seconds=5.0), timeout=30)
        assert decode(call, max_bytes=1 << 20).kind == "idle"  # type: ignore[arg-type]
    assert env.coord.live_clients() == ["a"]
    assert env.service._polling == {}  # every poll that ended stopped being kept alive


def test_the_keeper_touches_the_waiting_clients(env: Env) -> None:
    env.stub.Register(pb.RegisterRequest(client_id="a", num_examples=1), timeout=10)
    env.stub.Register(pb.RegisterRequest(client_id="b", num_examples=1), timeout=10)
    env.service.control = ControlPlan(0.1, 10.0, 1.5, max_rate=0.0)  # polls may wait 10 s, over 6x the timeout
    env.service._counted_at = -float("inf")
    session = env.coord.info("a").session  # type: ignore[union-attr]
    stream = env.stub.PullTask(pb.PullTaskRequest(session=session, wait_seconds=10.0), timeout=30)
    time.sleep(4.0)  # "a" waits in its poll (touched every 0.5 s); "b" says nothing
    assert env.coord.live_clients() == ["a"]
    stream.cancel()


def test_max_control_rate_in_config() -> None:
    from fedloom.core.config import parse_config
    from fedloom.core.errors import ConfigError

    base = {"data": {"name": "mnist"}, "model": {"name": "cnn"}}
    assert parse_config(base).deploy.max_control_rate == 500.0
    assert parse_config({**base, "deploy": {"max_control_rate": 0}}).deploy.max_control_rate == 0.0
    with pytest.raises(ConfigError, match="max_control_rate"):
        parse_config({**base, "deploy": {"max_control_rate": -1}})
