"""The model service: FastAPI over a read-only model source (``fedloom serve STORE|RUN_DIR``).

Routes (``?run=NAME`` picks a run of a store holding several; default: the newest run):

* ``GET /v1/runs`` — the runs; ``GET /v1/models`` — the run's versions (its checkpoints:
  version N = the model after round N) with their round metrics, ``latest``, and the task
  (kind, input shape, feature names, what a request's values mean);
  ``GET /v1/models/{version}`` — one of them (``latest`` allowed).
* ``POST /v1/models/{version}/predict`` (and ``/v1/models/latest/predict``) — a batch of
  inputs: ``rows`` or ``records`` (keyed by feature name) for the scenarios, ``images``
  (28x28, or flat 784) or ``rows`` for MNIST, in the dataset's own units; the service applies
  the dataset's scaling (:mod:`fedloom.serve.schemas`; ``"scaled": true`` for values already
  scaled). The request schema is generated per task and shown in ``/openapi.json``. The
  answer: ``predictions`` (class index, 0/1 for binary, the value for regression), the
  target's name and, for classification and binary, ``probabilities`` (softmax; sigmoid).
* ``GET /healthz`` (open even with a token), ``GET /metrics`` (Prometheus text: requests by
  route and status, latency, rows predicted, version served, hot swaps), ``GET /docs``.

``latest`` follows a run that is still training (hot swap, :mod:`fedloom.serve.models`). Bad
input is a 4xx whose ``detail`` says what is wrong — wrong feature count or image size, a
non-numeric or non-finite value (JSON ``NaN`` too), an empty batch or one over ``max_rows``
(413), a body over ``max_body`` bytes (413), an unknown run or version (404) — never a 500.
The service only reads its source.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema

from fedloom.serve.auth import require_token
from fedloom.serve.models import ModelCache, Served
from fedloom.serve.schemas import (
    InputError,
    InputSpec,
    PredictResponse,
    describe_errors,
    model_input,
    request_model,
    task_info,
)
from fedloom.serve.source import ModelSource, ModelVersion, SourceError

__all__ = ["create_app"]

PREDICT_PATH = "/v1/models/{version}/predict"
RunQ = Annotated[str | None, Query(description="run name (default: the newest run)", max_length=200)]


def _clean(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def _finite(values: list[Any]) -> list[Any]:
    """Non-finite floats as None (JSON has no NaN), nested lists included."""
    return [_finite(v) if isinstance(v, list) else (None if isinstance(v, float) and not math.isfinite(v) else v) for v in values]


def _predict(served: Served, x: torch.Tensor) -> dict[str, Any]:
    task = served.task
    with torch.inference_mode():
        out = served.model(x).float()
    res: dict[str, Any] = {"run": served.run, "version": served.version, "target": task.target_name, "kind": task.kind}
    if task.kind == "classification":
        probs = torch.softmax(out.reshape(len(x), -1), dim=1)
        res["predictions"] = probs.argmax(1).tolist()
        res["probabilities"] = probs.tolist()
        finite = torch.isfinite(probs).all(1)
        ok = bool(finite.all())
        if not ok:
            res["predictions"] = [c if f else None for c, f in zip(res["predictions"], finite.tolist(), strict=True)]
    elif task.kind == "binary":
        p = torch.sigmoid(out.reshape(-1))
        res["predictions"] = [int(v >= 0.5) if math.isfinite(v) else None for v in p.tolist()]
        res["probabilities"] = p.tolist()
        ok = bool(torch.isfinite(p).all())
    else:
        res["predictions"] = out.reshape(-1).tolist()
        ok = bool(torch.isfinite(out).all())
    if not ok:
        for k in ("predictions", "probabilities"):
            if k in res:
                res[k] = _finite(res[k])
    return res


class _Swaps(Collector):
    def __init__(self, cache: ModelCache) -> None:
        self.cache = cache

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("fedloom_serve_hot_swaps", "times 'latest' moved to a newer checkpoint", value=self.cache.swaps)


class _Observe:
    """ASGI middleware: request metrics, and the body limit (413 over ``limit`` bytes, chunked or not).

    A body is read (up to the limit) before the app sees the request, then replayed to it.
    """

    def __init__(self, app: Any, limit: int, requests: Counter, latency: Histogram) -> None:
        self.app, self.limit, self.requests, self.latency = app, limit, requests, latency

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body over {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]

        async def observed_send(msg: Any) -> None:
            if msg["type"] == "http.response.start":
                status[0] = int(msg["status"])
            await send(msg)

        try:
            app_receive = receive
            if scope.get("method") not in ("GET", "HEAD", "OPTIONS"):
                declared = dict(scope.get("headers") or []).get(b"content-length")
                if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                    await self._refuse(observed_send)
                    return
                parts: list[bytes] = []
                seen = 0
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        status[0] = 499  # the client went away before sending its body
                        return
                    chunk = msg.get("body", b"")
                    seen += len(chunk)
                    if seen > self.limit:
                        await self._refuse(observed_send)
                        return
                    parts.append(chunk)
                    if not msg.get("more_body", False):
                        break
                replay = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]

                async def app_receive() -> Any:
                    return replay.pop() if replay else await receive()

            await self.app(scope, app_receive, observed_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(route, str(status[0])).inc()
            self.latency.labels(route).observe(time.perf_counter() - t0)


async def _body(request: Request) -> bytes:
    return await request.body()


def create_app(
    source: ModelSource,
    *,
    token: str | None = None,
    max_rows: int = 1024,
    max_body: int = 8 << 20,
    routers: Sequence[APIRouter] = (),
    refresh: float = 0.5,
) -> FastAPI:
    """The service over ``source``; ``routers`` (the dashboard) are included as they are.

    ``token``: require it as a bearer token on ``/v1`` (:func:`fedloom.serve.auth.require_token`);
    ``max_rows``: most inputs per predict request (413 beyond); ``max_body``: most request
    bytes (413 beyond); ``refresh``: seconds between looks for a newer ``latest``.
    """
    app = FastAPI(
        title="fedloom model service",
        description="Models trained by fedloom: versions, predictions, health and metrics. "
        "Predict requests take values in the dataset's own units (see each request schema); "
        "with a token, /v1 needs `Authorization: Bearer <token>` or `?access_token=`.",
        version="1",
    )
    cache = ModelCache(source, refresh=refresh)
    reg = CollectorRegistry()
    requests = Counter("fedloom_serve_requests", "HTTP requests", ["route", "status"], registry=reg)
    latency = Histogram("fedloom_serve_request_seconds", "request latency", ["route"], registry=reg)
    rows_total = Counter("fedloom_serve_rows_predicted", "inputs predicted", ["run"], registry=reg)
    version_g = Gauge("fedloom_serve_model_version", "version that answered the last prediction", ["run"], registry=reg)
    reg.register(_Swaps(cache))
    app.state.cache = cache
    app.state.source = source
    app.add_middleware(_Observe, limit=max_body, requests=requests, latency=latency)

    schemas: dict[InputSpec, type[BaseModel]] = {}
    schemas_lock = threading.Lock()

    def schema_of(spec: InputSpec) -> type[BaseModel]:
        with schemas_lock:
            model = schemas.get(spec)
            if model is None:
                base = f"{spec.dataset.title().replace('_', '')}PredictRequest"
                taken = {m.__name__ for m in schemas.values()}
                name = base if base not in taken else next(f"{base}{i}" for i in range(2, 10**6) if f"{base}{i}" not in taken)
                model = schemas[spec] = request_model(spec, max_rows=max_rows, name=name)
            return model

    @app.exception_handler(SourceError)
    async def not_found(request: Request, exc: SourceError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(InputError)
    async def bad_input(request: Request, exc: InputError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, reason = describe_errors(list(exc.errors()))
        return JSONResponse({"detail": reason}, status_code=status)

    def pick(run: str | None) -> str:
        return run if run is not None else source.default_run()

    def parse_version(version: str) -> int | str:
        if version == "latest":
            return "latest"
        if re.fullmatch(r"[0-9]{1,12}", version) is None:  # ASCII digits: "²".isdigit() is True, int("²") fails
            raise HTTPException(404, f"version must be a round number or 'latest', got {version!r}")
        return int(version)

    def version_info(v: ModelVersion) -> dict[str, Any]:
        return {"version": v.version, "round": v.version, "metrics": _clean(v.metrics), "created": v.created}

    api = APIRouter(prefix="/v1", dependencies=[Depends(require_token(token))])

    @api.get("/runs", summary="The runs of the source")
    def runs() -> list[dict[str, Any]]:
        return [
            {"name": r.name, "status": r.status, "rounds_done": r.rounds_done, "last_checkpoint": r.last_checkpoint,
             "latest_metrics": _clean(r.latest_metrics)}
            for r in source.runs()
        ]  # fmt: skip

    @api.get("/models", summary="A run's model versions (its checkpoints), their metrics and the task")
    def models(run: RunQ = None) -> dict[str, Any]:
        name = pick(run)
        versions = source.versions(name)
        return {
            "run": name,
            "status": source.status(name),
            "task": task_info(source.run(name).task, cache.spec(name)),
            "latest": versions[-1].version if versions else None,
            "versions": [version_info(v) for v in versions],
        }

    @api.get("/models/{version}", summary="One model version ('latest' allowed)")
    def model(version: str, run: RunQ = None) -> dict[str, Any]:
        name = pick(run)
        want = parse_version(version)
        versions = source.versions(name)
        if not versions:
            raise SourceError(f"run {name!r} has no checkpoint yet")
        match = versions[-1] if want == "latest" else next((v for v in versions if v.version == want), None)
        if match is None:
            raise SourceError(f"run {name!r} has no version {want}; it has {[v.version for v in versions]}")
        return {"run": name, **version_info(match), "task": task_info(source.run(name).task, cache.spec(name))}

    @api.post(
        "/models/{version}/predict",
        summary="Predict a batch with one version ('latest': the newest, following a run that trains)",
        description="The body's schema depends on the run's task: one schema per run is listed (oneOf); "
        "values are in the dataset's own units unless `scaled` is true.",
        responses={
            200: {"model": PredictResponse, "description": "the predictions"},
            404: {"description": "no such run or version"},
            413: {"description": "more inputs than the limit, or a body over the size limit"},
            422: {"description": "the body does not fit the model's inputs (the reason is in detail)"},
        },
    )
    def predict(version: str, body: Annotated[bytes, Depends(_body)], run: RunQ = None) -> JSONResponse:
        name = pick(run)
        served = cache.get(name, parse_version(version))
        model = schema_of(served.spec)
        try:
            req = model.model_validate_json(body)
        except ValidationError as exc:
            status, reason = describe_errors(exc.errors(include_url=False), served.spec)
            raise InputError(reason, status) from None
        x = model_input(served.spec, req)
        res = _predict(served, x)
        rows_total.labels(name).inc(len(x))
        version_g.labels(name).set(served.version)
        return JSONResponse(res)

    app.include_router(api)
    for r in routers:
        app.include_router(r)

    @app.get("/healthz", summary="Liveness: the source can be read")
    def healthz() -> JSONResponse:
        try:
            n = len(source.runs())
        except Exception as exc:  # noqa: BLE001 - health reports, never raises
            return JSONResponse({"status": "error", "detail": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", "runs": n})

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(reg).decode(), media_type=CONTENT_TYPE_LATEST)

    openapi_cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        """The OpenAPI document, with each current run's generated predict request schema."""
        try:
            names = [r.name for r in source.runs()]
        except Exception:  # noqa: BLE001 - an unreadable source still has a schema
            names = []
        key = json.dumps(names)
        if openapi_cache.get("key") == key:
            return openapi_cache["doc"]  # type: ignore[no-any-return]
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        per_run: dict[str, str] = {}
        for name in names:
            try:
                per_run[name] = schema_of(cache.spec(name)).__name__
            except Exception:  # noqa: BLE001 - a run this fedloom cannot rebuild is left out of the schema
                continue
        used = [m for m in schemas.values() if m.__name__ in set(per_run.values())]
        body_schema: dict[str, Any] = {"type": "object", "description": "no run yet: the schema follows the run's task"}
        if used:
            _, defs = models_json_schema([(m, "validation") for m in used], ref_template="#/components/schemas/{model}")
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in used]
            body_schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
        op = doc["paths"][PREDICT_PATH]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_schema}}}
        if per_run:
            op["description"] += " Runs: " + ", ".join(f"{n} → {m}" for n, m in per_run.items()) + "."
        openapi_cache.update(key=key, doc=doc)
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
    return app
