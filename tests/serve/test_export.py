"""fedloom export end to end: every format reloads to the same outputs; ONNX is checked with onnxruntime; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fedloom.cli import app
from fedloom.core.config import parse_config
from fedloom.cutting.quantize import load_cut
from fedloom.run import build_run
from fedloom.serve import open_source

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "store.db"
    cfg = {
        "run": {"name": "cnn", "seed": 0, "rounds": 2, "engine": "sequential", "store": str(path)},
        "data": {"name": "mnist", "partition": "iid", "num_clients": 100},
        "model": {"name": "cnn"},
        "strategy": {"name": "fedavg", "fraction": 0.02},
        "client": {"epochs": 1, "batch_size": 50, "lr": 0.05, "max_steps": 2},
        "pruning": {"sparsity": 0.9, "start": 1, "end": 2},
    }
    build_run(parse_config(cfg)).federation.run(2)
    return path


def _x() -> torch.Tensor:
    return torch.randn(9, 784, generator=torch.Generator().manual_seed(2))  # MNIST's task shape: 784 pixels


def _export(store: Path, out: Path, *args: str) -> str:
    res = runner.invoke(app, ["export", str(store), "--out", str(out), *args])
    assert res.exit_code == 0, res.output
    return res.output


def test_onnx_matches_torch_in_onnxruntime(store: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    import onnx

    out = tmp_path / "m.onnx"
    text = _export(store, out, "--format", "onnx", "--version", "2")
    assert "max |diff| vs torch" in text
    ref = open_source(store).run("cnn").load(2)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 9):  # the batch axis is dynamic
        x = _x()[:n]
        got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
        torch.testing.assert_close(got, ref(x).detach(), rtol=1e-4, atol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    info = json.loads(meta["fedloom"])
    assert info["run"] == "cnn" and info["version"] == 2 and info["task"]["input_shape"] == [784]


def test_pruned_int8_sparse_safetensors_is_small_and_exact(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    _export(store, out, "--quantize", "int8", "--sparse")
    assert 1_663_370 * 4 / out.stat().st_size > 10  # 90% pruned during training + int8: over 10x smaller
    src = open_source(store)
    model, info = load_cut(out, src.run("cnn").new_model)
    assert info["quantize"] == "int8" and info["version"] == 2
    ref = src.run("cnn").load(2)
    x = _x()
    agree = (model(x).argmax(1) == ref(x).argmax(1)).float().mean()
    assert float(agree) >= 0.75  # int8 of a 2-round model: most argmaxes survive


def test_structured_torchscript(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    text = _export(store, out, "--format", "torchscript", "--prune", "0.5")
    text = " ".join(text.split())
    assert "conv1 16/32" in text and "fc1 256/512" in text
    from fedloom.cutting.structured import cut

    _, small, _ = cut(open_source(store).run("cnn").load(2), 0.5)
    extra = {"fedloom.json": ""}
    loaded = torch.jit.load(str(out), _extra_files=extra)
    torch.testing.assert_close(loaded(_x()), small(_x()))
    assert json.loads(extra["fedloom.json"])["kept_units"]["conv1"] == [16, 32]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--version", "7"], "has no version 7"),
        (["--version", "x"], "round number or latest"),
        (["--format", "tflite"], "safetensors, onnx or torchscript"),
        (["--prune", "1.2"], "must be in [0, 1)"),
        (["--quantize", "int4"], "none, int8 or fp16"),
        (["--format", "onnx", "--quantize", "int8"], "float32 only"),
        (["--run", "nope"], "no run 'nope'"),
    ],
)
def test_bad_input_is_a_clear_error(store: Path, tmp_path: Path, args: list[str], message: str) -> None:
    res = runner.invoke(app, ["export", str(store), "--out", str(tmp_path / "x"), *args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_the_service_takes_28x28_images_for_mnist(store: Path) -> None:
    from fastapi.testclient import TestClient

    from fedloom.serve.app import create_app

    c = TestClient(create_app(open_source(store)))
    x = _x()[:3]
    res = c.post("/v1/models/latest/predict", json={"images": x.reshape(3, 28, 28).tolist()}).json()
    probs = torch.softmax(open_source(store).run("cnn").load(2)(x), dim=1)
    assert res["predictions"] == probs.argmax(1).tolist()
    torch.testing.assert_close(torch.tensor(res["probabilities"]), probs.detach(), rtol=1e-5, atol=1e-6)
    bad = c.post("/v1/models/latest/predict", json={"images": [[[0.0] * 27] * 28]})
    assert bad.status_code == 422 and "images[0] is not 28x28" in bad.json()["detail"]
