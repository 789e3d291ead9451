"""The model service: exact predictions in the dataset's units, every malformed request a 4xx with its
reason, the generated OpenAPI schema, metrics, auth, hot swap, read only, TLS, the CLI's refusals."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from fedloom.core.config import parse_config  # noqa: E402
from fedloom.data.mnist_federated import MNIST_MEAN, MNIST_STD  # noqa: E402
from fedloom.data.scenarios._common import standardize  # noqa: E402
from fedloom.data.scenarios.fraud import REFERENCE as FRAUD_REF  # noqa: E402
from fedloom.data.scenarios.hospital import FEATURE_NAMES, REFERENCE  # noqa: E402
from fedloom.run import build_run  # noqa: E402
from fedloom.serve import open_source  # noqa: E402
from fedloom.serve.app import create_app  # noqa: E402
from fedloom.serve.dashboard import dashboard_router  # noqa: E402

CENTER = np.array([c for c, _ in REFERENCE])
SCALE = np.array([s for _, s in REFERENCE])


def _cfg(store: Path | None, name: str = "hosp", data: str = "hospital", rounds: int = 2, **extra: object) -> dict:
    run = {"name": name, "seed": 0, "rounds": rounds, "engine": "sequential"}
    return {
        "run": {**run, "store": str(store)} if store else run,
        "data": {"name": data},
        "model": {"name": "mlp", "hidden": [8]},
        "strategy": {"name": "fedavg", "fraction": 1.0},
        "client": {"epochs": 1, "batch_size": 64, "lr": 0.01, "max_steps": 4},
        **extra,
    }


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("serve")
    store = d / "store.db"
    build_run(parse_config(_cfg(store, rounds=3))).federation.run(3)
    build_run(parse_config(_cfg(store, name="fraud", data="fraud", rounds=2))).federation.run(2)
    return {"store": store}


@pytest.fixture(scope="module")
def client(stores: dict[str, Path]) -> TestClient:
    src = open_source(stores["store"])
    return TestClient(create_app(src, max_rows=50, routers=[dashboard_router(src)]))


@pytest.fixture(scope="module")
def mnist(tmp_path_factory: pytest.TempPathFactory) -> tuple[TestClient, torch.nn.Module]:
    store = tmp_path_factory.mktemp("mnist") / "store.db"
    cfg = {
        "run": {"name": "digits", "seed": 0, "rounds": 1, "engine": "sequential", "store": str(store)},
        "data": {"name": "mnist", "partition": "iid", "num_clients": 100},
        "model": {"name": "2nn", "hidden": 16},
        "strategy": {"name": "fedavg", "fraction": 0.01},
        "client": {"epochs": 1, "batch_size": 20, "lr": 0.05, "max_steps": 1},
    }
    build_run(parse_config(cfg)).federation.run(1)
    src = open_source(store)
    return TestClient(create_app(src, max_rows=8)), src.run("digits").load(1)


def _model(store: Path, run: str, version: int) -> torch.nn.Module:
    return open_source(store).run(run).load(version)


def _raw(n: int, seed: int = 0) -> list[list[float]]:
    """Hospital rows in the dataset's own units (age in years, ...)."""
    rng = np.random.default_rng(seed)
    return (CENTER + SCALE * rng.standard_normal((n, len(CENTER)))).tolist()


def _out(model: torch.nn.Module, x: torch.Tensor) -> list[float]:
    with torch.inference_mode():
        return model(x).reshape(-1).tolist()


def test_versions_are_the_checkpoints_with_their_metrics(client: TestClient, stores: dict[str, Path]) -> None:
    body = client.get("/v1/models", params={"run": "hosp"}).json()
    assert [v["version"] for v in body["versions"]] == [1, 2, 3] and body["latest"] == 3
    assert body["task"]["kind"] == "regression" and body["task"]["feature_names"] == list(FEATURE_NAMES)
    assert body["task"]["input"]["accepts"] == ["rows", "records"]
    assert body["task"]["input"]["reference"][0] == [55.0, 18.0]  # age: (years - 55) / 18
    assert body["status"] == "completed"
    from fedloom.store import Store

    with Store.open(stores["store"], read_only=True) as st:
        hist = st.history(st.find_run("hosp"))  # type: ignore[arg-type]
    assert body["versions"][1]["metrics"]["test_mae"] == hist[1].metrics["test_mae"]
    assert client.get("/v1/models/2", params={"run": "hosp"}).json()["version"] == 2
    assert client.get("/v1/models/latest", params={"run": "hosp"}).json()["version"] == 3
    assert client.get("/v1/models").json()["run"] == "fraud"  # the newest run by default
    assert [r["name"] for r in client.get("/v1/runs").json()] == ["hosp", "fraud"]


def test_rows_and_records_in_the_dataset_units_give_the_models_output(client: TestClient, stores: dict[str, Path]) -> None:
    raw = _raw(5)
    x = torch.from_numpy(standardize(np.asarray(raw), REFERENCE))  # what the dataset would hand the model
    res = client.post("/v1/models/2/predict", params={"run": "hosp"}, json={"rows": raw}).json()
    assert res["version"] == 2 and res["target"] == "length_of_stay_days" and "probabilities" not in res
    assert res["predictions"] == _out(_model(stores["store"], "hosp", 2), x)
    records = [dict(zip(FEATURE_NAMES, row, strict=True)) for row in raw]
    by_name = client.post("/v1/models/latest/predict", params={"run": "hosp"}, json={"records": records}).json()
    latest = _model(stores["store"], "hosp", 3)
    assert by_name["version"] == 3 and by_name["predictions"] == _out(latest, x)
    # already standardized values, as the dataset holds them: passed on unchanged
    scaled = client.post("/v1/models/latest/predict?run=hosp", json={"rows": x.tolist(), "scaled": True}).json()
    assert scaled["predictions"] == _out(latest, x)


def test_raw_rows_reproduce_the_datasets_own_scaling(client: TestClient, stores: dict[str, Path]) -> None:
    runs = open_source(stores["store"]).run("hosp")
    x = runs.dataset.server_test.x[:6]  # standardized by the generator
    raw = (x.double().numpy() * SCALE + CENTER).tolist()  # back to years, mmHg, ...
    got = client.post("/v1/models/latest/predict?run=hosp", json={"rows": raw}).json()["predictions"]
    assert got == pytest.approx(_out(runs.load(3), x), rel=1e-5, abs=1e-5)


def test_binary_answers_the_sigmoid_and_its_threshold(client: TestClient, stores: dict[str, Path]) -> None:
    ref = np.asarray(FRAUD_REF)
    raw = (ref[:, 0] + ref[:, 1] * np.random.default_rng(1).standard_normal((4, len(ref)))).tolist()
    fr = client.post("/v1/models/latest/predict", json={"rows": raw}).json()
    with torch.inference_mode():
        p = torch.sigmoid(_model(stores["store"], "fraud", 2)(torch.from_numpy(standardize(np.asarray(raw), FRAUD_REF)))).reshape(-1)
    assert fr["run"] == "fraud" and fr["target"] == "fraud" and fr["kind"] == "binary"
    assert fr["probabilities"] == p.tolist()
    assert fr["predictions"] == [int(v >= 0.5) for v in p.tolist()]


def test_mnist_takes_images_flat_or_nested_in_0_1(mnist: tuple[TestClient, torch.nn.Module]) -> None:
    c, model = mnist
    pixels = torch.rand(3, 784, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        probs = torch.softmax(model((pixels - MNIST_MEAN) / MNIST_STD), dim=1)
    want = {"predictions": probs.argmax(1).tolist(), "probabilities": probs.tolist()}
    for body in (
        {"images": pixels.reshape(3, 28, 28).tolist()},
        {"images": pixels.tolist()},
        {"rows": pixels.tolist()},
        {"images": ((pixels - MNIST_MEAN) / MNIST_STD).reshape(3, 28, 28).tolist(), "scaled": True},
    ):
        res = c.post("/v1/models/latest/predict", json=body).json()
        assert {k: res[k] for k in want} == want, list(body)
        assert res["target"] == "digit" and res["version"] == 1
    info = c.get("/v1/models").json()["task"]["input"]
    assert info["accepts"] == ["rows", "images"] and info["pixel_range"] == [0.0, 1.0] and info["image"] == [28, 28]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"images": [[[0.5] * 27] * 28]}, 422, "images[0] is not 28x28: give 28 lists of 28 pixels, or one flat list of 784"),
        ({"images": [[0.5] * 783]}, 422, "images[0] is not 28x28"),
        ({"images": [[[0.5] * 28] * 27]}, 422, "images[0] is not 28x28"),
        ({"images": [[255.0] * 784]}, 422, "images[0]: pixel value 255 is outside [0, 1] (divide 0-255 pixels by 255"),
        ({"rows": [[0.5] * 783 + [-0.1]]}, 422, "rows[0]: pixel value -0.1 is outside [0, 1]"),
        ({"images": [[0.5] * 784] * 9}, 413, "9 inputs in one request; at most 8"),
        ({"records": [{"age": 1.0}]}, 422, "unknown key records: this model takes rows or images (and scaled)"),
        ({"images": []}, 422, "images is empty"),
    ],
)
def test_malformed_mnist_requests(mnist: tuple[TestClient, torch.nn.Module], body: dict, status: int, reason: str) -> None:
    r = mnist[0].post("/v1/models/latest/predict", json=body)
    assert r.status_code == status, r.text
    assert reason in r.json()["detail"], r.text


ROW = [float(c) for c in CENTER]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"rows": [ROW[:20]]}, 422, "rows[0] has 20 values; the model takes 21"),
        ({"rows": [ROW, ROW + [1.0]]}, 422, "rows[1] has 22 values; the model takes 21"),
        ({"rows": [["x", *ROW[1:]]]}, 422, "rows[0][0]: not a number"),
        ({"rows": [[True, *ROW[1:]]]}, 422, "rows[0][0]: not a number"),
        ({"rows": [[None, *ROW[1:]]]}, 422, "rows[0][0]: not a number"),
        ({"rows": []}, 422, "rows is empty"),
        ({"records": []}, 422, "records is empty"),
        ({}, 422, "give exactly one of rows, records (got none)"),
        ({"rows": [ROW], "records": [{}]}, 422, "give exactly one of rows, records (got rows, records)"),
        ({"rows": [ROW] * 51}, 413, "51 inputs in one request; at most 50"),
        ({"records": [{"age": 70.0}]}, 422, "records[0]: missing features female, admission_emergency"),
        ({"records": [{**dict(zip(FEATURE_NAMES, ROW, strict=True)), "bmi": 24.0}]}, 422, "records[0]: unknown feature bmi"),
        ({"records": [{**dict(zip(FEATURE_NAMES, ROW, strict=True)), "age": "old"}]}, 422, "records[0].age: not a number"),
        ({"images": [[[0.0] * 28] * 28]}, 422, "unknown key images: this model takes rows or records (and scaled)"),
        ({"rows": [ROW], "extra": 1}, 422, "unknown key extra"),
        ({"rows": [ROW], "scaled": "yes"}, 422, "scaled: Input should be a valid boolean"),
        ({"rows": "abc"}, 422, "rows: Input should be a valid array"),
        ({"rows": [[1e300, *ROW[1:]]]}, 422, "rows[0]: value 1e+300 is out of the model's float32 range once scaled"),
    ],
)
def test_malformed_requests_get_a_4xx_with_the_reason(client: TestClient, body: dict, status: int, reason: str) -> None:
    r = client.post("/v1/models/latest/predict", params={"run": "hosp"}, json=body)
    assert r.status_code == status, r.text
    assert reason in r.json()["detail"], r.text


def test_non_finite_values_and_bad_paths(client: TestClient) -> None:
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        raw = b'{"rows": [[' + literal + b", 0.0" * 20 + b"]]}"
        r = client.post("/v1/models/latest/predict?run=hosp", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"] == "rows[0][0]: not a finite number (NaN and infinities are refused)", (literal, r.text)
    r = client.post("/v1/models/latest/predict?run=hosp", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "Invalid JSON" in r.json()["detail"]
    r = client.post("/v1/models/latest/predict?run=hosp", content=b"", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "Invalid JSON" in r.json()["detail"]
    r = client.post("/v1/models/9/predict?run=hosp", json={"rows": [ROW]})
    assert r.status_code == 404 and r.json() == {"detail": "run 'hosp' has no version 9; it has [1, 2, 3]"}
    assert client.get("/v1/models/abc?run=hosp").status_code == 404
    assert client.get("/v1/models/%C2%B2?run=hosp").status_code == 404  # "²": a digit to str.isdigit, not to int()
    assert client.post("/v1/models/abc/predict?run=hosp", json={"rows": [ROW]}).status_code == 404
    r = client.get("/v1/models?run=nope")
    assert r.status_code == 404 and "no run 'nope'" in r.json()["detail"]
    assert client.post("/v1/models/latest/predict?run=nope", json={"rows": [ROW]}).status_code == 404
    r = client.get("/v1/models", params={"run": "x" * 201})
    assert r.status_code == 422 and "query.run" in r.json()["detail"]
    big = b'{"rows": [' + b",".join([b"[" + b",".join([b"0.0"] * 21) + b"]"] * 100_000) + b"]}"
    r = client.post("/v1/models/latest/predict?run=hosp", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"] == f"request body over {8 << 20} bytes"


def test_an_output_that_overflows_is_null_not_a_500(client: TestClient, stores: dict[str, Path]) -> None:
    x = torch.full((2, 21), 3e38)
    x[1] = 0.0
    r = client.post("/v1/models/latest/predict?run=hosp", json={"rows": x.tolist(), "scaled": True})
    assert r.status_code == 200, r.text
    want = [v if np.isfinite(v) else None for v in _out(_model(stores["store"], "hosp", 3), x)]
    assert r.json()["predictions"] == want


def test_the_openapi_schema_is_the_tasks(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/models/{version}/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"oneOf": [{"$ref": "#/components/schemas/HospitalPredictRequest"}, {"$ref": "#/components/schemas/FraudPredictRequest"}]}
    comp = spec["components"]["schemas"]
    hosp = comp["HospitalPredictRequest"]
    assert hosp["oneOf"] == [{"required": ["rows"]}, {"required": ["records"]}]  # exactly one input key
    rows = hosp["properties"]["rows"]
    assert rows["type"] == "array" and "default" not in rows
    assert rows["maxItems"] == 50 and rows["minItems"] == 1
    assert rows["items"]["minItems"] == rows["items"]["maxItems"] == 21
    assert "dataset's own units" in hosp["properties"]["rows"]["description"]
    rec = comp["HospitalRecord"]
    assert list(rec["properties"]) == list(FEATURE_NAMES) and rec["required"] == list(FEATURE_NAMES)
    assert rec["additionalProperties"] is False
    assert "(age - 55) / 18" in rec["properties"]["age"]["description"]
    assert len(comp["FraudRecord"]["properties"]) == 17
    assert "PredictResponse" in comp


def _metric(text: str, line_start: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(line_start)).rsplit(" ", 1)[1])


def test_health_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "runs": 2}
    before = client.get("/metrics").text
    client.post("/v1/models/latest/predict", params={"run": "hosp"}, json={"rows": [ROW, ROW]})
    client.post("/v1/models/latest/predict", params={"run": "hosp"}, json={"rows": []})
    text = client.get("/metrics").text
    rows = 'fedloom_serve_rows_predicted_total{run="hosp"}'
    assert _metric(text, rows) == (_metric(before, rows) if rows in before else 0.0) + 2
    assert _metric(text, 'fedloom_serve_model_version{run="hosp"}') == 3.0
    assert _metric(text, 'fedloom_serve_requests_total{route="/v1/models/{version}/predict",status="422"}') >= 1
    assert _metric(text, 'fedloom_serve_requests_total{route="/v1/models/{version}/predict",status="200"}') >= 1
    assert 'fedloom_serve_request_seconds_bucket{le="0.005",route="/v1/models/{version}/predict"}' in text
    assert _metric(text, "fedloom_serve_hot_swaps_total") == 0.0


def test_bearer_token(stores: dict[str, Path]) -> None:
    src = open_source(stores["store"])
    c = TestClient(create_app(src, token="s3cret", routers=[dashboard_router(src, token="s3cret")]))
    r = c.get("/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "bearer token" in r.json()["detail"]
    assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Basic czNjcmV0"}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/v1/models?access_token=s3cret").status_code == 200
    assert c.post("/v1/models/latest/predict?run=hosp", json={"rows": [ROW]}).status_code == 401
    ok = c.post("/v1/models/latest/predict?run=hosp&access_token=s3cret", json={"rows": [ROW]})
    assert ok.status_code == 200 and ok.json()["version"] == 3
    assert c.get("/api/runs").status_code == 401 and c.get("/api/runs?access_token=s3cret").status_code == 200
    assert c.get("/healthz").status_code == 200
    # without a token nothing is asked
    assert TestClient(create_app(src)).get("/v1/models").status_code == 200


def _digest(store: Path) -> dict[str, tuple[str, int]]:
    files = [p for p in sorted(store.parent.rglob("*")) if p.is_file()]
    return {str(f): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in files}


def test_the_service_never_writes_to_the_store(stores: dict[str, Path], client: TestClient) -> None:
    before = _digest(stores["store"])
    for _ in range(3):
        client.get("/v1/models", params={"run": "hosp"})
        client.post("/v1/models/latest/predict", params={"run": "hosp"}, json={"rows": [ROW]})
        client.post("/v1/models/1/predict", params={"run": "hosp"}, json={"rows": [ROW]})
        client.get("/api/runs/hosp")
        client.get("/openapi.json")
    assert _digest(stores["store"]) == before  # every file next to the store: same bytes, same mtime, none added
    from fedloom.core.errors import StoreError
    from fedloom.store import Store

    with Store.open(stores["store"], read_only=True) as st, pytest.raises(StoreError, match="read-only"):
        st.set_status(st.find_run("hosp"), "failed")  # type: ignore[arg-type]


def _wait(cond: Callable[[], bool], what: str, limit: float = 120.0) -> None:
    """Wait for ``cond`` (a safety net against a hang, not a timing assertion)."""
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def test_latest_hot_swaps_while_a_run_trains(tmp_path: Path) -> None:
    store = tmp_path / "live.db"
    cfg = _cfg(store, name="live", rounds=12)
    cfg["run"]["keep_checkpoints"] = 2  # old versions are deleted while requests run
    run = build_run(parse_config(cfg))
    run.federation.run(1)
    app = create_app(open_source(store), refresh=0.0)
    c = TestClient(app)
    statuses: list[int] = []
    versions: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            r = c.post("/v1/models/latest/predict", json={"rows": [ROW]})
            statuses.append(r.status_code)
            if r.status_code == 200:
                versions.append(r.json()["version"])

    t = threading.Thread(target=hammer)
    t.start()
    try:
        _wait(lambda: bool(versions) or bool(statuses), "the first answer")
        for k in range(2, 13):
            run.federation.step()  # round k: a new checkpoint, the oldest file deleted
            _wait(lambda k=k: (versions and versions[-1] == k) or (statuses and statuses[-1] != 200), f"version {k}")
    finally:
        stop.set()
        t.join(timeout=60)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert versions == sorted(versions) and sorted(set(versions)) == list(range(1, 13))
    assert app.state.cache.swaps == 11
    assert _metric(c.get("/metrics").text, "fedloom_serve_hot_swaps_total") == 11.0


def test_a_swap_never_makes_a_request_wait_and_a_pruned_version_is_a_404(tmp_path: Path) -> None:
    store = tmp_path / "slow.db"
    cfg = _cfg(store, name="slow", rounds=6)
    cfg["run"]["keep_checkpoints"] = 2
    run = build_run(parse_config(cfg))
    run.federation.run(1)
    src = open_source(store)
    app = create_app(src, refresh=0.0)
    c = TestClient(app)
    assert c.post("/v1/models/latest/predict", json={"rows": [ROW]}).json()["version"] == 1
    run.federation.step()  # version 2 appears
    models = src.run("slow")
    real_load, entered, release = models.load, threading.Event(), threading.Event()

    def slow_load(version: int) -> torch.nn.Module:
        entered.set()
        release.wait(60)
        return real_load(version)

    models.load = slow_load  # type: ignore[method-assign]
    got: dict[str, int] = {}

    def req(key: str) -> None:
        got[key] = c.post("/v1/models/latest/predict", json={"rows": [ROW]}).json()["version"]

    loader = threading.Thread(target=req, args=("loader",))
    loader.start()
    assert entered.wait(60)
    other = threading.Thread(target=req, args=("other",))
    other.start()
    other.join(60)
    assert got.get("other") == 1  # answered by the current model while version 2 loads
    release.set()
    loader.join(60)
    assert got["loader"] == 2
    models.load = real_load  # type: ignore[method-assign]
    # a version listed, then pruned before it is loaded: a clean 404
    pinned = TestClient(create_app(open_source(store), refresh=3600.0))
    assert pinned.post("/v1/models/2/predict", json={"rows": [ROW]}).json()["version"] == 2  # lists [1, 2]
    run.federation.step()
    run.federation.step()  # rounds 3 and 4: versions 1 and 2 are deleted
    r = pinned.post("/v1/models/1/predict", json={"rows": [ROW]})  # the cached listing still names it
    assert r.status_code == 404 and "no checkpoint of round 1" in r.json()["detail"], r.text
    assert pinned.post("/v1/models/4/predict", json={"rows": [ROW]}).json()["version"] == 4  # newer than the listing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tls_with_a_real_uvicorn_server(stores: dict[str, Path], tmp_path: Path) -> None:
    import httpx
    import uvicorn

    from fedloom.server.certs import create_ca, issue_server

    ca = create_ca(tmp_path / "ca").cert
    issued = issue_server(tmp_path / "ca", tmp_path / "server", hosts=["127.0.0.1", "localhost"])
    port = _free_port()
    app = create_app(open_source(stores["store"]), token="t0k")
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, ssl_certfile=str(issued.cert), ssl_keyfile=str(issued.key),
                       log_level="warning")  # fmt: skip
    )
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        _wait(lambda: server.started or not th.is_alive(), "uvicorn to start", 30)
        assert server.started
        trusted = ssl.create_default_context(cafile=str(ca))
        assert httpx.get(f"https://127.0.0.1:{port}/healthz", verify=trusted).json()["status"] == "ok"
        r = httpx.post(f"https://127.0.0.1:{port}/v1/models/latest/predict?run=hosp", json={"rows": [ROW]},
                       headers={"Authorization": "Bearer t0k"}, verify=trusted)  # fmt: skip
        assert r.status_code == 200 and r.json()["version"] == 3
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ssl.create_default_context())  # not a public CA
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz")
    finally:
        server.should_exit = True
        th.join(timeout=10)


def test_a_run_directory_serves_its_final_model(tmp_path: Path) -> None:
    from fedloom.artifacts import write_run_outputs

    cfg = parse_config(_cfg(None, name="dir"))
    r = build_run(cfg)
    hist = r.federation.run(2)
    write_run_outputs(tmp_path / "out", history=hist, model=r.global_model(), config=cfg.model_dump())
    src = open_source(tmp_path / "out")
    c = TestClient(create_app(src, routers=[dashboard_router(src)]))
    assert [v["version"] for v in c.get("/v1/models").json()["versions"]] == [2]
    raw = _raw(3, seed=4)
    got = c.post("/v1/models/2/predict", json={"rows": raw}).json()["predictions"]
    assert got == _out(r.global_model().eval(), torch.from_numpy(standardize(np.asarray(raw), REFERENCE)))
    assert c.post("/v1/models/1/predict", json={"rows": raw}).status_code == 404
    assert json.loads(c.get("/api/runs/dir").text)["total_rounds"] == 2


def test_a_chunked_body_over_the_limit_is_refused(stores: dict[str, Path]) -> None:
    c = TestClient(create_app(open_source(stores["store"]), max_body=1000))

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"rows": [['
        for _ in range(500):
            yield b"0.0, "
        yield b"0.0]]}"

    r = c.post("/v1/models/latest/predict?run=hosp", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over 1000 bytes" in r.json()["detail"]
    text = c.get("/metrics").text
    assert _metric(text, 'fedloom_serve_requests_total{route="unmatched",status="413"}') == 1.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "x.pem"], "give both --tls-cert and --tls-key"),
        (["--port", "70000"], "65535"),
    ],
)
def test_the_cli_refuses_bad_options(stores: dict[str, Path], args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from fedloom.cli import app

    res = CliRunner().invoke(app, ["serve", str(stores["store"]), *args])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output


def test_the_cli_refuses_a_missing_source(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedloom.cli import app

    res = CliRunner().invoke(app, ["serve", str(tmp_path / "nope.db")])
    assert res.exit_code == 2 and "no such store file or run directory" in " ".join(res.output.split())
