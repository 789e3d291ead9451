"""Property-based API fuzzing with schemathesis: no request the OpenAPI schema allows (or breaks) gets a 500.

The app serves a hospital MLP and an MNIST 2NN from one store, so the generated predict bodies
cover both generated request schemas (rows/records, images). A planted 500 shows the check bites.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from fastapi import APIRouter  # noqa: E402
from fastapi.responses import JSONResponse  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.failures import FailureGroup  # noqa: E402

from fedloom.core.config import parse_config  # noqa: E402
from fedloom.run import build_run  # noqa: E402
from fedloom.serve import open_source  # noqa: E402
from fedloom.serve.app import create_app  # noqa: E402
from fedloom.serve.dashboard import dashboard_router  # noqa: E402

planted = APIRouter()


@planted.get("/planted")
def _planted(n: int = 0) -> JSONResponse:
    """A deliberate server error for n > 3 (only to prove the fuzzing finds one)."""
    return JSONResponse({"n": n}, status_code=500 if n > 3 else 200)


def _app(tmp: Path, *, mnist: bool = True):  # type: ignore[no-untyped-def]
    store = tmp / "store.db"
    base = {"seed": 0, "engine": "sequential", "store": str(store)}
    runs = [
        {"run": {**base, "name": "hosp", "rounds": 2}, "data": {"name": "hospital"}, "model": {"name": "mlp", "hidden": [8]},
         "strategy": {"name": "fedavg", "fraction": 1.0}, "client": {"epochs": 1, "batch_size": 64, "lr": 0.01, "max_steps": 2}},
        {"run": {**base, "name": "digits", "rounds": 1}, "data": {"name": "mnist", "num_clients": 100}, "model": {"name": "2nn", "hidden": 16},
         "strategy": {"name": "fedavg", "fraction": 0.01}, "client": {"epochs": 1, "batch_size": 20, "lr": 0.05, "max_steps": 1}},
    ]  # fmt: skip
    for cfg in runs if mnist else runs[:1]:
        build_run(parse_config(cfg)).federation.run(cfg["run"]["rounds"])
    src = open_source(store)
    return create_app(src, max_rows=16, routers=[dashboard_router(src), planted])


APP = _app(Path(tempfile.mkdtemp(prefix="fedloom-fuzz-")))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
# The coverage phase (boundary values of every keyword) costs minutes on 784-value images:
# it runs on a hospital-only app below, the fuzzing phase on both tasks here.
schema.config.phases.coverage.enabled = False
hospital = schemathesis.openapi.from_asgi("/openapi.json", _app(Path(tempfile.mkdtemp(prefix="fedloom-fuzz-")), mnist=False))


def _run_for(body: Any) -> str:
    """Aim a generated body at the run whose schema it was drawn from (random names only 404)."""
    if isinstance(body, dict):
        if "images" in body:
            return "digits"
        rows = body.get("rows")
        if isinstance(rows, list) and rows and isinstance(rows[0], list) and len(rows[0]) == 784:
            return "digits"
    return "hosp"


@schema.exclude(path_regex=".*/events$").exclude(path="/planted").parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error(case) -> None:  # type: ignore[no-untyped-def]
    if case.method == "POST":
        case.path_parameters["version"] = "latest"
        case.query = {**(case.query or {}), "run": _run_for(case.body)}
    case.call_and_validate(checks=[not_a_server_error])


@hospital.include(path_regex="^/v1/").parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_error_at_the_boundaries(case) -> None:  # type: ignore[no-untyped-def]
    if case.method == "POST":
        case.path_parameters["version"] = "latest"
        case.query = {**(case.query or {}), "run": "hosp"}
    case.call_and_validate(checks=[not_a_server_error])


def test_the_predict_schema_offers_both_tasks() -> None:
    body = APP.openapi()["paths"]["/v1/models/{version}/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"oneOf": [{"$ref": "#/components/schemas/HospitalPredictRequest"},
                                        {"$ref": "#/components/schemas/MnistPredictRequest"}]}  # fmt: skip


def test_a_planted_server_error_is_found() -> None:
    op = schema["/planted"]["GET"]

    @given(case=op.as_strategy())
    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case) -> None:  # type: ignore[no-untyped-def]
        case.call_and_validate(checks=[not_a_server_error])

    with pytest.raises(FailureGroup, match="Server error"):
        fuzz()
