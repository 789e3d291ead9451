"""The generated scenarios: the specification's exact numbers, splits, determinism, learnability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedloom.core.errors import DataError
from fedloom.core.metrics import compute_metrics
from fedloom.core.types import TrainConfig
from fedloom.data.base import FederatedDataset, Split
from fedloom.data.registry import list_datasets, load_dataset
from fedloom.data.scenarios import SCENARIOS, list_scenarios, load_scenario
from fedloom.data.scenarios.equipment import HORIZON, WINDOWS_PER_DEVICE
from fedloom.models import build_model


@pytest.fixture(scope="module")
def hospital() -> FederatedDataset:
    return load_scenario("hospital", seed=0)


@pytest.fixture(scope="module")
def fraud() -> FederatedDataset:
    return load_scenario("fraud", seed=0)


@pytest.fixture(scope="module")
def equipment() -> FederatedDataset:
    return load_scenario("equipment", seed=0)


def check_common(ds: FederatedDataset, sites: list[str]) -> None:
    assert ds.client_ids == sites
    assert ds.task.input_shape == (len(ds.task.feature_names),)
    tests = [ds.clients[s].test for s in sites]
    assert all(t is not None for t in tests)
    assert ds.server_test is not None
    assert torch.equal(ds.server_test.x, torch.cat([t.x for t in tests if t is not None]))
    assert torch.equal(ds.server_test.y, torch.cat([t.y for t in tests if t is not None]))
    for cid, c in ds.clients.items():
        assert c.site == cid
        assert c.train.x.dtype == torch.float32 and c.train.y.dtype == torch.float32
        assert bool(torch.isfinite(c.train.x).all())
        assert c.train.x.shape[1:] == ds.task.input_shape
    pooled = ds.pooled_train().x
    assert float(pooled.mean(0).abs().max()) < 3.0, "features are roughly standardized"
    assert float(pooled.std(0).max()) < 5.0


# ---------------------------------------------------------------------- hospital
def test_hospital_exact_numbers_and_ranges(hospital: FederatedDataset) -> None:
    check_common(hospital, ["hospital-A", "hospital-B", "hospital-C"])
    assert hospital.task.kind == "regression" and hospital.task.loss == "mse"
    assert hospital.task.metrics == ("mae", "rmse", "loss")
    expected = {"hospital-A": (10000, 5.0, 15.0), "hospital-B": (8000, 3.0, 18.0), "hospital-C": (12000, 3.0, 30.0)}
    for cid, (n, lo, hi) in expected.items():
        c = hospital.clients[cid]
        assert c.test is not None
        assert (len(c.train), len(c.test)) == (n * 4 // 5, n // 5)
        y = torch.cat([c.train.y, c.test.y])
        assert float(y.min()) >= lo and float(y.max()) <= hi
        # the range is used: stays reach near both ends
        assert float(y.min()) < lo + 0.5 and float(y.max()) > hi - 1.5
        info = hospital.info["sites"][cid]  # type: ignore[index]
        assert info["patients"] == n and info["stay_range"] == (lo, hi)


def test_hospital_learnable_and_site_specific(hospital: FederatedDataset) -> None:
    def fit(split: Split) -> torch.Tensor:  # ridge regression (one-hot groups make X rank-deficient)
        x = torch.cat([split.x, torch.ones(len(split), 1)], 1).double()
        gram = x.T @ x + 1e-3 * len(split) * torch.eye(x.shape[1], dtype=torch.float64)
        return torch.linalg.solve(gram, x.T @ split.y.double()[:, None])

    def mae(w: torch.Tensor, split: Split | None) -> float:
        assert split is not None
        x = torch.cat([split.x, torch.ones(len(split), 1)], 1).double()
        return float((x @ w).squeeze(1).sub(split.y).abs().mean())

    pooled = hospital.pooled_train()
    test = hospital.server_test
    assert test is not None
    baseline = float((test.y - pooled.y.mean()).abs().mean())
    assert mae(fit(pooled), test) < 0.7 * baseline
    a, c = hospital.clients["hospital-A"], hospital.clients["hospital-C"]
    w_a, w_c = fit(a.train), fit(c.train)
    assert mae(w_a, c.test) > mae(w_a, a.test)
    assert mae(w_a, c.test) > 1.15 * mae(w_c, c.test), "A's model transfers imperfectly to C"


# ------------------------------------------------------------------------- fraud
def test_fraud_exact_numbers_and_stratified_split(fraud: FederatedDataset) -> None:
    check_common(fraud, ["branch-A", "branch-B", "branch-C"])
    assert fraud.task.kind == "binary" and fraud.task.loss == "bce"
    assert fraud.task.metrics == ("auprc", "recall_at_1fpr", "loss")
    expected = {"branch-A": (50000, 500), "branch-B": (40000, 800), "branch-C": (60000, 900)}
    for cid, (n, frauds) in expected.items():
        c = fraud.clients[cid]
        assert c.test is not None
        assert len(c.train) + len(c.test) == n and len(c.test) == n // 5
        assert int(c.train.y.sum()) + int(c.test.y.sum()) == frauds
        rate = frauds / n
        assert float(c.train.y.mean()) == pytest.approx(rate, abs=1e-9)
        assert float(c.test.y.mean()) == pytest.approx(rate, abs=1e-9)
        assert set(torch.unique(c.train.y).tolist()) == {0.0, 1.0}
        assert fraud.info["sites"][cid]["frauds"] == frauds  # type: ignore[index]


# --------------------------------------------------------------------- equipment
def test_equipment_exact_numbers_and_device_split(equipment: FederatedDataset) -> None:
    check_common(equipment, ["line-A", "line-B", "line-C"])
    assert equipment.task.kind == "binary" and equipment.task.metrics == ("f1", "auprc", "loss")
    expected = {"line-A": (100, 0.02), "line-B": (80, 0.015), "line-C": (120, 0.025)}
    for cid, (devices, rate) in expected.items():
        c = equipment.clients[cid]
        info = equipment.info["sites"][cid]  # type: ignore[index]
        train_dev, test_dev = info["train_devices"], info["test_devices"]
        assert info["devices"] == devices
        assert len(train_dev) + len(test_dev) == devices and len(test_dev) == devices // 5
        assert not set(train_dev) & set(test_dev), "no device in both splits"
        assert len(set(train_dev) | set(test_dev)) == devices
        assert c.test is not None
        assert len(c.train) == len(train_dev) * WINDOWS_PER_DEVICE
        assert len(c.test) == len(test_dev) * WINDOWS_PER_DEVICE
        # the failure rate is the share of windows followed by a failure within the horizon: exact
        assert float(c.train.y.mean()) == pytest.approx(rate, abs=1e-9)
        assert float(c.test.y.mean()) == pytest.approx(rate, abs=1e-9)
        assert info["failures"] * HORIZON == round(rate * devices * WINDOWS_PER_DEVICE)
        # rows are device-major; each failure labels exactly HORIZON consecutive windows
        per_device = c.train.y.reshape(len(train_dev), WINDOWS_PER_DEVICE)
        assert bool((per_device.sum(1) % HORIZON == 0).all())
        starts = (per_device[:, 1:] > per_device[:, :-1]).sum() + (per_device[:, 0] > 0).sum()
        assert int(starts) * HORIZON == int(per_device.sum())


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("name", ["hospital", "fraud", "equipment"])
def test_deterministic_in_seed(name: str, request: pytest.FixtureRequest) -> None:
    first: FederatedDataset = request.getfixturevalue(name)
    again = load_scenario(name, seed=0)
    other = load_scenario(name, seed=1)
    for cid in first.client_ids:
        assert torch.equal(first.clients[cid].train.x, again.clients[cid].train.x)
        assert torch.equal(first.clients[cid].train.y, again.clients[cid].train.y)
        assert not torch.equal(first.clients[cid].train.x, other.clients[cid].train.x)
    assert first.info == again.info


# ------------------------------------------------------------------ learnability
def _logreg_scores(train: Split, *tests: Split) -> list[torch.Tensor]:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=100, tol=1e-3).fit(train.x.numpy(), train.y.numpy())
    return [torch.from_numpy(model.decision_function(t.x.numpy())) for t in tests]


@pytest.mark.parametrize("name", ["fraud", "equipment"])
def test_detection_learnable_and_site_specific(name: str, request: pytest.FixtureRequest) -> None:
    ds: FederatedDataset = request.getfixturevalue(name)
    a, c = ds.clients[ds.client_ids[0]], ds.clients[ds.client_ids[2]]
    assert ds.server_test is not None and a.test is not None and c.test is not None

    def auprc(scores: torch.Tensor, split: Split) -> float:
        return compute_metrics("binary", scores, split.y, ["auprc"])["auprc"]

    (pooled,) = _logreg_scores(ds.pooled_train(), ds.server_test)
    base_rate = float(ds.server_test.y.mean())
    assert auprc(pooled, ds.server_test) > 10 * base_rate  # a trivial classifier scores ~ the base rate
    a_on_a, a_on_c = _logreg_scores(a.train, a.test, c.test)
    (c_on_c,) = _logreg_scores(c.train, c.test)
    assert auprc(a_on_c, c.test) < auprc(a_on_a, a.test)
    assert auprc(a_on_c, c.test) < 0.8 * auprc(c_on_c, c.test), "A's model transfers imperfectly to C"


# ---------------------------------------------------------------------- registry
def test_registry_and_hints(hospital: FederatedDataset) -> None:
    assert list_scenarios() == ["hospital", "fraud", "equipment"]
    assert list_datasets() == ["mnist", "hospital", "fraud", "equipment"]
    for name, info in SCENARIOS.items():
        assert info.name == name and info.description
        assert isinstance(info.train, TrainConfig) and info.rounds > 0
    task = hospital.task
    model = build_model(SCENARIOS["hospital"].model, task, **SCENARIOS["hospital"].model_kwargs)
    assert model(hospital.clients["hospital-A"].train.x[:5]).shape == (5, 1)
    assert SCENARIOS["hospital"].train.loss == task.loss
    ds = load_dataset("hospital", seed=0)
    assert torch.equal(ds.clients["hospital-B"].train.y, hospital.clients["hospital-B"].train.y)


def test_registry_errors() -> None:
    with pytest.raises(DataError, match="unknown scenario 'bank'.*hospital, fraud, equipment"):
        load_scenario("bank")
    with pytest.raises(DataError, match="unknown dataset 'cifar10'.*mnist, hospital"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="unknown option 'num_clients' for dataset 'fraud'"):
        load_dataset("fraud", num_clients=5)
    with pytest.raises(DataError, match="seed"):
        load_scenario("hospital", seed=-1)


def test_features_have_site_shift(fraud: FederatedDataset) -> None:
    names = fraud.task.feature_names
    foreign = names.index("foreign")
    rates = {cid: float(c.train.x[:, foreign].mean()) for cid, c in fraud.clients.items()}
    assert rates["branch-C"] > 5 * rates["branch-A"]  # tourist branch: many foreign cards
    assert np.isfinite(list(rates.values())).all()
