"""The model service: FastAPI over a read-only model source (``fedloom serve STORE|RUN_DIR``).

Routes (``run`` picks a run of a store holding several; default: the newest run):

* ``GET /v1/models`` — the run's versions (its checkpoints: version N = the model after
  round N) with their round metrics, the task (input shape, feature names, kind) and ``latest``;
  ``GET /v1/models/{version}`` — one of them (``latest`` allowed); ``GET /v1/runs`` — the runs.
* ``POST /v1/models/{version}/predict`` (and ``/v1/models/latest/predict``) — a batch of
  inputs as ``rows`` (lists of the model's input values: the dataset's features, standardized
  as the scenario generator presents them; MNIST: 784 pixels as the dataset presents them),
  ``records`` (objects keyed by feature name) or ``images`` (28x28 nested lists). The answer:
  ``predictions`` (class indices for classification, 0/1 for binary, values for regression)
  and, for classification, ``probabilities`` (softmax; binary: P(y=1)).
* ``GET /healthz`` (open even with a token), ``GET /metrics`` (Prometheus text format),
  ``GET /docs`` and ``/openapi.json``.

``latest`` follows a run that is still training (hot swap, :mod:`fedloom.serve.models`). Bad
input is a 4xx whose ``detail`` says what is wrong — wrong feature count, a non-numeric or
non-finite value, an empty or oversized batch (``max_rows``: 413), a body over ``max_body``
bytes (413), an unknown run or version (404) — never a 500. The service only reads its source.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from fedloom.data.base import TaskSpec
from fedloom.serve.auth import require_token
from fedloom.serve.models import ModelCache, Served
from fedloom.serve.source import ModelSource, SourceError

__all__ = ["PredictRequest", "create_app"]

Number = FiniteFloat
RunQ = Annotated[str | None, Query(description="run name (default: the newest run)", max_length=200)]


class PredictRequest(BaseModel):
    """Exactly one of ``rows``, ``records`` or ``images``."""

    model_config = ConfigDict(extra="forbid")

    rows: list[list[Number]] | None = Field(None, description="inputs as lists of the model's input values, one list per example")
    records: list[dict[str, Number]] | None = Field(None, description="inputs keyed by feature name (tabular tasks)")
    images: list[list[list[Number]]] | None = Field(None, description="28x28 images as nested lists (MNIST)")


class PredictResponse(BaseModel):
    run: str
    version: int
    target: str
    kind: str
    predictions: list[float]
    probabilities: list[float] | list[list[float]] | None = None


def _clean(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _task_info(task: TaskSpec) -> dict[str, Any]:
    return {
        "kind": task.kind,
        "input_shape": list(task.input_shape),
        "num_outputs": task.num_outputs,
        "target": task.target_name,
        "feature_names": list(task.feature_names),
        "metrics": list(task.metrics),
    }


def _inputs(req: PredictRequest, task: TaskSpec, max_rows: int) -> torch.Tensor:
    given = [n for n in ("rows", "records", "images") if getattr(req, n) is not None]
    if len(given) != 1:
        raise HTTPException(422, f"give exactly one of rows, records or images (got {given or 'none'})")
    kind = given[0]
    data = getattr(req, kind)
    if not data:
        raise HTTPException(422, f"{kind} is empty")
    if len(data) > max_rows:
        raise HTTPException(413, f"{len(data)} inputs in one request; at most {max_rows}")
    numel = math.prod(task.input_shape)
    if kind == "records":
        names = list(task.feature_names)
        if not names:
            raise HTTPException(422, "this model's inputs have no feature names: send rows")
        rows = []
        for i, rec in enumerate(data):
            missing, extra = [n for n in names if n not in rec], sorted(set(rec) - set(names))
            if missing or extra:
                raise HTTPException(422, f"records[{i}]: missing features {missing}, unknown features {extra}")
            rows.append([rec[n] for n in names])
        return torch.tensor(rows, dtype=torch.float32)
    if kind == "images":
        side = math.isqrt(numel)
        if len(task.input_shape) >= 2:
            h, w = task.input_shape[-2:]
        elif not task.feature_names and side * side == numel:  # MNIST: 784 pixels = 28x28
            h = w = side
        else:
            raise HTTPException(422, f"this model takes rows of {numel} features, not images")
        for i, img in enumerate(data):
            if len(img) != h or any(len(r) != w for r in img):
                raise HTTPException(422, f"images[{i}] is not {h}x{w}")
        return torch.tensor(data, dtype=torch.float32).reshape(len(data), *task.input_shape)
    for i, row in enumerate(data):
        if len(row) != numel:
            raise HTTPException(422, f"rows[{i}] has {len(row)} values; the model takes {numel}")
    return torch.tensor(data, dtype=torch.float32).reshape(len(data), *task.input_shape)


def _predict(served: Served, x: torch.Tensor) -> dict[str, Any]:
    task = served.task
    with torch.inference_mode():
        out = served.model(x).float()
    res: dict[str, Any] = {"run": served.run, "version": served.version, "target": task.target_name, "kind": task.kind}
    if task.kind == "classification":
        probs = torch.softmax(out.reshape(len(x), -1), dim=1)
        res["predictions"] = probs.argmax(1).tolist()
        res["probabilities"] = probs.tolist()
    elif task.kind == "binary":
        p = torch.sigmoid(out.reshape(-1))
        res["predictions"] = (p >= 0.5).long().tolist()
        res["probabilities"] = p.tolist()
    else:
        res["predictions"] = out.reshape(-1).tolist()
    return res


class _BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused with 413, chunked or not.

    The body is read (up to the limit) before the app sees the request, then replayed to it.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        parts: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                body = json.dumps({"detail": f"request body over {self.limit} bytes"}).encode()
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
            parts.append(chunk)
            if not msg.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]

        async def replayed() -> Any:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


def create_app(
    source: ModelSource,
    *,
    token: str | None = None,
    max_rows: int = 1024,
    max_body: int = 8 << 20,
    routers: Sequence[APIRouter] = (),
    refresh: float = 0.5,
) -> FastAPI:
    """The service over ``source``; ``routers`` (the dashboard) are included as they are."""
    app = FastAPI(
        title="fedloom model service",
        description="Models trained by fedloom: versions, predictions, health and metrics.",
        version="1",
    )
    cache = ModelCache(source, refresh=refresh)
    reg = CollectorRegistry()
    requests = Counter("fedloom_serve_requests", "HTTP requests", ["route", "status"], registry=reg)
    latency = Histogram("fedloom_serve_request_seconds", "request latency", ["route"], registry=reg)
    rows_total = Counter("fedloom_serve_rows_predicted", "inputs predicted", ["run"], registry=reg)
    version_g = Gauge("fedloom_serve_model_version", "version that answered the last prediction", ["run"], registry=reg)
    swaps = Gauge("fedloom_serve_hot_swaps", "times 'latest' moved to a newer checkpoint", registry=reg)
    swaps.set_function(lambda: cache.swaps)
    app.state.cache = cache
    app.state.source = source

    app.add_middleware(_BodyLimit, limit=max_body)

    @app.middleware("http")
    async def observe(request: Request, call_next):  # type: ignore[no-untyped-def]
        size = request.headers.get("content-length")
        if size is not None and (not (size.isascii() and size.isdigit()) or int(size) > max_body):
            return JSONResponse({"detail": f"request body over {max_body} bytes"}, status_code=413)
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        requests.labels(name, str(response.status_code)).inc()
        latency.labels(name).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(SourceError)
    async def not_found(request: Request, exc: SourceError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        reasons = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            reasons.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
        return JSONResponse({"detail": "; ".join(reasons) or "invalid request"}, status_code=422)

    def pick(run: str | None) -> str:
        return run if run is not None else source.default_run()

    def parse_version(version: str) -> int | str:
        if version == "latest":
            return "latest"
        if not (version.isascii() and version.isdigit()):  # "²".isdigit() is True but int("²") fails
            raise HTTPException(404, f"version must be a round number or 'latest', got {version!r}")
        return int(version)

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_token(token))])

    @api.get("/runs")
    def runs() -> list[dict[str, Any]]:
        return [
            {"name": r.name, "status": r.status, "rounds_done": r.rounds_done, "last_checkpoint": r.last_checkpoint,
             "latest_metrics": _clean(r.latest_metrics)}
            for r in source.runs()
        ]  # fmt: skip

    def version_info(name: str, v: Any) -> dict[str, Any]:
        return {"version": v.version, "round": v.version, "metrics": _clean(v.metrics), "created": v.created}

    @api.get("/models")
    def models(run: RunQ = None) -> dict[str, Any]:
        name = pick(run)
        versions = source.versions(name)
        return {
            "run": name,
            "status": source.status(name),
            "task": _task_info(source.run(name).task),
            "latest": versions[-1].version if versions else None,
            "versions": [version_info(name, v) for v in versions],
        }

    @api.get("/models/{version}")
    def model(version: str, run: RunQ = None) -> dict[str, Any]:
        name = pick(run)
        want = parse_version(version)
        versions = source.versions(name)
        if not versions:
            raise SourceError(f"run {name!r} has no checkpoint yet")
        match = versions[-1] if want == "latest" else next((v for v in versions if v.version == want), None)
        if match is None:
            raise SourceError(f"run {name!r} has no version {want}; it has {[v.version for v in versions]}")
        return {"run": name, **version_info(name, match), "task": _task_info(source.run(name).task)}

    @api.post("/models/{version}/predict", response_model=PredictResponse, response_model_exclude_none=True)
    def predict(version: str, req: PredictRequest, run: RunQ = None) -> dict[str, Any]:
        name = pick(run)
        served = cache.get(name, parse_version(version))
        x = _inputs(req, served.task, max_rows)
        res = _predict(served, x)
        rows_total.labels(name).inc(len(x))
        version_g.labels(name).set(served.version)
        return res

    app.include_router(api)
    for r in routers:
        app.include_router(r)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        try:
            n = len(source.runs())
        except Exception as exc:  # noqa: BLE001 - health reports, never raises
            return JSONResponse({"status": "error", "detail": str(exc)}, status_code=503)  # type: ignore[return-value]
        return {"status": "ok", "runs": n}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(reg).decode(), media_type=CONTENT_TYPE_LATEST)

    return app
