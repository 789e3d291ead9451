"""bench/mcmahan.py's grid protocol: pruning, resuming and the stall rule, on scripted accuracy curves."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("mcmahan_bench", ROOT / "bench" / "mcmahan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _ScriptedFederation:
    """Steps through a fixed test-accuracy curve (the benchmark loop's view of a run)."""

    def __init__(self, curve: list[float]) -> None:
        self.curve = curve
        self.state = SimpleNamespace(round=0)

    def step(self) -> SimpleNamespace:
        acc = self.curve[self.state.round]
        self.state.round += 1
        return SimpleNamespace(round=self.state.round, seconds=0.0, metrics={"test_accuracy": acc, "test_loss": 1.0})


CURVES = {
    0.1: [0.5, 0.9, 0.99, 0.99, 0.99, 0.99],  # target 0.99 at round 3
    0.05: [0.5, 0.6, 0.7, 0.8, 0.99, 0.99],  # would reach at round 5: pruned at 3
    0.2: [0.5, 0.99, 0.99, 0.99, 0.99, 0.99],  # reaches at round 2: the new best
    0.4: [0.1, 0.1, 0.1, 0.1, 0.1, 0.1],  # never learns
}
SPEC = {"model": "cnn", "partition": "shards", "epochs": 5, "target": 0.99, "paper_rounds": 229, "lr": 0.05,
        "init": "torch", "pixels": "standardized"}


@pytest.fixture()
def bench(monkeypatch: pytest.MonkeyPatch):
    mod = _load()
    built: list[float] = []

    def build(name, spec, *, lr, max_rounds, engine, seed):  # noqa: ANN001, ANN202
        built.append(lr)
        cfg = SimpleNamespace(run=SimpleNamespace(device="cpu", precision="fp32", cuda_graphs=False))
        return SimpleNamespace(federation=_ScriptedFederation(CURVES[lr]), engine=SimpleNamespace(name="scripted"),
                               config=cfg), 0.0

    monkeypatch.setattr(mod, "build", build)
    mod.built = built
    return mod


def _grid(bench, out: dict, path: Path, grid: list[float], **kw) -> dict:
    bench.run_grid("cnn-noniid", dict(SPEC), grid, max_rounds=6, budget_s=1e9, engine="auto", seed=0, out=out,
                   path=path, **kw)
    return json.loads(path.read_text())["rows"]["cnn-noniid"]


def test_prune_stops_an_lr_at_the_best_so_far_and_keeps_the_winner(bench, tmp_path: Path) -> None:
    row = _grid(bench, {"rows": {}}, tmp_path / "m.json", [0.1, 0.05, 0.2], prune=True)
    by_lr = {e["lr"]: e for e in row["grid"]}
    assert by_lr[0.1]["reached_round"] == 3 and by_lr[0.1]["stopped"] == "target reached"
    assert by_lr[0.05]["rounds_run"] == 3 and by_lr[0.05]["reached_round"] is None
    assert by_lr[0.05]["stopped"] == "pruned at round 3: lr=0.1 reached the target at round 3"
    assert by_lr[0.2]["reached_round"] == 2  # the cap (3) did not stop a faster lr
    assert (row["lr"], row["reached_round"], row["stopped"], row["max_rounds"]) == (0.2, 2, "grid done", 6)


def test_without_prune_every_lr_runs_to_its_own_end(bench, tmp_path: Path) -> None:
    row = _grid(bench, {"rows": {}}, tmp_path / "m.json", [0.1, 0.05])
    assert [e["reached_round"] for e in row["grid"]] == [3, 5]
    assert row["lr"] == 0.1


def test_resume_adopts_a_fixed_lr_row_and_runs_only_the_missing_lrs(bench, tmp_path: Path) -> None:
    fixed = {**SPEC, "lr": 0.1, "B": 10, "C": 0.1, "engine": "vectorized", "rounds_run": 3, "reached_round": 3,
             "accuracy": [0.5, 0.9, 0.99], "wall_s": 30.0, "stopped": "target reached", "precision": "fp32"}
    out = {"rows": {"cnn-noniid": fixed}}
    row = _grid(bench, out, tmp_path / "m.json", [0.1, 0.05], prune=True, resume=True)
    assert bench.built == [0.05]
    assert row["grid"][0]["accuracy"] == [0.5, 0.9, 0.99] and "paper_rounds" not in row["grid"][0]
    assert row["grid"][1]["stopped"].startswith("pruned at round 3")
    assert (row["lr"], row["reached_round"]) == (0.1, 3)


def test_resume_reruns_an_interrupted_lr(bench, tmp_path: Path) -> None:
    out = {"rows": {"cnn-noniid": {**SPEC, "grid": [
        {"lr": 0.1, "accuracy": [0.5], "reached_round": None, "stopped": "interrupted after round 1"}]}}}
    _grid(bench, out, tmp_path / "m.json", [0.1], resume=True)
    assert bench.built == [0.1]


def test_stall_rule_stops_an_lr_that_never_learns(bench, tmp_path: Path) -> None:
    bench.STALL_ROUNDS.append(4)
    row = _grid(bench, {"rows": {}}, tmp_path / "m.json", [0.4, 0.2])
    assert row["grid"][0]["rounds_run"] == 4
    assert row["grid"][0]["stopped"] == "stalled (test accuracy below 20% after 4 rounds)"
    assert row["grid"][1]["reached_round"] == 2


def test_a_fixed_lr_row_records_its_max_rounds(bench, tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    out = {"rows": {}}
    bench.run_row("cnn-noniid", {**SPEC, "lr": 0.1}, max_rounds=6, budget_s=1e9, engine="auto", seed=0, out=out,
                  path=path)
    row = json.loads(path.read_text())["rows"]["cnn-noniid"]
    assert (row["max_rounds"], row["reached_round"], row["stopped"]) == (6, 3, "target reached")
