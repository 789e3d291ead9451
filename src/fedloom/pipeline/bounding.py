"""Norm bounding: the server scales every update down to at most a fixed L2 norm.

Sun, Kairouz, Suresh, McMahan. "Can You Really Backdoor Federated Learning?" 2019. Before
aggregation each update's trainable part is projected onto the ball of radius M::

    Δ_i ← Δ_i · min(1, M / ‖Δ_i‖)

so no client moves the mean by more than w_i·M / Σ w_j, however far it scales its update.
A server-side stage (``[[pipeline]] name = "norm_bound"``, ``max_norm = M``): it needs no
client cooperation and works with any aggregator, the streaming sum included. Where a
weighting stage multiplied the delta by w_i, the bound applies to the unweighted Δ_i and
the weight is kept. Buffers (non-trainable entries) are left as they came. Each update's
metrics get ``update_norm`` (its norm before bounding) and ``norm_bounded`` (1 if it was
scaled), so a run reports their example-weighted means as ``train_update_norm`` and
``train_norm_bounded``. M is best set a little above the honest updates' typical norm; a
too small M slows honest training like a smaller server step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from fedloom.core.errors import ConfigError
from fedloom.core.types import ClientUpdate
from fedloom.pipeline.base import Stage, StageContext

__all__ = ["NormBound"]


@dataclass(frozen=True)
class NormBound(Stage):
    """Scale each update's trainable part down to L2 norm ``max_norm`` on the server (Sun et al. 2019)."""

    name: ClassVar[str] = "norm_bound"
    runs_on_client: ClassVar[bool] = False

    max_norm: float = 1.0

    def __post_init__(self) -> None:
        m = self.max_norm
        if isinstance(m, bool) or not isinstance(m, int | float) or not (math.isfinite(m) and m > 0.0):
            raise ConfigError(f"must be a finite number > 0, got {m!r}", key="max_norm")

    def server(self, update: ClientUpdate, ctx: StageContext) -> ClientUpdate:
        if update.delta is None:
            raise self.reject(update, "needs a dense delta (place it after the stage that decodes the update)")
        w = update.weight
        if w is not None and not (math.isfinite(w) and w > 0.0):
            return update  # a bad weight is the weighting stage's to refuse; zero weight moves nothing
        mask = ctx.trainable
        part = update.delta[mask].to(torch.float64)
        if w is not None:
            part = part / w
        norm = float(part.norm())
        if not math.isfinite(norm):
            return update  # non-finite deltas are refused by the server's validation
        bounded = norm > self.max_norm
        metrics = {**update.metrics, "update_norm": norm, "norm_bounded": float(bounded)}
        if not bounded:
            return replace(update, metrics=metrics)
        delta = update.delta.clone()
        delta[mask] = update.delta[mask] * (self.max_norm / norm)
        return replace(update, delta=delta, metrics=metrics)
