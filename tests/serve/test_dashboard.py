"""The dashboard's JSON and server-sent events over a small real store (no browser).

The store holds two tiny hospital runs trained here: ``hosp`` (3 rounds; in round 2 hospital-B
sends a NaN update, which the server rejects) and ``dp`` (2 rounds of local DP, so the
records carry ``dp_epsilon``). The events of a finished run are a finite stream, read whole
with FastAPI's TestClient; a run that is still training is followed over a real uvicorn.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from fedloom.core.config import parse_config  # noqa: E402
from fedloom.federation.loop import Federation  # noqa: E402
from fedloom.run import build_run  # noqa: E402
from fedloom.serve import open_source  # noqa: E402
from fedloom.serve.dashboard import dashboard_router  # noqa: E402
from fedloom.store import Store  # noqa: E402

CLIENTS = ["hospital-A", "hospital-B", "hospital-C"]


def _cfg(store: Path, name: str, rounds: int, **extra: Any) -> dict[str, Any]:
    return {
        "run": {"name": name, "seed": 0, "rounds": rounds, "engine": "sequential", "store": str(store)},
        "data": {"name": "hospital"},
        "model": {"name": "mlp", "hidden": [8]},
        "strategy": {"name": "fedavg", "fraction": 1.0},
        "client": {"epochs": 1, "batch_size": 64, "lr": 0.01, "max_steps": 2},
        **extra,
    }


def _nan_from(fed: Federation, client: str, at_round: int) -> None:
    """Make ``client`` send a NaN update in round ``at_round`` (a broken client; the server rejects it)."""
    engine = fed.engine
    inner = engine.run_cohort

    def run_cohort(*args: Any, **kwargs: Any) -> Iterator[Any]:
        rnd = fed.state.round + 1
        for u in inner(*args, **kwargs):
            yield replace(u, delta=torch.full_like(u.delta, float("nan"))) if rnd == at_round and u.client_id == client else u

    engine.run_cohort = run_cohort  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dash") / "store.db"
    run = build_run(parse_config(_cfg(path, "hosp", 3)))
    _nan_from(run.federation, "hospital-B", 2)
    run.federation.run(3)
    dp = {"privacy": {"mode": "local", "noise_multiplier": 1.0, "clip_norm": 0.5}}
    build_run(parse_config(_cfg(path, "dp", 2, **dp))).federation.run(2)
    return path


def _history(store: Path, name: str) -> list[Any]:
    with Store.open(store, read_only=True) as st:
        handle = st.find_run(name)
        assert handle is not None
        return list(st.history(handle))


def _client(store: Path, **kw: Any) -> TestClient:
    app = FastAPI()
    app.include_router(dashboard_router(open_source(store), poll_interval=0.01, **kw))
    return TestClient(app)


def _round(rec: Any) -> dict[str, Any]:
    """What the page is sent for one record, written out field by field."""
    return {
        "round": rec.round, "status": "ok", "metrics": dict(rec.metrics), "clients": list(rec.clients),
        "num_clients": len(rec.clients), "num_examples": rec.num_examples, "rejected": dict(rec.rejected),
        "bytes_down": rec.bytes_down, "bytes_up": rec.bytes_up, "seconds": rec.seconds,
    }  # fmt: skip


def _parse(text: str) -> tuple[list[tuple[str | None, str, Any]], list[str]]:
    """SSE text -> (id, event, data) for each event, and the comment lines."""
    events, comments = [], []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                comments.append(line)
            elif line:
                key, _, value = line.partition(": ")
                fields[key] = value
        if "event" in fields:
            events.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
        elif fields and set(fields) != {"retry"}:
            raise AssertionError(f"an event without a name: {block!r}")
    return events, comments


def test_the_runs_with_their_status_rounds_and_latest_metrics(store: Path) -> None:
    body = _client(store).get("/api/runs").json()
    assert [(r["name"], r["status"], r["rounds_done"], r["last_checkpoint"]) for r in body] == [
        ("hosp", "completed", 3, 3),
        ("dp", "completed", 2, 2),
    ]
    assert body[0]["latest_metrics"] == _history(store, "hosp")[-1].metrics
    assert body[1]["latest_metrics"]["dp_epsilon"] > 0


def test_one_run_holds_every_round_its_rejections_and_versions(store: Path) -> None:
    hist = _history(store, "hosp")
    body = _client(store).get("/api/runs/hosp").json()
    assert body["name"] == "hosp" and body["status"] == "completed"
    assert body["total_rounds"] is None  # a store keeps the run's identity, which leaves the rounds out
    assert body["rounds"] == [_round(r) for r in hist]
    assert [r["clients"] for r in body["rounds"]] == [CLIENTS, ["hospital-A", "hospital-C"], CLIENTS]
    assert [r["num_clients"] for r in body["rounds"]] == [3, 2, 3]
    assert list(body["rounds"][1]["rejected"]) == ["hospital-B"] and "NaN" in body["rounds"][1]["rejected"]["hospital-B"]
    assert body["rounds"][0]["rejected"] == {} and body["rounds"][2]["rejected"] == {}
    assert [(v["version"], v["metrics"]) for v in body["versions"]] == [(r.round, r.metrics) for r in hist]
    assert all(isinstance(v["created"], float) for v in body["versions"])


def test_the_events_of_a_finished_run_are_every_round_then_versions_status_and_end(store: Path) -> None:
    hist = _history(store, "hosp")
    versions = _client(store).get("/api/runs/hosp").json()["versions"]
    r = _client(store).get("/api/runs/hosp/events")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.text.startswith("retry: 2000\n\n")
    events, _ = _parse(r.text)
    assert events == [
        ("1", "round", _round(hist[0])),
        ("2", "round", _round(hist[1])),
        ("3", "round", _round(hist[2])),
        (None, "versions", versions),
        (None, "status", {"status": "completed"}),
        (None, "end", {"status": "completed"}),
    ]


def test_a_reconnecting_browser_gets_only_the_rounds_after_its_last_event_id(store: Path) -> None:
    hist = _history(store, "hosp")
    c = _client(store)
    events, _ = _parse(c.get("/api/runs/hosp/events", headers={"Last-Event-ID": "2"}).text)
    assert [(i, e) for i, e, _ in events] == [("3", "round"), (None, "versions"), (None, "status"), (None, "end")]
    assert events[0][2] == _round(hist[2])
    # the page's first connection says where its snapshot ended; a reconnect's header wins over it
    assert [i for i, e, _ in _parse(c.get("/api/runs/hosp/events?after=1").text)[0] if e == "round"] == ["2", "3"]
    got = _parse(c.get("/api/runs/hosp/events?after=1", headers={"Last-Event-ID": "3"}).text)[0]
    assert [e for _, e, _ in got] == ["versions", "status", "end"]
    # a garbled header is ignored (everything is sent again)
    got = _parse(c.get("/api/runs/hosp/events", headers={"Last-Event-ID": "x"}).text)[0]
    assert [i for i, e, _ in got if e == "round"] == ["1", "2", "3"]


def test_a_run_with_fewer_rounds_than_already_seen_was_started_over(store: Path) -> None:
    events, _ = _parse(_client(store).get("/api/runs/dp/events", headers={"Last-Event-ID": "5"}).text)
    assert events == [(None, "reset", {"rounds": 2})]


def test_dp_epsilon_travels_with_each_round(store: Path) -> None:
    events, _ = _parse(_client(store).get("/api/runs/dp/events").text)
    eps = [d["metrics"]["dp_epsilon"] for _, e, d in events if e == "round"]
    assert eps == [r.metrics["dp_epsilon"] for r in _history(store, "dp")]
    assert 0 < eps[0] < eps[1]  # ε grows round by round


def test_an_unknown_run_is_404_with_the_reason(store: Path) -> None:
    c = _client(store)
    for url in ("/api/runs/nope", "/api/runs/nope/events"):
        r = c.get(url)
        assert r.status_code == 404 and r.headers["content-type"] == "application/json", url
        assert "no run 'nope'" in r.json()["detail"], url


def test_the_page_and_its_files_come_from_the_package_and_fetch_nothing_outside(store: Path) -> None:
    c = _client(store)
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for ref in ('src="static/chart.js"', 'src="static/app.js"', 'href="static/style.css"', 'id="round"', "<canvas"):
        assert ref in page.text, ref
    bodies = [page.text]
    for name, kind in (("app.js", "text/javascript"), ("chart.js", "text/javascript"), ("style.css", "text/css")):
        r = c.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        bodies.append(r.text)
    for body in bodies:
        assert "http://" not in body and "https://" not in body and "//cdn" not in body
    assert "EventSource" in bodies[1] and "access_token" in bodies[1]
    for bad in ("/static/index.html", "/static/nope.js", "/static/..%2Fdashboard.py"):
        assert c.get(bad).status_code == 404, bad


def test_with_a_token_the_api_needs_it_and_the_page_does_not(store: Path) -> None:
    c = _client(store, token="s3cret")
    assert c.get("/").status_code == 200
    for url in ("/api/runs", "/api/runs/hosp", "/api/runs/hosp/events"):
        assert c.get(url).status_code == 401, url
        assert c.get(url, params={"access_token": "s3cret"}).status_code == 200, url
        assert c.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200, url
        assert c.get(url, params={"access_token": "wrong"}).status_code == 401, url


def test_bad_settings_are_refused(store: Path) -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        dashboard_router(open_source(store), poll_interval=0)


# ----------------------------------------------------------------- a run still training


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Events:
    """Reads a live event stream one event (or comment) at a time."""

    def __init__(self, lines: Iterator[str]) -> None:
        self.lines = lines

    def next(self) -> tuple[str | None, str, Any]:
        """The next event (id, name, data), or (None, ":", comment)."""
        fields: dict[str, str] = {}
        for line in self.lines:
            if line.startswith(":"):
                return None, ":", line
            if line:
                key, _, value = line.partition(": ")
                fields[key] = value
            elif "event" in fields:
                return fields.get("id"), fields["event"], json.loads(fields["data"])
            else:
                fields = {}
        raise AssertionError("the stream ended")

    def next_event(self) -> tuple[str | None, str, Any]:
        while (ev := self.next())[1] == ":":
            pass
        return ev


def test_a_live_run_streams_each_new_round_as_it_is_recorded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import httpx
    import uvicorn

    path = tmp_path / "live.db"
    run = build_run(parse_config(_cfg(path, "live", 3)))
    fed = run.federation
    fed.step()  # round 1 recorded and checkpointed; the run is "running"
    app = FastAPI()
    app.include_router(dashboard_router(open_source(path), poll_interval=0.02, heartbeat=0.01))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    caplog.set_level(logging.DEBUG, logger="fedloom.serve.dashboard")
    try:
        deadline = time.monotonic() + 30  # start-up guard, not a timing assertion
        while not server.started:
            assert time.monotonic() < deadline and th.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        url = f"http://127.0.0.1:{port}/api/runs/live/events"
        with httpx.stream("GET", url, timeout=60) as r:
            assert r.status_code == 200
            ev = _Events(r.iter_lines())
            hist = _history(path, "live")
            assert ev.next_event() == ("1", "round", _round(hist[0]))
            assert [v["version"] for v in ev.next_event()[2]] == [1]
            assert ev.next_event() == (None, "status", {"status": "running"})
            assert ev.next() == (None, ":", ": keep-alive")  # nothing new: a heartbeat keeps the line open
            fed.step()
            hist = _history(path, "live")
            assert ev.next_event() == ("2", "round", _round(hist[1]))
            assert [v["version"] for v in ev.next_event()[2]] == [1, 2]
            fed.run(3)  # the last round, then the status
            hist = _history(path, "live")
            assert ev.next_event() == ("3", "round", _round(hist[2]))
            assert [v["version"] for v in ev.next_event()[2]] == [1, 2, 3]
            assert ev.next_event() == (None, "status", {"status": "completed"})
            assert ev.next_event() == (None, "end", {"status": "completed"})
        # a client that goes away ends its stream on the server
        run2 = build_run(parse_config(_cfg(path, "live2", 3)))
        run2.federation.step()
        with httpx.stream("GET", url.replace("/live/", "/live2/"), timeout=60) as r:
            assert _Events(r.iter_lines()).next_event()[:2] == ("1", "round")
        deadline = time.monotonic() + 30
        while not any("'live2': the stream closed after round 1" in m for m in caplog.messages):
            assert time.monotonic() < deadline, "the stream went on after its client left"
            time.sleep(0.02)
    finally:
        server.should_exit = True
        th.join(timeout=30)
