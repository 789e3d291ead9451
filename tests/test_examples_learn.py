"""Every ``examples/*.toml`` learns from its first rounds, on three seeds (issue 13).

Each example (found by glob, so a new one is covered without editing this file) is built
from its own file and run for two rounds on seeds 0, 1 and 2; after round 2 its headline
metric (the task's first) must beat both the initial model and a chance baseline by a
stated margin. Round 2 rather than round 1: on McMahan's pathological non-IID split (two
labels per client) the average of ten label-specialised models can still be at chance after
round 1 (CNN at full size, seed 0: 10.1%, then 44% after round 2), and so can the F1 at
threshold 0.5 of the equipment scenario (full size, round 1: 0.03-0.19, round 2: 0.49-0.59),
whose first round learns the 2% failure rate before it separates failures. A model that
diverges or collapses (the issue's He-initialised CNN at lr 0.05: 7-15% after two rounds at
this size) fails.

Reduced size: ``run.rounds`` is never overridden (DP examples calibrate their noise for
it); the two rounds are stepped by hand. Examples are run at full size except the McMahan
CNN, whose clients stop after ``CNN_STEPS`` local steps (one CNN step at B = 10 costs ~15 ms
on one core; the full E = 5 round is 300 steps a client), and MNIST is evaluated on 500 of
its 10,000 test images (every twentieth). Examples with secure aggregation are marked slow
(SecAgg+ among 100 clients: ~3 s a round). Full-size numbers for the first three rounds are
in ``bench/results/examples_cpu.md`` (``bench/examples.py``): there round 1 already learns
everywhere but in equipment's F1 (its round-1 AUPRC is 0.39-0.46 against 2% positives), the
non-IID CNN on seed 0 and the local-DP example.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedloom.client.evaluate import evaluate_vector
from fedloom.core.config import RunConfig, load_config
from fedloom.core.metrics import greater_is_better
from fedloom.data.base import FederatedDataset, Split
from fedloom.run import build_run

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))
SEEDS = (0, 1, 2)
CNN_STEPS = 8  # local steps per client per round for the McMahan CNN (see the module docstring)
MNIST_TEST_STRIDE = 20  # evaluate on every 20th MNIST test image: 500 images

# Margins over max(initial model, chance), after round 2 (measured with this file's settings).
# Accuracy, 10 points: on 500 test images the standard error of an accuracy p <= 0.5 is <= 2.2
# points, so 10 points is ~5 SE: not noise. The He-initialised CNN at lr 0.05 (the issue)
# stays within 3.4 points of chance (round-1 training loss 8-1,155), while the slowest
# examples clear the margin: the CNN on the non-IID split (8 steps a client) by 18.8 points,
# the distributed-DP 2NN (noise calibrated for 20 rounds) by 20. AUPRC and F1 (2% / 1.5%
# positives): 0.10 absolute, over 5x the positive rate (measured: fraud +0.26, equipment +0.45,
# the local-DP fraud example at most +0.02). Errors (MAE, RMSE): 15% below the better of the
# initial model and the best constant prediction (measured: 0.49-0.66x).
ABS_MARGIN = {"accuracy": 0.10, "auprc": 0.10, "f1": 0.10}
REL_MARGIN = {"mae": 0.85, "rmse": 0.85}

# Examples that cannot learn in two rounds by design, each with the measurement behind it.
# A strict xfail: if one starts to learn, the test fails and the entry must go.
CANNOT_LEARN = {
    "fraud_local_dp": (
        "local DP over three banks: each bank clips its update to C = 0.5 and adds N(0, (σC)²) to each of the "
        "model's 3,265 entries (σ = 1), so the mean of three carries noise of norm ~0.29·sqrt(3265) ≈ 16.5 against "
        "a signal of norm <= 0.5. AUPRC after two rounds 0.042 / 0.014 / 0.032 (seeds 0-2; positive rate 0.015), "
        "then a random walk between 0.01 and 0.28 over 15 rounds, also with a linear model (18 entries). The example "
        "shows what local DP costs (README: ε = 65 after 15 rounds); it needs many clients a round to learn"
    ),
}


@dataclass(frozen=True)
class Outcome:
    metric: str
    initial: float  # the initial global model's
    chance: float  # the best prediction that ignores the input
    final: float  # after round 2
    train_loss: tuple[float, float]  # rounds 1 and 2 (NaN where the run reports none)


def _config(path: Path, seed: int, store: Path) -> RunConfig:
    overrides = [f"run.seed={seed}", "run.eval_every=1000000"]  # evaluated here, on the test subset
    cfg = load_config(path, overrides)
    if cfg.model.name in ("cnn", "mcmahan_cnn"):
        cfg = load_config(path, [*overrides, f"client.max_steps={min(CNN_STEPS, cfg.client.max_steps or CNN_STEPS)}"])
    run = cfg.run if cfg.run.store is None else cfg.run.model_copy(update={"store": str(store)})  # never the work tree
    tracking = cfg.tracking.model_copy(update={"tensorboard": None, "mlflow_uri": None})
    return cfg.model_copy(update={"run": run, "tracking": tracking})


def _test_split(cfg: RunConfig, data: FederatedDataset) -> Split:
    test = data.server_test
    assert test is not None, f"{cfg.run.name}: the dataset has no server test split to measure learning on"
    if cfg.data.name == "mnist":
        return Split(test.x[::MNIST_TEST_STRIDE], test.y[::MNIST_TEST_STRIDE])
    return test


def _chance(metric: str, data: FederatedDataset, test: Split) -> float:
    """The metric of the best prediction that ignores the input."""
    y = test.y
    if metric == "accuracy":
        return float(torch.bincount(y.long()).max()) / len(y)
    if metric in ("auprc", "f1"):
        p = float((y > 0.5).float().mean())
        return p if metric == "auprc" else 2 * p / (1 + p)  # F1 of "always positive"
    train_y = torch.cat([c.train.y.float().reshape(-1) for c in data.clients.values()])
    if metric == "mae":
        return float((y.float().reshape(-1) - train_y.median()).abs().mean())
    if metric == "rmse":
        return float((y.float().reshape(-1) - train_y.mean()).pow(2).mean().sqrt())
    raise AssertionError(f"no chance baseline for headline metric {metric!r}: add one to _chance() and a margin")


def run_example(path: Path, seed: int, store: Path) -> Outcome:
    """Build ``path`` on ``seed`` (reduced as the module docstring says) and run two rounds."""
    cfg = _config(path, seed, store)
    if cfg.secure is not None and cfg.secure.protocol == "ckks":
        pytest.importorskip("tenseal", reason="CKKS examples need the 'he' extra (tenseal)")
    # A deployment or Ray example runs in simulation: every engine trains the same model (test_conformance.py).
    run = build_run(cfg, engine="auto" if cfg.run.engine in ("remote", "ray") else None)
    data, task = run.dataset, run.dataset.task
    metric = task.metrics[0]
    test = _test_split(cfg, data)
    model = run.model_fn()

    def evaluate() -> float:
        return evaluate_vector(model, run.spec, run.federation.state.params.cpu(), test, task, metrics=[metric])[metric]

    initial = evaluate()
    losses = []
    for _ in range(2):
        rec = run.federation.step()
        assert rec.status == "ok", f"round {rec.round}: {rec.status}: {rec.reason}"
        losses.append(rec.metrics.get("train_loss", math.nan))
    return Outcome(metric, initial, _chance(metric, data, test), evaluate(), (losses[0], losses[1]))


def _learned(o: Outcome) -> tuple[bool, str]:
    final = o.final
    if o.metric in ABS_MARGIN:
        assert greater_is_better(o.metric)
        need = max(o.initial, o.chance) + ABS_MARGIN[o.metric]
        return final >= need, f"{o.metric} {final:.4f} after round 2, needs >= {need:.4f}"
    if o.metric in REL_MARGIN:
        need = min(o.initial, o.chance) * REL_MARGIN[o.metric]
        return final <= need, f"{o.metric} {final:.4f} after round 2, needs <= {need:.4f}"
    raise AssertionError(f"no margin for headline metric {o.metric!r}")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: small models on batches of 10-128, where extra threads only synchronize
    (hospital, 3 seeds: 0.6 s with one thread, 40 s with two on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _params() -> list[object]:
    out = []
    for path in EXAMPLES:
        marks = []
        if "secure" in tomllib.loads(path.read_text()):  # SecAgg(+) or CKKS: seconds a round at example size
            marks.append(pytest.mark.slow)
        if path.stem in CANNOT_LEARN:
            marks.append(pytest.mark.xfail(reason=CANNOT_LEARN[path.stem], raises=AssertionError, strict=True))
        out.append(pytest.param(path, id=path.stem, marks=marks))
    return out


def test_examples_are_found() -> None:
    assert len(EXAMPLES) >= 10, EXAMPLES
    assert set(CANNOT_LEARN) <= {p.stem for p in EXAMPLES}, "an entry of CANNOT_LEARN names no example"


@pytest.mark.parametrize("path", _params())
def test_example_learns_in_its_first_rounds(path: Path, tmp_path: Path) -> None:
    failures = []
    for seed in SEEDS:
        o = run_example(path, seed, tmp_path / f"seed{seed}.db")
        assert math.isfinite(o.initial) and math.isfinite(o.final), o
        ok, why = _learned(o)
        if not ok:
            failures.append(
                f"seed {seed}: {why} (initial {o.initial:.4f}, chance {o.chance:.4f}, "
                f"train loss rounds 1-2 {o.train_loss[0]:.3f} / {o.train_loss[1]:.3f})"
            )
    assert not failures, f"{path.name} does not learn in its first two rounds:\n" + "\n".join(failures)
