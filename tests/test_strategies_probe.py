"""bench/strategies_probe.py: job parsing (clear errors for bad jobs) and one short scenario run."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "strategies_probe.py"


def _load():
    spec = importlib.util.spec_from_file_location("strategies_probe", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parse_job_splits_setting_strategy_and_json() -> None:
    probe = _load()
    assert probe.parse_job('mnist-shards fedavgm {"server_momentum": 0.7, "epochs": 5}') == (
        "mnist-shards", "fedavgm", {"server_momentum": 0.7, "epochs": 5})


@pytest.mark.parametrize(("job", "message"), [
    ("mnist-shards fedavg", "expected 'SETTING STRATEGY JSON'"),
    ("mnist-shards fedavg {lr: 0.1}", "parameters are not JSON"),
    ("mnist-shards fedavg [0.1]", "parameters must be a JSON object"),
])
def test_parse_job_rejects_bad_jobs_with_a_clear_message(job: str, message: str) -> None:
    with pytest.raises(SystemExit, match=message):
        _load().parse_job(job)


def test_two_hospital_rounds_append_a_run(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), "--cap", "2", "--parallel", "1",
                          "--job", 'hospital fedprox {"mu": 0.1}'], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["setting"], run["strategy"], run["params"], run["rounds_run"], run["cap"]) == (
        "hospital", "fedprox", {"mu": 0.1}, 2, 2)
    assert len(run["curve"]) == 2 and all(0 < v < 20 for v in run["curve"])  # test MAE in days


def test_an_unknown_setting_is_refused(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--json", str(tmp_path / "p.json"), "--job", "mars fedavg {}"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "unknown setting 'mars'" in res.stderr
