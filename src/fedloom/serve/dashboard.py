"""The live dashboard: one HTML page, its own JS and CSS, JSON and server-sent events (``fedloom serve``, ``/``).

Routes of :func:`dashboard_router`:

* ``GET /`` — the page (``static/index.html``); ``GET /static/{file}`` — its script, chart
  code and style, served from the installed package: nothing is fetched from the internet.
* ``GET /api/runs`` — the runs (status, rounds done, latest metrics).
* ``GET /api/runs/{name}`` — one run: every round record, the checkpoint versions, the status.
* ``GET /api/runs/{name}/events`` — server-sent events: ``round`` (one per new round record,
  ``id`` = the round), ``versions`` (when the checkpoints change), ``status`` (when the run's
  status changes), and a comment every 15 s to keep proxies from closing the stream. The
  stream polls the read-only source every ``poll_interval`` seconds; a reconnecting browser
  sends ``Last-Event-ID`` (or ``?after=``) and gets only the rounds after it.

With a token, the ``/api`` routes need it (a header, or ``?access_token=``, which the page
passes on from its own URL: an EventSource cannot set headers).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from fedloom.core.history import RoundRecord
from fedloom.serve.auth import require_token
from fedloom.serve.source import ModelSource, SourceError

__all__ = ["dashboard_router", "round_json"]

_STATIC = {"app.js": "text/javascript", "chart.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
_HEARTBEAT = 15.0


def _num(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def round_json(rec: RoundRecord) -> dict[str, Any]:
    """One round record as the page reads it (non-finite metrics become null)."""
    return {
        "round": rec.round,
        "status": rec.status,
        "metrics": {k: _num(v) for k, v in rec.metrics.items()},
        "clients": list(rec.clients),
        "num_clients": len(rec.clients),
        "num_examples": rec.num_examples,
        "rejected": dict(rec.rejected),
        "bytes_down": rec.bytes_down,
        "bytes_up": rec.bytes_up,
        "seconds": rec.seconds,
    }


def _static(name: str) -> bytes:
    return resources.files("fedloom.serve").joinpath("static", name).read_bytes()


def _sse(event: str, data: Any, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, allow_nan=False)}\n\n"


def dashboard_router(source: ModelSource, *, token: str | None = None, poll_interval: float = 0.5) -> APIRouter:
    """The dashboard's routes over ``source`` (include it into the model service's app)."""
    router = APIRouter()
    api = APIRouter(prefix="/api", dependencies=[Depends(require_token(token))])

    @router.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(_static("index.html"))

    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        kind = _STATIC.get(name)
        if kind is None:
            raise HTTPException(404, f"no static file {name!r}")
        return Response(_static(name), media_type=kind, headers={"Cache-Control": "no-cache"})

    def versions(name: str) -> list[dict[str, Any]]:
        return [{"version": v.version, "metrics": {k: _num(x) for k, x in v.metrics.items()}, "created": v.created}
                for v in source.versions(name)]  # fmt: skip

    def snapshot(name: str) -> dict[str, Any]:
        total = source.planned_rounds(name)
        return {
            "name": name,
            "status": source.status(name),
            "rounds": [round_json(r) for r in source.history(name)],
            "versions": versions(name),
            "total_rounds": total,
        }

    @api.get("/runs")
    def runs() -> list[dict[str, Any]]:
        return [
            {"name": r.name, "status": r.status, "rounds_done": r.rounds_done, "last_checkpoint": r.last_checkpoint,
             "created": r.created, "latest_metrics": {k: _num(v) for k, v in r.latest_metrics.items()}}
            for r in source.runs()
        ]  # fmt: skip

    @api.get("/runs/{name}")
    def run(name: str) -> dict[str, Any]:
        try:
            return snapshot(name)
        except SourceError as exc:
            raise HTTPException(404, str(exc)) from None

    @api.get("/runs/{name}/events")
    async def events(name: str, request: Request, after: int | None = None) -> StreamingResponse:
        try:
            await run_in_threadpool(source.status, name)
        except SourceError as exc:
            raise HTTPException(404, str(exc)) from None
        last_id = request.headers.get("last-event-id")
        start = int(last_id) if last_id is not None and last_id.isdigit() else (after if after is not None else 0)

        async def stream() -> AsyncIterator[str]:
            sent, status, vers = start, None, None
            beat = time.monotonic()
            yield "retry: 2000\n\n"
            while True:
                if await request.is_disconnected():
                    return
                try:
                    hist, st, vs = await run_in_threadpool(lambda: (source.history(name), source.status(name), versions(name)))
                except SourceError as exc:
                    yield _sse("error", {"detail": str(exc)})
                    return
                for rec in hist:
                    if rec.round > sent:
                        yield _sse("round", round_json(rec), rec.round)
                        sent = rec.round
                if vs != vers:
                    vers = vs
                    yield _sse("versions", vs)
                if st != status:
                    status = st
                    yield _sse("status", {"status": st})
                if time.monotonic() - beat > _HEARTBEAT:
                    beat = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(poll_interval)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    router.include_router(api)
    return router
