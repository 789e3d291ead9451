"""The model service: exact predictions, every malformed request a 4xx with its reason, auth, hot swap, read only, TLS."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from fedloom.core.config import parse_config
from fedloom.run import build_run
from fedloom.serve import open_source
from fedloom.serve.app import create_app
from fedloom.serve.dashboard import dashboard_router

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


def _cfg(store: Path, name: str = "hosp", data: str = "hospital", rounds: int = 2, **extra: object) -> dict:
    return {
        "run": {"name": name, "seed": 0, "rounds": rounds, "engine": "sequential", "store": str(store)},
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


def _model(store: Path, run: str, version: int) -> torch.nn.Module:
    return open_source(store).run(run).load(version)


def test_versions_are_the_checkpoints_with_their_metrics(client: TestClient, stores: dict[str, Path]) -> None:
    body = client.get("/v1/models", params={"run": "hosp"}).json()
    assert [v["version"] for v in body["versions"]] == [1, 2, 3] and body["latest"] == 3
    assert body["task"]["kind"] == "regression" and len(body["task"]["feature_names"]) == 21
    assert body["status"] == "completed"
    from fedloom.store import Store

    with Store.open(stores["store"], read_only=True) as st:
        hist = st.history(st.find_run("hosp"))  # type: ignore[arg-type]
    assert body["versions"][1]["metrics"]["test_mae"] == hist[1].metrics["test_mae"]
    assert client.get("/v1/models/2", params={"run": "hosp"}).json()["version"] == 2
    assert client.get("/v1/models").json()["run"] == "fraud"  # the newest run by default
    assert [r["name"] for r in client.get("/v1/runs").json()] == ["hosp", "fraud"]


def test_predictions_equal_the_model(client: TestClient, stores: dict[str, Path]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 21, generator=g)
    res = client.post("/v1/models/2/predict", params={"run": "hosp"}, json={"rows": x.tolist()}).json()
    want = _model(stores["store"], "hosp", 2)(x).reshape(-1)
    assert res["version"] == 2 and res["target"] == "length_of_stay_days"
    assert res["predictions"] == pytest.approx(want.tolist(), rel=1e-6)
    # by feature name, the same answer
    names = client.get("/v1/models", params={"run": "hosp"}).json()["task"]["feature_names"]
    records = [dict(zip(names, row, strict=True)) for row in x.tolist()]
    by_name = client.post("/v1/models/latest/predict", params={"run": "hosp"}, json={"records": records}).json()
    assert by_name["version"] == 3
    assert by_name["predictions"] == pytest.approx(_model(stores["store"], "hosp", 3)(x).reshape(-1).tolist(), rel=1e-6)
    # binary task: probabilities are the sigmoid, predictions the 0.5 threshold
    xf = torch.randn(4, client.get("/v1/models").json()["task"]["input_shape"][0], generator=g)
    fr = client.post("/v1/models/latest/predict", json={"rows": xf.tolist()}).json()
    p = torch.sigmoid(_model(stores["store"], "fraud", 2)(xf).reshape(-1))
    assert fr["probabilities"] == pytest.approx(p.tolist(), rel=1e-6)
    assert fr["predictions"] == [int(v >= 0.5) for v in p.tolist()]


ROW = [0.0] * 21


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"rows": [[0.0] * 20]}, 422, "rows[0] has 20 values; the model takes 21"),
        ({"rows": [["x"] + [0.0] * 20]}, 422, "valid number"),
        ({"rows": []}, 422, "rows is empty"),
        ({}, 422, "exactly one of rows, records or images"),
        ({"rows": [ROW], "records": [{}]}, 422, "exactly one of"),
        ({"rows": [ROW] * 51}, 413, "51 inputs in one request; at most 50"),
        ({"records": [{"age": 1.0}]}, 422, "missing features"),
        ({"records": [{**{f"f{i}": 0.0 for i in range(21)}}]}, 422, "unknown features"),
        ({"images": [[[0.0] * 28] * 28]}, 422, "not images"),
        ({"rows": [ROW], "extra": 1}, 422, "extra"),
        ({"rows": "abc"}, 422, "valid list"),
    ],
)
def test_malformed_requests_get_a_4xx_with_the_reason(client: TestClient, body: dict, status: int, reason: str) -> None:
    r = client.post("/v1/models/latest/predict", params={"run": "hosp"}, json=body)
    assert r.status_code == status, r.text
    assert reason in r.json()["detail"]


def test_non_finite_values_and_bad_paths(client: TestClient) -> None:
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        raw = b'{"rows": [[' + literal + b", 0.0" * 20 + b"]]}"
        r = client.post("/v1/models/latest/predict?run=hosp", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "finite" in r.json()["detail"], (literal, r.text)
    r = client.post("/v1/models/latest/predict?run=hosp", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert client.post("/v1/models/9/predict?run=hosp", json={"rows": [ROW]}).json() == {"detail": "run 'hosp' has no version 9"}
    assert client.post("/v1/models/9/predict?run=hosp", json={"rows": [ROW]}).status_code == 404
    assert client.get("/v1/models/abc?run=hosp").status_code == 404
    assert client.get("/v1/models?run=nope").status_code == 404
    big = b'{"rows": [' + b",".join([b"[" + b",".join([b"0.0"] * 21) + b"]"] * 100_000) + b"]}"
    assert client.post("/v1/models/latest/predict?run=hosp", content=big, headers={"content-type": "application/json"}).status_code == 413


def test_health_metrics_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "runs": 2}
    client.post("/v1/models/latest/predict", params={"run": "hosp"}, json={"rows": [ROW, ROW]})
    text = client.get("/metrics").text
    assert 'fedloom_serve_rows_predicted_total{run="hosp"}' in text
    assert 'fedloom_serve_model_version{run="hosp"} 3.0' in text
    assert "fedloom_serve_request_seconds_bucket" in text
    spec = client.get("/openapi.json").json()
    assert "/v1/models/{version}/predict" in spec["paths"]


def test_bearer_token(stores: dict[str, Path]) -> None:
    src = open_source(stores["store"])
    c = TestClient(create_app(src, token="s3cret", routers=[dashboard_router(src, token="s3cret")]))
    r = c.get("/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/v1/models?access_token=s3cret").status_code == 200
    assert c.get("/api/runs").status_code == 401 and c.get("/api/runs?access_token=s3cret").status_code == 200
    assert c.get("/healthz").status_code == 200


def _digest(store: Path) -> dict[str, str]:
    files = [store, *sorted((store.parent / "checkpoints").rglob("*.safetensors"))]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_the_service_never_writes_to_the_store(stores: dict[str, Path], client: TestClient) -> None:
    before = _digest(stores["store"])
    mtime = stores["store"].stat().st_mtime_ns
    for _ in range(3):
        client.get("/v1/models", params={"run": "hosp"})
        client.post("/v1/models/latest/predict", params={"run": "hosp"}, json={"rows": [ROW]})
        client.get("/api/runs/hosp")
    assert _digest(stores["store"]) == before and stores["store"].stat().st_mtime_ns == mtime
    from fedloom.core.errors import StoreError
    from fedloom.store import Store

    with Store.open(stores["store"], read_only=True) as st, pytest.raises(StoreError, match="read-only"):
        st.set_status(st.find_run("hosp"), "failed")  # type: ignore[arg-type]


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
        for _ in range(11):
            run.federation.step()
            time.sleep(0.05)
    finally:
        time.sleep(0.2)
        stop.set()
        t.join(timeout=30)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert versions == sorted(versions) and versions[0] <= 2 and versions[-1] == 12
    assert app.state.cache.swaps >= 3


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
    cert, key = issued.cert, issued.key
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(open_source(stores["store"])), host="127.0.0.1", port=port,
                       ssl_certfile=str(cert), ssl_keyfile=str(key), log_level="warning")  # fmt: skip
    )
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=str(ca))
        assert r.json()["status"] == "ok"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"https://127.0.0.1:{port}/healthz", verify=True)  # not a public CA
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/healthz")
    finally:
        server.should_exit = True
        th.join(timeout=10)


def test_a_run_directory_serves_its_final_model(tmp_path: Path) -> None:
    from fedloom.artifacts import write_run_outputs

    cfg = parse_config({**_cfg(tmp_path / "x.db", name="dir"), "run": {"name": "dir", "rounds": 2, "engine": "sequential"}})
    r = build_run(cfg)
    hist = r.federation.run(2)
    write_run_outputs(tmp_path / "out", history=hist, model=r.global_model(), config=cfg.model_dump())
    src = open_source(tmp_path / "out")
    c = TestClient(create_app(src, routers=[dashboard_router(src)]))
    assert [v["version"] for v in c.get("/v1/models").json()["versions"]] == [2]
    x = torch.zeros(1, 21)
    got = c.post("/v1/models/2/predict", json={"rows": x.tolist()}).json()["predictions"]
    assert got == pytest.approx(r.global_model().eval()(x).reshape(-1).tolist(), rel=1e-6)
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


def test_a_non_ascii_digit_version_is_a_404(client: TestClient) -> None:
    """Found by schemathesis: "²".isdigit() is True but int("²") raises."""
    assert client.get("/v1/models/%C2%B2?run=hosp").status_code == 404
    assert client.post("/v1/models/%C2%B2/predict?run=hosp", json={"rows": [ROW]}).status_code == 404
