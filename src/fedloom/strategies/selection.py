"""Client selection: a seeded fraction C of the available clients.

``fixed`` (the default): as in McMahan et al. 2017, each round samples
``m = max(C * K, min_clients)`` of the ``K`` available clients uniformly without replacement.
``poisson``: each available client joins independently with probability q = C, so the cohort
size varies (it may be empty); this is the sampling the privacy accountant models for
user-level differential privacy (McMahan et al. 2018), and ``min_clients`` only says how many
clients must be available. Either draw depends only on (seed, round, the set of available
ids), so a resumed run selects the same cohorts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedloom.core.errors import ConfigError, StrategyError
from fedloom.strategies._checks import check_int, check_real

__all__ = ["ClientSampler", "SamplingName"]

SamplingName = Literal["fixed", "poisson"]


@dataclass(frozen=True)
class ClientSampler:
    """Samples ``max(floor(fraction * K), min_clients)`` of ``K`` available clients, or each with prob. ``fraction``."""

    fraction: float = 0.1
    min_clients: int = 1
    seed: int = 0
    mode: SamplingName = "fixed"

    def __post_init__(self) -> None:
        check_real(self.fraction, key="fraction", low=0.0, high=1.0, low_open=True)
        check_int(self.min_clients, key="min_clients", low=1)
        check_int(self.seed, key="seed", low=0)
        if self.mode not in ("fixed", "poisson"):
            raise ConfigError(f"must be 'fixed' or 'poisson', got {self.mode!r}", key="strategy.sampling")

    def cohort_size(self, num_available: int) -> int:
        """How many clients a round with ``num_available`` clients selects."""
        return min(num_available, max(self.min_clients, math.floor(self.fraction * num_available + 1e-9)))

    def sample(self, rnd: int, available: Sequence[str]) -> list[str]:
        """The cohort of round ``rnd`` (sorted ids)."""
        ids = sorted(set(available))
        if len(ids) < self.min_clients:
            raise StrategyError(f"round {rnd}: {len(ids)} clients available, min_clients is {self.min_clients}")
        rng = np.random.default_rng([self.seed, rnd])
        if self.mode == "poisson":
            keep = rng.random(len(ids)) < self.fraction
            return [cid for cid, k in zip(ids, keep, strict=True) if k]
        return self.draw(rnd, ids, self.cohort_size(len(ids)))

    def draw(self, rnd: int, available: Sequence[str], k: int, *, salt: int = 0) -> list[str]:
        """``k`` of ``available`` uniformly without replacement (sorted ids), seeded by (seed, round, salt).

        The fixed sampling of a round is ``draw(rnd, available, cohort_size)``; asynchronous
        dispatch (:mod:`fedloom.federation.buffered`) draws the clients it starts with it, salt
        counting the draws made for one model version (0: the same draw as a synchronous round).
        """
        ids = sorted(set(available))
        k = min(k, len(ids))
        rng = np.random.default_rng([self.seed, rnd] if salt == 0 else [self.seed, rnd, salt])
        chosen = rng.choice(len(ids), size=k, replace=False)
        return sorted(ids[i] for i in chosen)
