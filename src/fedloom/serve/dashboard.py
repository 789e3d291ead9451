"""The live dashboard: one HTML page, its own JS and CSS, JSON and server-sent events (``fedloom serve``, ``/``).

Routes of :func:`dashboard_router`:

* ``GET /`` — the page (``static/index.html``); ``GET /static/{file}`` — its script, chart
  code and style, served from the installed package: nothing is fetched from the internet.
* ``GET /api/runs`` — the runs (status, rounds done, latest metrics).
* ``GET /api/runs/{name}`` — one run: every round record, the checkpoint versions, the status
  and ``total_rounds`` (known for a run directory; a store keeps only the run's identity,
  which leaves the number of rounds out, so it is ``null`` there).
* ``GET /api/runs/{name}/events`` — server-sent events (:func:`run_events`).

An unknown run is a 404 whose ``detail`` names it; a store that cannot be read at the moment
is a 503 with SQLite's reason. With a token, the ``/api`` routes need it (a header, or
``?access_token=``, which the page passes on from its own URL: an EventSource cannot set
headers).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import resources
from typing import Any

import anyio
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from fedloom.core.errors import StoreError
from fedloom.core.history import RoundRecord
from fedloom.serve.auth import require_token
from fedloom.serve.source import ModelSource, SourceError

__all__ = ["FINAL_STATUSES", "dashboard_router", "round_json", "run_events", "versions_json"]

log = logging.getLogger(__name__)

_STATIC = {"app.js": "text/javascript", "chart.js": "text/javascript", "style.css": "text/css"}
FINAL_STATUSES = frozenset({"completed", "failed", "interrupted", "budget_exhausted"})
"""Statuses after which a run records nothing more (unless it is started again: see :func:`run_events`)."""


def _num(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _metrics(m: dict[str, float]) -> dict[str, float | None]:
    return {k: _num(v) for k, v in m.items()}


def round_json(rec: RoundRecord) -> dict[str, Any]:
    """One round record as the page reads it (non-finite metrics become null)."""
    return {
        "round": rec.round,
        "status": rec.status,
        "metrics": _metrics(rec.metrics),
        "clients": list(rec.clients),
        "num_clients": len(rec.clients),
        "num_examples": rec.num_examples,
        "rejected": dict(rec.rejected),
        "bytes_down": rec.bytes_down,
        "bytes_up": rec.bytes_up,
        "seconds": _num(rec.seconds),
    }


def versions_json(source: ModelSource, name: str) -> list[dict[str, Any]]:
    """The run's checkpoint versions, oldest first (version N = the model after round N)."""
    return [{"version": v.version, "metrics": _metrics(v.metrics), "created": v.created} for v in source.versions(name)]


def _static(name: str) -> bytes:
    return resources.files("fedloom.serve").joinpath("static", name).read_bytes()


def _sse(event: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, allow_nan=False)}\n\n"


async def run_events(
    source: ModelSource,
    name: str,
    *,
    after: int = 0,
    poll_interval: float = 0.5,
    heartbeat: float = 15.0,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> AsyncIterator[str]:
    """The event stream of run ``name``, as ``text/event-stream`` chunks.

    Every ``poll_interval`` seconds it reads the source in a worker thread (the store's reads
    are blocking SQLite calls) and emits, in this order:

    * ``round`` — one per round record after ``after`` (``id:`` the round, so a browser that
      reconnects sends it back as ``Last-Event-ID``); data: :func:`round_json`;
    * ``versions`` — the checkpoint versions (:func:`versions_json`) up to the last round sent,
      first and whenever they change;
    * ``status`` — ``{"status": ...}``, first and whenever it changes;
    * ``reset`` — ``{"rounds": k}`` when the run holds fewer rounds than were already sent
      (it was started over with ``--fresh``): the page reloads it; the stream ends;
    * ``end`` — ``{"status": ...}`` once the run has a final status and everything is sent;
      the stream ends (the page closes its EventSource instead of reconnecting);
    * ``gone`` — ``{"detail": ...}`` when the run disappears from the source; the stream ends
      (not ``error``, which an EventSource also fires for a lost connection);
    * a comment line every ``heartbeat`` seconds, so that proxies keep the connection open.

    The status is read before the history: a run's final status is written after its last
    round, so a final status read first means the history read next is complete. A read that
    fails (a locked or busy store) is retried at the next poll. ``disconnected`` ends the
    stream when it returns True (the client went away).
    """
    sent, status, versions = max(after, 0), None, None
    beat = time.monotonic()
    yield "retry: 2000\n\n"

    def read() -> tuple[str, list[RoundRecord], list[dict[str, Any]]]:
        st = source.status(name)
        hist = list(source.history(name))
        last = hist[-1].round if hist else 0  # a checkpoint written after this read waits for its round
        return st, hist, [v for v in versions_json(source, name) if v["version"] <= last]

    first = True
    try:
        while True:
            if not first:
                await anyio.sleep(poll_interval)
            first = False
            if disconnected is not None and await disconnected():
                return
            try:
                st, hist, vs = await run_in_threadpool(read)
            except SourceError as exc:
                yield _sse("gone", {"detail": str(exc)})
                return
            except StoreError:
                continue  # a busy store: the next poll reads it again
            if (hist[-1].round if hist else 0) < sent:
                yield _sse("reset", {"rounds": hist[-1].round if hist else 0})
                return
            for rec in hist:
                if rec.round > sent:
                    yield _sse("round", round_json(rec), rec.round)
                    sent = rec.round
            if vs != versions:
                versions = vs
                yield _sse("versions", vs)
            if st != status:
                status = st
                yield _sse("status", {"status": st})
            if st in FINAL_STATUSES:
                yield _sse("end", {"status": st})
                return
            if time.monotonic() - beat >= heartbeat:
                beat = time.monotonic()
                yield ": keep-alive\n\n"
    finally:  # the end, an error, a reset, or the client gone (the server cancels the stream)
        log.debug("events of run %r: the stream closed after round %d", name, sent)


def _last_event_id(request: Request, after: int | None) -> int:
    header = request.headers.get("last-event-id", "").strip()
    if header.isascii() and header.isdigit():
        return int(header)  # a reconnecting browser: what it saw last wins over the URL's ?after=
    return after if after is not None and after > 0 else 0


def dashboard_router(
    source: ModelSource,
    *,
    token: str | None = None,
    poll_interval: float = 0.5,
    heartbeat: float = 15.0,
    dependencies: Sequence[Any] = (),
) -> APIRouter:
    """The dashboard's routes over ``source`` (include it into the model service's app).

    ``token`` guards the ``/api`` routes (:func:`fedloom.serve.auth.require_token`); more
    FastAPI ``dependencies`` may be given for them. The page itself is public: it holds no data.
    """
    if poll_interval <= 0 or heartbeat <= 0:
        raise ValueError(f"poll_interval and heartbeat must be > 0, got {poll_interval} and {heartbeat}")
    router = APIRouter()
    api = APIRouter(prefix="/api", dependencies=[Depends(require_token(token)), *dependencies])

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(_static("index.html"), headers={"Cache-Control": "no-cache"})

    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        kind = _STATIC.get(name)
        if kind is None:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(_static(name), media_type=kind, headers={"Cache-Control": "no-cache"})

    def guarded(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except SourceError as exc:
            raise HTTPException(404, str(exc)) from None
        except StoreError as exc:
            raise HTTPException(503, f"the store cannot be read now: {exc}") from None

    def snapshot(name: str) -> dict[str, Any]:
        status = source.status(name)  # before the history, the versions after it (see run_events)
        hist = list(source.history(name))
        last = hist[-1].round if hist else 0
        return {
            "name": name,
            "status": status,
            "rounds": [round_json(r) for r in hist],
            "versions": [v for v in versions_json(source, name) if v["version"] <= last],
            "total_rounds": source.planned_rounds(name),
        }

    def runs_json() -> list[dict[str, Any]]:
        return [
            {"name": r.name, "status": r.status, "rounds_done": r.rounds_done, "last_checkpoint": r.last_checkpoint,
             "created": r.created, "latest_metrics": _metrics(r.latest_metrics)}
            for r in source.runs()
        ]  # fmt: skip

    @api.get("/runs")
    def runs() -> list[dict[str, Any]]:
        """Every run of the source, oldest first: status, rounds done, latest metrics."""
        return guarded(runs_json)  # type: ignore[no-any-return]

    @api.get("/runs/{name}")
    def run(name: str) -> dict[str, Any]:
        """One run: its round records, checkpoint versions, status and planned rounds (or null)."""
        return guarded(lambda: snapshot(name))  # type: ignore[no-any-return]

    @api.get("/runs/{name}/events")
    async def events(name: str, request: Request, after: int | None = None) -> StreamingResponse:
        """Server-sent events of the run (``round``, ``versions``, ``status``, ``end``, ``reset``, ``gone``)."""
        await run_in_threadpool(guarded, lambda: source.status(name))
        stream = run_events(
            source, name, after=_last_event_id(request, after), poll_interval=poll_interval,
            heartbeat=heartbeat, disconnected=request.is_disconnected,
        )  # fmt: skip
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)

    router.include_router(api)
    return router
