"""A whole deployed run in one process: the real gRPC server, the round loop and client agents in threads.

Deployment must give the simulation's result for the same config; stragglers are dropped
at the deadline, failed rounds retried, over-selection closes a round early.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from fedloom.agent import AgentOptions, ClientAgent
from fedloom.core.config import PersonalizationSection, parse_config
from fedloom.run import Run, build_run
from fedloom.transport.wire import Message

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from faultproxy import FaultProxy, Faults  # noqa: E402

SITES = ["hospital-A", "hospital-B", "hospital-C"]


def _config(rounds: int = 3, **deploy: Any):  # type: ignore[no-untyped-def]
    return parse_config(
        {
            "run": {"name": "deploy-test", "seed": 3, "rounds": rounds, "engine": "sequential"},
            "data": {"name": "hospital"},
            "model": {"name": "mlp", "hidden": [16]},
            "strategy": {"name": "fedavg", "fraction": 1.0},
            "client": {"epochs": 1, "batch_size": 64, "lr": 0.01},
            "deploy": {
                "address": "127.0.0.1:0",
                "insecure": True,
                "min_clients": 3,
                "wait_timeout": 30,
                "round_timeout": 30,
                "heartbeat_interval": 0.5,
                "max_pull_wait": 0.5,
                **deploy,
            },
        }
    )


def _deploy(
    cfg,  # type: ignore[no-untyped-def]
    agent_cls: Callable[..., ClientAgent] = ClientAgent,
    sites: list[str] = SITES,
    *,
    extra: tuple[tuple[Callable[..., ClientAgent], str, str], ...] = (),
    after: Callable[[], None] = lambda: None,
) -> tuple[Run, list[ClientAgent]]:
    """Run ``cfg`` deployed with an agent per site (and ``extra`` (class, data site, client id) agents); return the site agents."""
    run = build_run(cfg, engine="remote")
    port = run.engine.port  # type: ignore[attr-defined]  # a RemoteEngine

    def agent(cls: Callable[..., ClientAgent], site: str, cid: str) -> ClientAgent:
        return cls(run.dataset.clients[site], AgentOptions(server=f"127.0.0.1:{port}", client_id=cid, pull_wait=0.5))

    agents = [agent(agent_cls, s, s) for s in sites]
    threads = [threading.Thread(target=a.run, daemon=True) for a in [*agents, *(agent(*e) for e in extra)]]
    for t in threads:
        t.start()
    try:
        run.federation.run(cfg.run.rounds)
    finally:
        run.engine.close()
        after()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a client agent did not stop when the run ended"
    return run, agents


def test_deployment_equals_simulation() -> None:
    cfg = _config()
    deployed, agents = _deploy(cfg)
    sim = build_run(cfg, engine="sequential")
    sim.federation.run(cfg.run.rounds)
    assert torch.equal(deployed.federation.state.params, sim.federation.state.params)
    for d, s in zip(deployed.federation.history, sim.federation.history, strict=True):
        assert sorted(d.clients) == sorted(s.clients) == SITES
        assert d.metrics["test_mae"] == s.metrics["test_mae"]
        assert d.bytes_down == s.bytes_down and d.bytes_up == s.bytes_up
    assert [a.report.tasks for a in agents] == [3, 3, 3]


def test_personal_layers_and_personalized_evaluation_deployed_equal_the_simulation() -> None:
    """The head ("net.2") stays on each site (client state in the agent), each site keeps a Ditto
    model, and each fine-tunes and evaluates its own model on request: all as in simulation."""
    cfg = _config().model_copy(
        update={"personalization": PersonalizationSection(layers=["net.2"], ditto_lambda=0.3, finetune_steps=3, eval_every=2)}
    )
    deployed, agents = _deploy(cfg)
    sim = build_run(cfg, engine="sequential")
    sim.federation.run(cfg.run.rounds)
    assert torch.equal(deployed.federation.state.params, sim.federation.state.params)
    for d, s in zip(deployed.federation.history, sim.federation.history, strict=True):
        assert d.client_metrics == s.client_metrics
    last = deployed.federation.history.records[-1].client_metrics
    assert sorted(last) == SITES and all({"fed_mae", "pers_mae"} <= set(m) for m in last.values())
    for a in agents:  # each site kept its own head
        for key in ("personal.params", "ditto.model"):
            assert torch.equal(a.state[key], sim.engine.client_states.get(a.client_id)[key])


class _Straggler(ClientAgent):
    """hospital-C is slower than the deadline in round 1."""

    def _work(self, msg: Message):  # type: ignore[no-untyped-def]
        if self.client_id == "hospital-C" and msg.meta.get("round") == 1:
            time.sleep(2.6)
        return super()._work(msg)


def test_straggler_is_dropped_and_its_late_update_discarded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    cfg = _config(rounds=2, round_timeout=2.0)
    run, agents = _deploy(cfg, _Straggler)
    h = run.federation.history
    assert sorted(h[0].clients) == ["hospital-A", "hospital-B"] and h[0].status == "ok"
    assert sorted(h[1].clients) == SITES  # it is back for the next round
    assert "dropped 1 unanswered client(s) ['hospital-C']: deadline of 2 s passed" in caplog.text
    straggler = agents[2]
    assert straggler.report.refused == ["task is closed (deadline of 2 s passed)"]
    assert "refused a result from 'hospital-C'" in caplog.text


class _FailsOnce(ClientAgent):
    """Every client fails its first task: round 1 has no update, then is retried."""

    def _work(self, msg: Message):  # type: ignore[no-untyped-def]
        if not getattr(self, "_failed", False):
            self._failed = True
            raise RuntimeError("disk full")
        return super()._work(msg)


def test_round_with_too_few_updates_is_retried(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    cfg = _config(rounds=2, round_retries=1)
    run, _ = _deploy(cfg, _FailsOnce)
    h = run.federation.history
    assert [r.status for r in h] == ["ok", "ok"] and sorted(h[0].clients) == SITES
    assert "round 1: 0 valid updates < min_updates 1; retrying (attempt 2 of 2)" in caplog.text
    assert "client error: RuntimeError: disk full" in caplog.text


def test_exhausted_retries_leave_the_model_unchanged_and_the_run_goes_on() -> None:
    class _AlwaysFails(ClientAgent):
        def _work(self, msg: Message):  # type: ignore[no-untyped-def]
            raise RuntimeError("broken")

    cfg = _config(rounds=2, round_retries=1)
    run, _ = _deploy(cfg, _AlwaysFails)
    assert [r.status for r in run.federation.history] == ["insufficient", "insufficient"]
    assert torch.equal(run.federation.state.params, build_run(cfg, engine="sequential").federation.state.params)


def test_over_selection_closes_the_round_at_the_target() -> None:
    cfg = _config(rounds=2, over_selection=0.5)
    cfg = cfg.model_copy(update={"strategy": cfg.strategy.model_copy(update={"fraction": 0.67})})
    run, _ = _deploy(cfg)
    for rec in run.federation.history:  # 2 selected + 1 over-selected; the round takes the first 2
        assert len(rec.clients) == 2 and rec.status == "ok"
        assert rec.bytes_down == 3 * run.spec.numel * 4


def test_client_on_a_slow_uplink_is_not_written_off_while_uploading() -> None:
    """An upload longer than heartbeat_timeout (heartbeats queue behind it) is a sign of life."""
    cfg = _config(rounds=1, heartbeat_interval=0.5, heartbeat_timeout=1.5, min_clients=1)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"hidden": [128, 128]})})  # 19,457 values: 78 kB
    run = build_run(cfg, engine="remote")
    port = run.engine.port  # type: ignore[attr-defined]  # a RemoteEngine
    with FaultProxy(target=("127.0.0.1", port), faults=Faults(rate=30_000)) as proxy:  # ~2.6 s per update
        host, pport = proxy.address
        agent = ClientAgent(run.dataset.clients["hospital-A"], AgentOptions(server=f"{host}:{pport}", client_id="hospital-A", pull_wait=0.5))
        t = threading.Thread(target=agent.run, daemon=True)
        t.start()
        try:
            run.federation.run(1)
        finally:
            run.engine.close()
        t.join(timeout=30)
    rec = run.federation.history[0]
    assert rec.clients == ["hospital-A"] and rec.status == "ok"
    assert agent.report.refused == []


def test_recorded_bytes_are_what_the_wire_carried() -> None:
    """history's bytes (the encoded payloads) equal the tensor data on the wire; framing adds little."""
    data = _config(rounds=2).model_dump(mode="json")
    data["pipeline"] = [{"name": "qsgd", "bits": 4}]
    data["broadcast"] = {"name": "fp16"}
    run, agents = _deploy(parse_config(data))
    hist = run.federation.history
    assert [r.status for r in hist] == ["ok", "ok"] and all(len(r.clients) == 3 for r in hist)
    up, down = sum(r.bytes_up for r in hist), sum(r.bytes_down for r in hist)
    assert up == sum(a.report.bytes_up for a in agents)  # tensor data of the results, exactly
    assert down == sum(a.report.bytes_down for a in agents)  # tensor data of the tasks, exactly
    # every byte gRPC carried: within framing (header JSON, per-chunk CRCs, trailer) of 4 KiB a message
    messages = 2 * 3
    assert up < sum(a.report.wire_bytes_up for a in agents) <= up + 4096 * messages
    assert down < sum(a.report.wire_bytes_down for a in agents) <= down + 4096 * messages
    # and they are the compressed sizes: 4-bit codes up, float16 down (no buffers in this MLP)
    p = run.spec.numel
    assert hist[0].bytes_down == 3 * 2 * p
    assert hist[0].bytes_up == 3 * ((p + 1) // 2 + 4 * -(-p // 512))


class _Staller(ClientAgent):
    """A hostile participant: for each task it opens six uploads that send a header and one chunk, then nothing."""

    stalls: list[threading.Event] = []
    calls: list[Any] = []  # keep the calls referenced: a collected future cancels its call

    @classmethod
    def release_all(cls) -> None:
        for release in cls.stalls:
            release.set()

    def _serve_one(self) -> bool:
        from fedloom.transport.proto import fedloom_pb2 as pb
        from fedloom.transport.wire import decode, encode

        stub = self._connect()
        assert self._spec is not None
        msg = decode(stub.PullTask(pb.PullTaskRequest(session=self._session, wait_seconds=0.5), timeout=30), max_bytes=1 << 26)
        if msg.kind == "shutdown":
            return False
        if msg.kind != "task":
            return True
        meta = {"session": self._session, "task_id": msg.meta["task_id"], "round": msg.meta["round"], "num_examples": 10, "num_steps": 1, "metrics": {}}
        chunks = list(encode("update", meta, {"delta": torch.zeros(self._spec.numel)}, chunk_bytes=64))[:2]
        release = threading.Event()
        self.stalls.append(release)

        def stalled():  # type: ignore[no-untyped-def]
            yield from chunks
            release.wait(60)

        for _ in range(6):
            self.calls.append(stub.PushResult.future(stalled(), timeout=60))
        return True


def test_a_participant_stalling_its_uploads_does_not_stall_the_round() -> None:
    """The reported attack: six stalled uploads for its own task used to hold every decoder slot."""
    cfg = _config(rounds=2, min_clients=4, round_timeout=8, stream_idle_timeout=2.0, round_retries=0)
    run, agents = _deploy(cfg, extra=((_Staller, "hospital-C", "eve"),), after=_Staller.release_all)
    assert len(run.federation.history) == 2
    for rec in run.federation.history:  # every honest update is taken; eve's round ends at the deadline without her
        assert sorted(rec.clients) == SITES and rec.status == "ok"
    assert all(a.report.refused == [] for a in agents)
