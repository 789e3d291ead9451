"""The coordinator's client lifecycle: register, liveness, leave, tasks, deadlines."""

from __future__ import annotations

import threading
import time

import torch

from fedloom.engines.coordinator import Coordinator
from fedloom.transport.wire import encode_body

BODY = encode_body({"params": torch.zeros(4)})


def test_register_again_replaces_the_session() -> None:
    c = Coordinator()
    s1 = c.register("a", num_examples=5)
    s2 = c.register("a", num_examples=5)
    assert s1 != s2 and c.client_of(s1) is None and c.client_of(s2) == "a"
    assert c.live_clients() == ["a"]


def test_liveness_expires_without_heartbeats() -> None:
    c = Coordinator(heartbeat_timeout=0.2)
    s = c.register("a", num_examples=5)
    c.register("b", num_examples=5)
    time.sleep(0.3)
    assert c.client_of(s) == "a"  # any call is a sign of life
    assert c.live_clients() == ["a"]


def test_leave_fails_the_outstanding_task_at_once() -> None:
    c = Coordinator()
    s = c.register("a", num_examples=5)
    col = c.post([("a", "task", {"round": 1}, BODY)], deadline=time.monotonic() + 60)
    c.leave(s)
    res = col.get(1.0)
    assert res is not None and res.client_id == "a" and res.failure == "client left"
    assert c.live_clients() == []


def test_reap_writes_off_silent_clients_before_the_deadline() -> None:
    c = Coordinator(heartbeat_timeout=0.1)
    c.register("a", num_examples=5)
    col = c.post([("a", "task", {"round": 1}, BODY)], deadline=time.monotonic() + 60)
    time.sleep(0.2)
    assert c.reap(col) == ["a"]
    res = col.get(1.0)
    assert res is not None and res.failure == "client stopped answering heartbeats"


def test_pull_waits_for_a_task_and_a_reconnecting_client_gets_it_again() -> None:
    c = Coordinator()
    c.register("a", num_examples=5)
    got = []
    t = threading.Thread(target=lambda: got.append(c.pull("a", 5.0)))
    t.start()
    time.sleep(0.1)
    c.post([("a", "task", {"round": 1}, BODY)], deadline=time.monotonic() + 60)
    t.join(5)
    assert got and got[0] is not None and got[0].meta["round"] == 1
    again = c.pull("a", 0.0)  # e.g. the stream broke mid-transfer
    assert again is not None and again.task_id == got[0].task_id and again.pulled == 2
    assert c.pull("b", 0.0) is None


def test_closed_tasks_refuse_results_with_the_reason() -> None:
    c = Coordinator()
    c.register("a", num_examples=5)
    col = c.post([("a", "task", {"round": 1}, BODY)], deadline=time.monotonic() + 60)
    tid = next(iter(col.task_ids))
    assert c.close(col, "deadline of 9 s passed") == ["a"]
    assert c.deliver("a", tid, object()) == "task is closed (deadline of 9 s passed)"
    assert c.deliver("a", "nope", object()) == "unknown task (forged or replayed?)"


def test_a_new_round_supersedes_an_unanswered_task() -> None:
    c = Coordinator()
    c.register("a", num_examples=5)
    old = c.post([("a", "task", {"round": 1}, BODY)], deadline=time.monotonic() + 60)
    new = c.post([("a", "task", {"round": 2}, BODY)], deadline=time.monotonic() + 60)
    old_tid, new_tid = next(iter(old.task_ids)), next(iter(new.task_ids))
    assert c.outstanding("a", old_tid) == "task is closed (superseded by a newer task)"
    assert c.outstanding("a", new_tid) is None


def test_shutdown_releases_waiting_pulls() -> None:
    c = Coordinator()
    c.register("a", num_examples=5)
    t0 = time.monotonic()
    threading.Timer(0.1, c.shutdown).start()
    assert c.pull("a", 10.0) is None
    assert time.monotonic() - t0 < 5 and c.is_shutdown
