"""Evaluation metrics: pure functions of a model's outputs and the targets.

:func:`compute_metrics` is the one entry point. It takes the task kind of a
:class:`~fedloom.data.base.TaskSpec` and the raw model outputs:

* ``classification`` — logits ``(N, C)``, integer labels ``(N,)``;
* ``binary`` — one logit per example, ``(N,)`` or ``(N, 1)``, labels 0/1 (any dtype);
* ``regression`` — one prediction per example, ``(N,)`` or ``(N, 1)``, float targets.

Metric names (see :data:`METRIC_NAMES`):

``loss``            the task's training loss, mean over examples: cross-entropy,
                    BCE-with-logits or MSE.
``accuracy``        argmax accuracy (classification) or accuracy at probability 0.5 (binary).
``mae``, ``rmse``   regression errors (mean absolute, root mean squared).
``auprc``           average precision, Σ_k (R_k − R_{k−1}) P_k over distinct score thresholds
                    (the step-wise area under the precision-recall curve, as
                    ``sklearn.metrics.average_precision_score``).
``auroc``           area under the ROC curve (trapezoidal, ties handled as sklearn).
``recall_at_1fpr``  the largest recall over score thresholds whose false-positive rate is
                    at most 1 % (predict positive when ``score >= threshold``).
``precision``, ``recall``, ``f1``
                    at probability threshold 0.5 (logit >= 0).

Degenerate inputs never crash: ``auprc``/``auroc``/``recall_at_1fpr``/``recall`` are
``nan`` when the targets hold a single class (undefined), ``precision`` is 0 when nothing
is predicted positive, ``f1`` is ``nan`` when there are neither positives nor positive
predictions, and every metric is ``nan`` on an empty batch. Ranking metrics are computed
in float64 on the CPU, with no scikit-learn import (it is slow to import).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedloom.core.errors import ConfigError, DataError

__all__ = [
    "METRIC_NAMES",
    "average_precision",
    "compute_metrics",
    "greater_is_better",
    "recall_at_fpr",
    "roc_auc",
]

METRIC_NAMES: tuple[str, ...] = (
    "loss",
    "accuracy",
    "mae",
    "rmse",
    "auprc",
    "auroc",
    "recall_at_1fpr",
    "f1",
    "precision",
    "recall",
)
"""Every metric name :func:`compute_metrics` understands."""

_KINDS = ("classification", "binary", "regression")
_FOR_KIND: dict[str, frozenset[str]] = {
    "classification": frozenset({"loss", "accuracy"}),
    "binary": frozenset({"loss", "accuracy", "auprc", "auroc", "recall_at_1fpr", "f1", "precision", "recall"}),
    "regression": frozenset({"loss", "mae", "rmse"}),
}
_LOWER_IS_BETTER = frozenset({"loss", "mae", "rmse"})
_NAN = float("nan")


def greater_is_better(name: str) -> bool:
    """Whether a larger value of metric ``name`` is better (False for loss, mae, rmse)."""
    _check_names([name])
    return name not in _LOWER_IS_BETTER


def compute_metrics(kind: str, outputs: torch.Tensor, targets: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    """The metrics ``names`` of ``outputs`` against ``targets`` for a task of ``kind``.

    Raises :class:`~fedloom.core.errors.ConfigError` (a ``ValueError``) for an unknown
    kind or metric name, or a metric that is undefined for the kind (``mae`` of a
    classifier), and :class:`~fedloom.core.errors.DataError` (a ``ValueError``) for
    outputs and targets of mismatched shapes.
    """
    if kind not in _KINDS:
        raise ConfigError(f"unknown task kind {kind!r}; known kinds: {', '.join(_KINDS)}", key="task.kind")
    if isinstance(names, str):
        names = (names,)
    _check_names(names)
    for n in names:
        if n not in _FOR_KIND[kind]:
            raise ConfigError(
                f"metric {n!r} is not defined for a {kind} task; use one of {sorted(_FOR_KIND[kind])}",
                key="task.metrics",
            )
    outputs = outputs.detach()
    targets = targets.detach()
    if kind == "classification":
        return _classification(outputs, targets, names)
    out, tgt = _as_vectors(kind, outputs, targets)
    if kind == "binary":
        return _binary(out, tgt, names)
    return _regression(out, tgt, names)


# ----------------------------------------------------------------------------- kinds
def _check_names(names: Sequence[str]) -> None:
    for n in names:
        if n not in METRIC_NAMES:
            raise ConfigError(f"unknown metric {n!r}; known metrics: {', '.join(METRIC_NAMES)}", key="task.metrics")


def _classification(logits: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    if logits.dim() != 2:
        raise DataError(f"classification outputs must be logits of shape (N, C), got {tuple(logits.shape)}")
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise DataError(f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(f"classification labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() == 0:
        return dict.fromkeys(names, _NAN)
    logits = logits.to(torch.float64)
    labels = labels.to(device=logits.device, dtype=torch.int64)
    out: dict[str, float] = {}
    for n in names:
        if n == "loss":
            out[n] = float(F.cross_entropy(logits, labels))
        else:  # accuracy
            out[n] = float((logits.argmax(dim=1) == labels).to(torch.float64).mean())
    return out


def _as_vectors(kind: str, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def vec(t: torch.Tensor, what: str) -> torch.Tensor:
        if t.dim() == 2 and t.shape[1] == 1:
            return t[:, 0]
        if t.dim() != 1:
            raise DataError(f"{kind} {what} must have shape (N,) or (N, 1), got {tuple(t.shape)}")
        return t

    out, tgt = vec(outputs, "outputs"), vec(targets, "targets")
    if out.shape[0] != tgt.shape[0]:
        raise DataError(f"{out.shape[0]} outputs but {tgt.shape[0]} targets")
    return out.to(torch.float64), tgt.to(device=out.device, dtype=torch.float64)


def _binary(logits: torch.Tensor, y: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    if y.numel() == 0:
        return dict.fromkeys(names, _NAN)
    pred = logits >= 0.0  # sigmoid(logit) >= 0.5
    pos = y > 0.5
    tp = int((pred & pos).sum())
    fp = int((pred & ~pos).sum())
    fn = int((~pred & pos).sum())
    scores_np: np.ndarray | None = None
    y_np: np.ndarray | None = None

    def ranking(fn_: Callable[[np.ndarray, np.ndarray], float]) -> float:
        nonlocal scores_np, y_np
        if scores_np is None:
            scores_np = logits.cpu().numpy()
            y_np = pos.cpu().numpy()
        assert y_np is not None
        return fn_(y_np, scores_np)

    out: dict[str, float] = {}
    for n in names:
        if n == "loss":
            out[n] = float(F.binary_cross_entropy_with_logits(logits, y))
        elif n == "accuracy":
            out[n] = float((pred == pos).to(torch.float64).mean())
        elif n == "precision":
            out[n] = tp / (tp + fp) if tp + fp else 0.0
        elif n == "recall":
            out[n] = tp / (tp + fn) if tp + fn else _NAN
        elif n == "f1":
            out[n] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else _NAN
        elif n == "auprc":
            out[n] = ranking(average_precision)
        elif n == "auroc":
            out[n] = ranking(roc_auc)
        else:  # recall_at_1fpr
            out[n] = ranking(lambda t, s: recall_at_fpr(t, s, max_fpr=0.01))
    return out


def _regression(pred: torch.Tensor, y: torch.Tensor, names: Sequence[str]) -> dict[str, float]:
    if y.numel() == 0:
        return dict.fromkeys(names, _NAN)
    err = pred - y
    mse = float((err * err).mean())
    out: dict[str, float] = {}
    for n in names:
        if n == "loss":
            out[n] = mse
        elif n == "mae":
            out[n] = float(err.abs().mean())
        else:  # rmse
            out[n] = math.sqrt(mse)
    return out


# --------------------------------------------------------------- ranking metrics
def _curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct score, highest score first."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise DataError(f"{s.shape[0]} scores but {y.shape[0]} labels")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y, dtype=np.float64)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Average precision Σ_k (R_k − R_{k−1}) P_k; ``nan`` unless both classes occur."""
    y = np.asarray(y_true).astype(bool)
    if y.size == 0 or y.all() or not y.any():
        return _NAN
    tps, fps = _curve(y, scores)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal rule); ``nan`` unless both classes occur."""
    y = np.asarray(y_true).astype(bool)
    if y.size == 0 or y.all() or not y.any():
        return _NAN
    tps, fps = _curve(y, scores)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def recall_at_fpr(y_true: np.ndarray, scores: np.ndarray, *, max_fpr: float = 0.01) -> float:
    """Largest recall over thresholds ``score >= t`` whose false-positive rate is ``<= max_fpr``.

    Tied scores move together (a threshold cannot split a tie). ``nan`` unless both classes
    occur; 0 when even the highest score already exceeds the allowed false-positive rate.
    """
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr!r}")
    y = np.asarray(y_true).astype(bool)
    if y.size == 0 or y.all() or not y.any():
        return _NAN
    tps, fps = _curve(y, scores)
    ok = fps / fps[-1] <= max_fpr + 1e-12
    return float(tps[ok].max() / tps[-1]) if ok.any() else 0.0
