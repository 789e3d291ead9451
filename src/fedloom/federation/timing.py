"""Simulated client latencies: how long a dispatched client takes to return its update.

A simulation has no real clock worth measuring (every client trains on the same CPU), so
asynchronous closing (:mod:`fedloom.federation.buffered`) and the wall-clock comparisons of
``bench/async.py`` run on a simulated clock driven by a :class:`LatencyModel`:

* ``fixed``: every client takes ``median`` seconds (divided by its speed factor);
* ``lognormal``: device heterogeneity as in the FedBuff and FedScale evaluations — each client
  has a persistent duration ``median · exp(sigma · z_c)`` (z_c ~ N(0, 1) drawn once per
  client from the run seed), so a few clients are many times slower than the median: the long
  tail that stalls synchronous rounds;
* ``jitter`` (either kind): a per-dispatch factor ``exp(jitter · z)``, fresh for every dispatch;
* ``speeds``: per-client speed factors that divide the duration (2.0: twice as fast).

Every draw depends only on (seed, client id, dispatch serial), so a resumed run sees the
same latencies.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np

from fedloom.core.errors import ConfigError

__all__ = ["LatencyKind", "LatencyModel"]

LatencyKind = Literal["fixed", "lognormal"]


def _client_key(client_id: str) -> int:
    return int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:8], "little")


@dataclass(frozen=True)
class LatencyModel:
    """Seconds a client takes per dispatch (see the module docstring)."""

    kind: LatencyKind = "fixed"
    median: float = 1.0
    sigma: float = 1.0
    jitter: float = 0.0
    speeds: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "lognormal"):
            raise ConfigError(f"must be 'fixed' or 'lognormal', got {self.kind!r}", key="latency.kind")
        for key in ("median", "sigma", "jitter"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"must be a finite number >= 0, got {v!r}", key=f"latency.{key}")
        if self.median <= 0:
            raise ConfigError(f"must be > 0, got {self.median!r}", key="latency.median")
        for cid, f in self.speeds.items():
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
                raise ConfigError(f"must be a finite number > 0, got {f!r}", key=f"latency.speeds.{cid}")
        object.__setattr__(self, "speeds", MappingProxyType(dict(self.speeds)))

    def base(self, client_id: str) -> float:
        """The client's typical duration (before per-dispatch jitter)."""
        d = self.median
        if self.kind == "lognormal" and self.sigma > 0:
            z = np.random.default_rng([self.seed, 0x1A7, _client_key(client_id)]).standard_normal()
            d *= math.exp(self.sigma * float(z))
        return d / self.speeds.get(client_id, 1.0)

    def duration(self, client_id: str, serial: int) -> float:
        """Seconds the ``serial``-th dispatch of the run (to ``client_id``) takes."""
        d = self.base(client_id)
        if self.jitter > 0:
            z = np.random.default_rng([self.seed, 0x1A8, _client_key(client_id), serial]).standard_normal()
            d *= math.exp(self.jitter * float(z))
        return d
