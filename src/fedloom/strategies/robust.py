"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, Krum, Multi-Krum, centered clipping.

These rules need every update at once, so their aggregators buffer
(:class:`~fedloom.strategies.base.BufferingAggregator`, O(clients × model) memory). They
ignore example counts: weighting by a self-reported count would let one malicious client
claim a huge count. The server step is the strategy's server optimizer's (by default
FedAvg's ``x ← x + η_g · agg``). Statistics are computed in float64 and returned in the
deltas' dtype.

Coordinate-wise median and trimmed mean — Yin, Chen, Ramchandran, Bartlett.
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates." ICML 2018.
For each coordinate k over the n updates::

    median:        agg_k = med{Δ_1k, …, Δ_nk}       (mean of the two middle values for even n)
    trimmed mean:  agg_k = 1/(n − 2b) · Σ_{x ∈ U_k} x,   b = ⌊β n⌋

where U_k holds the coordinate's values without its b largest and b smallest, β ∈ [0, ½)
being the fraction trimmed from *each* end. For β > 0 a cohort with ⌊β n⌋ = 0 would trim
nothing and silently become a plain mean, so it raises
:class:`~fedloom.core.errors.StrategyError` instead (it needs n ≥ ⌈1/β⌉).

Krum and Multi-Krum — Blanchard, El Mhamdi, Guerraoui, Stainer. "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent." NeurIPS 2017. With f the number of
Byzantine clients tolerated, and i → j meaning Δ_j is among the n − f − 2 updates closest
to Δ_i (in Euclidean distance, excluding Δ_i itself)::

    score(i) = Σ_{i → j} ‖Δ_i − Δ_j‖²
    Krum:        agg = Δ_{i*},  i* = argmin_i score(i)
    Multi-Krum:  agg = (1/m) Σ_{i ∈ M} Δ_i,  M the m lowest-scoring updates  (default m = n − f)

Krum needs n > 2f + 2; Multi-Krum also needs m ≤ n − f (any larger set would contain a
Byzantine update whenever f are present). Ties in score are broken by client id, so the
choice does not depend on arrival order. The aggregator keeps ``selected`` (ids, best
first) and ``scores`` for inspection and logging.

Centered clipping with bucketing — Karimireddy, He, Jaggi. "Learning from History for
Byzantine Robust Optimization." ICML 2021; and "Byzantine-Robust Learning on Heterogeneous
Datasets via Bucketing." ICLR 2022. The updates are shuffled (seeded per round) into buckets
of s and averaged per bucket (y_1 … y_⌈n/s⌉; s = 1: no bucketing, which heterogeneous clients
need less of), then, from the center v₀ = the previous round's aggregate (zero at first)::

    v_{l+1} = v_l + (1/B) Σ_b (y_b − v_l) · min(1, τ / ‖y_b − v_l‖)      for l = 0 … L−1

and agg = v_L. Each bucket moves the result by at most τ/B per iteration, however far it lies.
The center is server state (``cclip_center``), checkpointed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from fedloom.core.errors import ConfigError, StrategyError
from fedloom.core.seeding import derive_seed
from fedloom.core.types import Aggregate
from fedloom.strategies._checks import check_int, check_real, set_fields, state_tensor
from fedloom.pipeline import Stage
from fedloom.strategies.base import Aggregator, BufferingAggregator, ServerState, Strategy

__all__ = [
    "CenteredClip",
    "CenteredClipAggregator",
    "FedMedian",
    "FedTrimmedMean",
    "Krum",
    "KrumAggregator",
    "MedianAggregator",
    "MultiKrum",
    "RobustStrategy",
    "TrimmedMeanAggregator",
]


class _Float64Buffer(BufferingAggregator):
    """A buffering aggregator whose statistics run on a float64 (clients, numel) matrix."""

    def _matrix(self) -> torch.Tensor:
        return torch.stack([d.to(torch.float64) for d in self.deltas])

    @property
    def _out_dtype(self) -> torch.dtype:
        return self.deltas[0].dtype


class MedianAggregator(_Float64Buffer):
    """Coordinate-wise median (Yin et al. 2018)."""

    def _result(self) -> torch.Tensor:
        x = self._matrix()
        n = x.shape[0]
        s = x.sort(dim=0).values
        med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        return med.to(self._out_dtype)


class TrimmedMeanAggregator(_Float64Buffer):
    """Coordinate-wise β-trimmed mean (Yin et al. 2018); β is trimmed from each end."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def _result(self) -> torch.Tensor:
        n = len(self.deltas)
        b = math.floor(self.beta * n + 1e-9)
        if self.beta > 0.0 and b == 0:
            raise StrategyError(
                f"trimmed mean with beta={self.beta} trims floor(beta*n)=0 values per end for n={n} updates; "
                f"it needs at least {math.ceil(1.0 / self.beta - 1e-9)} updates"
            )
        if n - 2 * b < 1:  # never average an empty set (a NaN model)
            raise StrategyError(f"trimmed mean with beta={self.beta} trims {b} values per end of n={n}: none is left")
        s = self._matrix().sort(dim=0).values
        return s[b : n - b].mean(dim=0).to(self._out_dtype)


class KrumAggregator(_Float64Buffer):
    """Krum (``m=1``) and Multi-Krum (``m`` > 1, or None for n − f) of Blanchard et al. 2017."""

    def __init__(self, f: int, m: int | None = 1) -> None:
        super().__init__()
        self.f = f
        self.m = m
        self.selected: tuple[str, ...] = ()
        self.scores: dict[str, float] = {}

    def _result(self) -> torch.Tensor:
        n, f = len(self.deltas), self.f
        if n <= 2 * f + 2:
            raise StrategyError(f"Krum with f={f} needs more than 2f+2={2 * f + 2} updates, got {n}")
        m = n - f if self.m is None else self.m
        if m > n - f:
            raise StrategyError(f"Multi-Krum with f={f} can average at most n-f={n - f} of {n} updates, m={m}")
        x = self._matrix()
        dist = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n - 1):
            diff = x[i + 1 :] - x[i]
            d = (diff * diff).sum(dim=1)
            dist[i, i + 1 :] = d
            dist[i + 1 :, i] = d
        dist.fill_diagonal_(math.inf)
        closest = n - f - 2
        score = dist.sort(dim=1).values[:, :closest].sum(dim=1).tolist()
        ids = self.client_ids  # aligned with self.deltas (an id is appended after its _add)
        order = sorted(range(n), key=lambda i: (score[i], ids[i]))[:m]
        self.scores = {ids[i]: score[i] for i in range(n)}
        self.selected = tuple(ids[i] for i in order)
        return x[order].mean(dim=0).to(self._out_dtype)


_MAX_BETA = 0.49999
"""The largest β: floor(β·n + 1e-9) then stays below n/2 for every cohort size n (a value is left to average)."""


class CenteredClipAggregator(_Float64Buffer):
    """Centered clipping over bucket means (Karimireddy et al. 2021, 2022)."""

    def __init__(self, *, tau: float, iterations: int, bucket: int, center: torch.Tensor, seed: int) -> None:
        super().__init__()
        self.tau, self.iterations, self.bucket, self.center, self.seed = tau, iterations, bucket, center, seed

    def _result(self) -> torch.Tensor:
        x = self._matrix()
        n = x.shape[0]
        order = sorted(range(n), key=lambda i: self.client_ids[i])  # arrival order must not matter
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed % (2**63)))
        x = x[[order[i] for i in perm.tolist()]]
        buckets = torch.stack([x[i : i + self.bucket].mean(dim=0) for i in range(0, n, self.bucket)])
        v = self.center.to(torch.float64).clone()
        for _ in range(self.iterations):
            diff = buckets - v
            norms = diff.norm(dim=1, keepdim=True)
            scale = torch.where(norms > self.tau, self.tau / norms.clamp_min(1e-300), torch.ones_like(norms))
            v = v + (diff * scale).mean(dim=0)
        return v.to(self._out_dtype)


class RobustStrategy(Strategy):
    """Base of the robust rules: the server optimizer's step over a robust aggregator.

    No ``weighted`` option and no weighting stage: the rules see the raw deltas and ignore
    example counts.
    """

    name = "robust"

    def stages(self) -> tuple[Stage, ...]:
        return ()


class FedMedian(RobustStrategy):
    """Coordinate-wise median of the deltas (Yin et al. 2018)."""

    name = "median"

    def aggregator(self, state: ServerState, rnd: int) -> Aggregator:
        return MedianAggregator()


@dataclass(frozen=True, kw_only=True)
class FedTrimmedMean(RobustStrategy):
    """Coordinate-wise trimmed mean, ``beta`` ∈ [0, 0.5) trimmed from each end (Yin et al. 2018)."""

    name = "trimmed_mean"

    beta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        beta = check_real(self.beta, key="beta", low=0.0, high=0.5, high_open=True)
        if beta > _MAX_BETA:
            raise ConfigError(
                f"beta={beta!r} trims so close to half from each end that an even cohort keeps no value "
                f"(floor(beta*n) reaches n/2); use beta <= {_MAX_BETA}",
                key="strategy.beta",
            )
        set_fields(self, beta=beta)

    def aggregator(self, state: ServerState, rnd: int) -> Aggregator:
        return TrimmedMeanAggregator(self.beta)


@dataclass(frozen=True, kw_only=True)
class Krum(RobustStrategy):
    """Krum with ``f`` tolerated Byzantine clients (Blanchard et al. 2017); needs n > 2f + 2."""

    name = "krum"

    f: int

    def __post_init__(self) -> None:
        super().__post_init__()
        set_fields(self, f=check_int(self.f, key="f", low=0))

    def aggregator(self, state: ServerState, rnd: int) -> Aggregator:
        return KrumAggregator(self.f, m=1)


@dataclass(frozen=True, kw_only=True)
class MultiKrum(Krum):
    """Multi-Krum: mean of the ``m`` best Krum scores (default n − f; Blanchard et al. 2017)."""

    name = "multikrum"

    m: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.m is not None:
            set_fields(self, m=check_int(self.m, key="m", low=1))

    def aggregator(self, state: ServerState, rnd: int) -> Aggregator:
        return KrumAggregator(self.f, m=self.m)


CENTER = "cclip_center"
"""Server-state tensor of centered clipping: the previous round's aggregate."""


@dataclass(frozen=True, kw_only=True)
class CenteredClip(RobustStrategy):
    """Centered clipping at radius ``tau`` over bucket means of size ``bucket``, ``iterations`` times (Karimireddy et al.)."""

    name = "centered_clip"

    tau: float
    iterations: int = 3
    bucket: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        set_fields(
            self,
            tau=check_real(self.tau, key="tau", low=0.0, low_open=True),
            iterations=check_int(self.iterations, key="iterations", low=1),
            bucket=check_int(self.bucket, key="bucket", low=1),
        )

    def init(self, params: torch.Tensor) -> ServerState:
        state = super().init(params)
        return replace(state, tensors={**state.tensors, CENTER: torch.zeros_like(params)})

    def aggregator(self, state: ServerState, rnd: int) -> Aggregator:
        center = state_tensor(state.tensors, CENTER, state.params, strategy=type(self).__name__)
        seed = derive_seed(self.seed, "centered-clip", rnd)
        return CenteredClipAggregator(tau=self.tau, iterations=self.iterations, bucket=self.bucket, center=center, seed=seed)

    def apply(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        return self._step(state, aggregate.delta, **{CENTER: aggregate.delta.detach().clone()})
