"""Metrics against hand-computed values, degenerate inputs, and scikit-learn as a reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.core.errors import ConfigError, DataError
from fedloom.core.metrics import METRIC_NAMES, compute_metrics, greater_is_better, recall_at_fpr

BINARY_ALL = ("loss", "accuracy", "auprc", "auroc", "recall_at_1fpr", "f1", "precision", "recall")


def t(values: list[float] | list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ------------------------------------------------------------------ classification
def test_classification_accuracy_and_cross_entropy_by_hand() -> None:
    logits = t([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 0.5]])
    labels = t([0, 2, 2], torch.int64)
    m = compute_metrics("classification", logits, labels, ["accuracy", "loss"])
    assert m["accuracy"] == pytest.approx(1 / 3)

    def ce(row: list[float], k: int) -> float:
        return math.log(sum(math.exp(v) for v in row)) - row[k]

    expected = (ce([2, 1, 0], 0) + ce([0, 3, 0], 2) + ce([1, 0, 0.5], 2)) / 3
    assert m["loss"] == pytest.approx(expected, rel=1e-6)


def test_classification_rejects_bad_shapes_and_float_labels() -> None:
    with pytest.raises(DataError, match="shape"):
        compute_metrics("classification", t([1.0, 2.0]), t([0, 1], torch.int64), ["accuracy"])
    with pytest.raises(DataError, match="integer"):
        compute_metrics("classification", t([[1.0, 2.0]]), t([1.0]), ["accuracy"])
    with pytest.raises(DataError, match="do not match"):
        compute_metrics("classification", t([[1.0, 2.0]]), t([0, 1], torch.int64), ["accuracy"])


# ---------------------------------------------------------------------- binary
def test_binary_metrics_by_hand() -> None:
    # ranked: pos, neg, pos | neg, neg (threshold 0.5 <=> logit >= 0 predicts the first three)
    logits = t([3.0, 2.0, 1.0, -1.0, -2.0])
    y = t([1.0, 0.0, 1.0, 0.0, 0.0])
    m = compute_metrics("binary", logits, y, BINARY_ALL)
    assert m["auprc"] == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3))  # AP = sum dR * P
    assert m["auroc"] == pytest.approx(5 / 6)  # 5 of 6 (pos, neg) pairs ordered
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(0.8)  # 2*tp / (2*tp + fp + fn) = 4/5
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["recall_at_1fpr"] == pytest.approx(0.5)  # only the top score passes with 0 FP
    sp = torch.nn.functional.softplus
    expected_bce = float((sp(-logits) * y + sp(logits) * (1 - y)).mean())
    assert m["loss"] == pytest.approx(expected_bce, rel=1e-6)


def test_binary_accepts_column_outputs_and_targets() -> None:
    logits = t([3.0, 2.0, 1.0, -1.0, -2.0])
    y = t([1.0, 0.0, 1.0, 0.0, 0.0])
    flat = compute_metrics("binary", logits, y, BINARY_ALL)
    col = compute_metrics("binary", logits[:, None], y[:, None], BINARY_ALL)
    assert flat == pytest.approx(col)


def test_bce_of_logit_zero_is_log_two() -> None:
    assert compute_metrics("binary", t([0.0]), t([1.0]), ["loss"])["loss"] == pytest.approx(math.log(2))


def test_recall_at_1_percent_fpr_by_hand() -> None:
    # 200 negatives scored 0..199; at most 2 may score above the threshold (2/200 = 1 %).
    neg = list(range(200))
    pos = [500.0, 198.5, 197.5, -10.0]
    scores = t([*neg, *pos])
    y = t([0.0] * 200 + [1.0] * 4)
    # threshold 197.5 keeps negatives 198, 199 (FPR 1 %) and positives 500, 198.5, 197.5
    assert compute_metrics("binary", scores, y, ["recall_at_1fpr"])["recall_at_1fpr"] == pytest.approx(0.75)
    assert recall_at_fpr(y.numpy(), scores.numpy(), max_fpr=0.0) == pytest.approx(0.25)


def test_ties_move_together() -> None:
    y = t([1.0, 0.0, 1.0, 0.0])
    m = compute_metrics("binary", t([0.0, 0.0, 0.0, 0.0]), y, ["auprc", "auroc", "recall_at_1fpr"])
    assert m["auprc"] == pytest.approx(0.5)  # one threshold: precision = base rate
    assert m["auroc"] == pytest.approx(0.5)
    assert m["recall_at_1fpr"] == 0.0  # cannot split the tie, all negatives would be flagged


def test_single_class_targets_give_nan_not_crash() -> None:
    logits = t([1.0, -1.0, 2.0])
    m = compute_metrics("binary", logits, t([0.0, 0.0, 0.0]), BINARY_ALL)
    for name in ("auprc", "auroc", "recall_at_1fpr", "recall"):
        assert math.isnan(m[name])
    assert m["precision"] == 0.0  # two predicted positives, both wrong
    assert m["f1"] == 0.0
    m = compute_metrics("binary", logits, t([1.0, 1.0, 1.0]), ["auprc", "auroc"])
    assert math.isnan(m["auprc"]) and math.isnan(m["auroc"])


def test_no_positive_predictions_and_no_positives() -> None:
    m = compute_metrics("binary", t([-1.0, -2.0]), t([0.0, 0.0]), ["precision", "f1", "accuracy"])
    assert m["precision"] == 0.0
    assert math.isnan(m["f1"])
    assert m["accuracy"] == 1.0


def test_empty_batch_gives_nan() -> None:
    m = compute_metrics("binary", torch.zeros(0), torch.zeros(0), ["auprc", "loss"])
    assert all(math.isnan(v) for v in m.values())
    m = compute_metrics("classification", torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), ["accuracy"])
    assert math.isnan(m["accuracy"])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(-6, 6)), min_size=2, max_size=60).filter(
        lambda rows: len({r[0] for r in rows}) == 2
    )
)
def test_ranking_metrics_match_sklearn(rows: list[tuple[int, int]]) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.array([r[0] for r in rows], dtype=np.float32)
    s = np.array([r[1] for r in rows], dtype=np.float32) / 2.0  # many ties
    m = compute_metrics("binary", torch.from_numpy(s), torch.from_numpy(y), ["auprc", "auroc"])
    assert m["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.floats(-5, 5)), min_size=2, max_size=80))
def test_recall_at_fpr_matches_roc_curve(rows: list[tuple[int, float]]) -> None:
    from sklearn.metrics import roc_curve

    y = np.array([r[0] for r in rows])
    s = np.array([r[1] for r in rows])
    got = recall_at_fpr(y, s, max_fpr=0.1)
    if y.min() == y.max():
        assert math.isnan(got)
        return
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    assert got == pytest.approx(tpr[fpr <= 0.1 + 1e-12].max())


# ------------------------------------------------------------------ regression
def test_regression_by_hand() -> None:
    pred = t([1.0, 2.0, 3.0, 4.0])
    y = t([1.0, 3.0, 5.0, 4.0])  # errors 0, -1, -2, 0
    m = compute_metrics("regression", pred[:, None], y, ["mae", "rmse", "loss"])
    assert m == pytest.approx({"mae": 0.75, "rmse": math.sqrt(1.25), "loss": 1.25})


def test_regression_rejects_matrix_outputs() -> None:
    with pytest.raises(DataError, match=r"\(N,\) or \(N, 1\)"):
        compute_metrics("regression", torch.zeros(4, 2), torch.zeros(4), ["mae"])
    with pytest.raises(DataError, match="3 outputs but 4 targets"):
        compute_metrics("regression", torch.zeros(3), torch.zeros(4), ["mae"])


# ---------------------------------------------------------------------- names
def test_unknown_metric_names_the_metric_and_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="'auc'") as exc:
        compute_metrics("binary", t([0.0]), t([1.0]), ["auc"])
    for name in METRIC_NAMES:
        assert name in str(exc.value)


def test_metric_not_defined_for_kind() -> None:
    with pytest.raises(ConfigError, match="'mae' is not defined for a classification task"):
        compute_metrics("classification", t([[1.0, 0.0]]), t([0], torch.int64), ["mae"])
    with pytest.raises(ValueError, match="unknown task kind"):
        compute_metrics("ranking", t([0.0]), t([1.0]), ["loss"])


def test_greater_is_better() -> None:
    assert greater_is_better("auprc") and greater_is_better("accuracy")
    assert not greater_is_better("loss") and not greater_is_better("rmse")
    with pytest.raises(ValueError, match="unknown metric"):
        greater_is_better("nope")
