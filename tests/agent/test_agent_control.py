"""The agent follows the control intervals its server advertises (fedloom.server.control).

It heartbeats at the advertised interval, asks its long polls for the advertised wait (not
its own ``pull_wait``), and sends no heartbeat while a long poll waits on a server that
keeps waiting clients live; against a server that advertises no wait it heartbeats always.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from fedloom.agent import AgentOptions, ClientAgent
from fedloom.core.params import ParamSpec
from fedloom.data.base import ClientData, Split, TaskSpec
from fedloom.engines.coordinator import Coordinator
from fedloom.models.registry import build_model
from fedloom.server.aio import FleetServer
from fedloom.server.deploy import run_info
from fedloom.server.limits import Limits
from fedloom.server.service import FleetService, ServiceSettings, start_server
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.proto import fedloom_pb2_grpc as pb_grpc
from fedloom.transport.wire import encode_body

TASK = TaskSpec(kind="regression", input_shape=(3,), num_outputs=1, loss="mse", metrics=("mae", "loss"))


@dataclass
class Env:
    coord: Coordinator
    service: FleetService
    server: FleetServer
    port: int
    beats: list[str]
    leaves: list[str]
    pulls: list[str]


def _record(service: FleetService, method: str, what: Callable[[Any, Any], Any]) -> list[Any]:
    """Wrap the service's handler ``method`` so that each call appends ``what(request, context)`` to the returned list."""
    calls: list[Any] = []
    real = getattr(service, method)

    async def recorded(request, context):  # type: ignore[no-untyped-def]
        calls.append(what(request, context))
        return await real(request, context)

    setattr(service, method, recorded)
    return calls


@pytest.fixture
def env() -> Iterator[Env]:
    spec = ParamSpec.from_module(build_model("linear", TASK))
    coord = Coordinator(heartbeat_timeout=3.0)
    settings = ServiceSettings(
        run_info=run_info("linear", {}, TASK), secure=False, heartbeat_interval=0.05, max_pull_wait=0.4,
        heartbeat_timeout=3.0, limits=Limits(register_burst=100, pull_burst=100, log_every=0),
    )  # fmt: skip
    service = FleetService(coord, spec=spec, dtype=torch.float32, settings=settings)
    beats: list[str] = _record(service, "Heartbeat", lambda request, context: request.session)
    leaves: list[str] = _record(service, "Leave", lambda request, context: request.session)
    pulls: list[str] = _record(service, "PullTask", lambda request, context: request.session)
    server, port = start_server(service, "127.0.0.1:0", credentials=None, max_workers=2)
    yield Env(coord, service, server, port, beats, leaves, pulls)
    coord.shutdown()
    assert server.stop(0).wait(10)
    service.close()


def _agent(port: int) -> ClientAgent:
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    data = ClientData(train=Split(x, x.sum(1)))
    return ClientAgent(data, AgentOptions(server=f"127.0.0.1:{port}", client_id="site-a", pull_wait=30.0))


def _wait_until(cond, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_the_agent_takes_the_advertised_intervals_and_long_polls_for_the_advertised_wait(env: Env) -> None:
    agent = _agent(env.port)
    agent._register()
    assert agent._hb_interval == pytest.approx(0.5)  # 0.05 s is below the agent's floor of 0.5 s
    assert agent._pull_wait == pytest.approx(0.4)  # the server's, not the agent's own 30 s
    assert agent._serve_one() is True  # an idle answer after the advertised wait, not after 30 s
    assert agent._polling is False
    agent._reset_channel()


def test_no_heartbeat_while_a_long_poll_waits_on_a_server_that_advertises_its_wait(env: Env) -> None:
    agent = _agent(env.port)
    agent._register()
    agent._hb_interval = 0.02
    agent._polling = True  # as while _serve_one waits for its task
    hb = threading.Thread(target=agent._heartbeat_loop, daemon=True)
    hb.start()
    time.sleep(0.5)  # 25 heartbeat intervals
    assert env.beats == []
    agent._polling = False  # the poll answered: heartbeats resume
    _wait_until(lambda: len(env.beats) >= 2)
    agent._stop.set()
    hb.join(10)
    agent._reset_channel()


def test_against_a_server_that_advertises_no_wait_the_agent_heartbeats_while_polling(env: Env) -> None:
    env.service.intervals = lambda: (0.05, 0.0)  # type: ignore[method-assign]  # an older server: no pull_wait
    agent = _agent(env.port)
    agent._register()
    assert agent._pull_wait == 0.0
    agent._hb_interval = 0.02
    agent._polling = True
    hb = threading.Thread(target=agent._heartbeat_loop, daemon=True)
    hb.start()
    _wait_until(lambda: len(env.beats) >= 2)
    agent._stop.set()
    hb.join(10)
    agent._reset_channel()


def test_an_agent_told_the_run_is_over_does_not_call_leave(env: Env) -> None:
    """The run's end closes every session: 10,000 agents must not answer it with 10,000 Leave calls at once."""
    agent = _agent(env.port)
    agent._register()
    env.coord.shutdown()
    report = agent.run()
    assert report.tasks == 0
    assert env.leaves == []
    assert agent._session is None


def test_an_agent_that_stops_on_its_own_leaves(env: Env) -> None:
    agent = _agent(env.port)
    agent._register()
    session = agent._session
    agent.run(max_tasks=0)  # stops before pulling: the run goes on, so the server is told
    assert env.leaves == [session]


def test_the_agent_takes_each_task_on_a_fresh_connection_and_keeps_its_session(env: Env) -> None:
    """A connection that carried a task and its result is closed (the server's transport keeps memory on it)."""
    agent = _agent(env.port)
    agent._register()
    session, first = agent._session, agent._channel
    collector = env.coord.post([("site-a", "task", {"round": 1}, encode_body({"params": torch.zeros(4)}))],
                               deadline=time.monotonic() + 60)  # fmt: skip
    assert agent._serve_one() is True  # not a valid instruction: the agent answers with a failure
    res = collector.queue.get(timeout=10)
    assert res.client_id == "site-a" and res.failure is not None
    with pytest.raises(ValueError, match="closed channel"):  # the task's connection is gone
        pb_grpc.FleetStub(first).Heartbeat(pb.HeartbeatRequest(session=session), timeout=5)
    assert agent._serve_one() is True  # an idle long poll, on a new connection
    second = agent._channel
    assert second is not None and second is not first
    assert agent._serve_one() is True  # and the next one on that same connection
    assert agent._channel is second
    agent._reset_channel()
    assert env.pulls == [session] * 3  # one session throughout: no new registration
