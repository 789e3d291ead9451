"""Real vectors to integers mod 2^k and back: the encodings a secure sum carries.

Two plans with one interface (``quantize`` to int64, ``decode_sum``, ``sum_range``,
``max_clients``, ``meta`` / :func:`plan_from_meta` for the wire): :class:`QuantizationPlan`
(range clipping and stochastic quantization to levels, below) and :class:`SkellamPlan`
(distributed DP: L2 clipping, conditional stochastic rounding to a signed integer grid, and
each client's share of Skellam noise).

A client's (weighted) delta x is clipped to [−c, c] per entry and mapped to one of
L = 2^b levels with unbiased stochastic rounding::

    q = ⌊(x + c) / Δ + u⌋,   Δ = 2c / (L − 1),   u ~ U[0, 1)   →   q ∈ {0, …, L − 1},  E[q·Δ − c] = x

The server learns S = Σ_i q_i mod 2^k for the n surviving clients; while n (L − 1) < 2^k
there is no wrap-around, and Σ_i x_i ≈ S·Δ − n·c with error below n·Δ per entry (each
client's rounding moves it by less than one step). The bound is
:meth:`QuantizationPlan.sum_error_bound`.

A weighted delta w·δ (FedAvg's w = n examples) is quantized as x = w·δ / ``scale``: with
``scale`` about the largest client weight, ``clip`` is in the units of δ itself; the
decoded sum is multiplied back by ``scale``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedloom.core.errors import ConfigError, ProtocolError

__all__ = ["EncodingPlan", "QuantizationPlan", "SkellamPlan", "plan_from_meta"]


@dataclass(frozen=True)
class QuantizationPlan:
    """``bits`` quantization levels (b), ``modulus_bits`` of the ring (k), clip range ``clip`` (c)."""

    bits: int = 16
    modulus_bits: int = 32
    clip: float = 1.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.modulus_bits, int) or not 8 <= self.modulus_bits <= 32:
            raise ConfigError(f"must be an integer in [8, 32], got {self.modulus_bits!r}", key="modulus_bits")
        if not isinstance(self.bits, int) or not 1 <= self.bits < self.modulus_bits:
            raise ConfigError(f"must be an integer in [1, modulus_bits), got {self.bits!r}", key="bits")
        if not (isinstance(self.clip, (int, float)) and 0.0 < float(self.clip) < float("inf")):
            raise ConfigError(f"must be a positive finite number, got {self.clip!r}", key="clip")
        if not (isinstance(self.scale, (int, float)) and 0.0 < float(self.scale) < float("inf")):
            raise ConfigError(f"must be a positive finite number, got {self.scale!r}", key="weight_scale")

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def step(self) -> float:
        return 2.0 * float(self.clip) / (self.levels - 1)

    @property
    def max_clients(self) -> int:
        """The largest number of summed clients without wrap-around: n (L − 1) < 2^k."""
        return ((1 << self.modulus_bits) - 1) // (self.levels - 1)

    @property
    def mask(self) -> int:
        return (1 << self.modulus_bits) - 1

    def wire_dtype(self) -> torch.dtype:
        """The dtype a masked vector travels in (its bits; values are < 2^k)."""
        return torch.int16 if self.modulus_bits <= 16 else torch.int32

    def sum_error_bound(self, n: int) -> float:
        """Largest |decoded sum − sum of clipped inputs| per entry for ``n`` clients (in the inputs' units)."""
        return n * self.step * float(self.scale)

    kind: ClassVar[str] = "levels"

    def quantize(self, x: torch.Tensor, generator: torch.Generator) -> np.ndarray:
        """Clip ``x / scale`` (1-D) and stochastically round it to int64 levels in [0, L − 1]."""
        c = float(self.clip)
        v = (x.detach().to(torch.float64).cpu() / float(self.scale)).clamp(-c, c)
        u = torch.rand(v.shape, generator=generator, dtype=torch.float64)
        q = torch.floor((v + c) / self.step + u).clamp_(0, self.levels - 1)
        return q.to(torch.int64).numpy()

    def decode_sum(self, total: np.ndarray, n: int) -> torch.Tensor:
        """Σ x_i (float64) from the sum of ``n`` clients' levels (reduced mod 2^k: no wrap-around below max_clients)."""
        return (torch.from_numpy(total.astype(np.float64)) * self.step - n * float(self.clip)) * float(self.scale)

    def sum_range(self, n: int) -> tuple[int, int]:
        """The values an honest sum of ``n`` inputs can take, per entry."""
        return 0, n * (self.levels - 1)

    def meta(self) -> dict[str, Any]:
        return {"encoding": self.kind, "bits": self.bits, "modulus_bits": self.modulus_bits, "clip": float(self.clip), "scale": float(self.scale)}

    def to_wire(self, y: np.ndarray) -> torch.Tensor:
        """A uint32 vector (values < 2^k) as its wire tensor (the same bits, signed view)."""
        y = y & np.uint32(self.mask)
        if self.modulus_bits <= 16:
            return torch.from_numpy(y.astype(np.uint16).view(np.int16).copy())
        return torch.from_numpy(y.view(np.int32).copy())

    def from_wire(self, t: torch.Tensor) -> np.ndarray:
        """The uint32 vector a wire tensor of :meth:`to_wire` holds."""
        a = t.detach().cpu().contiguous().numpy()
        if self.modulus_bits <= 16:
            return a.view(np.uint16).astype(np.uint32)
        return a.view(np.uint32).copy()


MAX_POISSON_MEAN = 1e10
"""The largest Poisson mean drawn: numpy's sampler's variance is measured exact to 0.3% up to 1e11 and
inflated beyond ~1e15 (floating point); the grid is made coarse enough to stay below this."""


def rounded_norm_bound(c: float, d: int, beta: float = math.exp(-0.5)) -> float:
    """An L2 bound that stochastic rounding of a vector of norm ≤ ``c`` in ``d`` entries keeps with probability ≥ 1 − β.

    Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
    Learning with Secure Aggregation", ICML 2021 (conditional randomized rounding):
    min(√(c² + d/4 + √(2 ln(1/β)) (c + √d / 2)), c + √d).
    """
    return min(math.sqrt(c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2)), c + math.sqrt(d))


@dataclass(frozen=True)
class SkellamPlan:
    """Distributed DP's encoding: x ↦ Q(x / γ) + Skellam noise, signed integers mod 2^k.

    The client clips its delta to L2 norm ≤ ``clip_norm`` (C), divides it by the grid step
    ``gamma`` (γ) and rounds each entry stochastically up or down, redrawing until the
    integer vector's L2 norm is at most ``bound`` (conditional rounding: the L2 sensitivity
    Δ2 of the sum is then exactly ``bound``, its L1 sensitivity at most min(Δ2², √d·Δ2)); it
    adds Skellam noise Poisson(μ/2) − Poisson(μ/2) with variance μ = ``variance`` to every
    entry. The server's sum of n inputs carries Skellam noise of variance n·μ (Skellam is
    closed under addition); decoded, the noise has standard deviation √(nμ)·γ. Values are
    signed and wrap mod 2^k; :meth:`max_clients` keeps the sum and 8 standard deviations of
    noise inside (−2^(k−1), 2^(k−1)).

    ``noise``: ``seeded`` (from the client's round seed, reproducible, simulation only) or
    ``os`` (OS entropy: what a deployment uses, since the server picks the seeds).
    """

    clip_norm: float
    gamma: float
    bound: float
    variance: float
    modulus_bits: int = 32
    noise: str = "seeded"
    kind: ClassVar[str] = "skellam"

    def __post_init__(self) -> None:
        for name in ("clip_norm", "gamma", "bound", "variance"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < float(v) < float("inf")):
                raise ConfigError(f"must be a positive finite number, got {v!r}", key=name)
        if isinstance(self.modulus_bits, bool) or not isinstance(self.modulus_bits, int) or not 8 <= self.modulus_bits <= 32:
            raise ConfigError(f"must be an integer in [8, 32], got {self.modulus_bits!r}", key="modulus_bits")
        if self.noise not in ("seeded", "os"):
            raise ConfigError(f"must be 'seeded' or 'os', got {self.noise!r}", key="noise")
        if self.variance / 2 > MAX_POISSON_MEAN:
            raise ConfigError(f"a noise variance above {2 * MAX_POISSON_MEAN:g} is beyond what the Poisson sampler draws exactly", key="variance")

    @classmethod
    def build(
        cls, *, clip_norm: float, noise_multiplier: float, clients: int, numel: int, modulus_bits: int = 32, noise: str = "seeded"
    ) -> SkellamPlan:
        """The grid for ``clients`` inputs of ``numel`` entries whose summed noise has std σ·Δ2.

        Δ2 (``bound``) is chosen so that the sum of ``clients`` inputs and 8 standard
        deviations of the total noise use at most half of the signed range, and each
        client's Poisson means stay below :data:`MAX_POISSON_MEAN`; each client adds
        variance (σ·Δ2)² / clients.
        """
        half = float(1 << (modulus_bits - 1))
        target = half / (2 * (clients + 8 * noise_multiplier))
        # each client's Poisson means (σΔ2)²/(2m) stay below MAX_POISSON_MEAN, where numpy's sampler is exact
        target = min(target, math.sqrt(2 * MAX_POISSON_MEAN * clients) / noise_multiplier)
        c = target - math.sqrt(numel)  # rounded_norm_bound(c, d) <= c + sqrt(d)
        if c < 4 * math.sqrt(numel):
            raise ConfigError(
                f"{clients} clients and {numel} entries leave too fine a grid in Z_2^{modulus_bits} "
                "(rounding would dominate the update): use a larger ring or fewer clients per round",
                key="privacy.mode",
            )
        bound = rounded_norm_bound(c, numel)
        variance = (noise_multiplier * bound) ** 2 / clients
        return cls(clip_norm=float(clip_norm), gamma=float(clip_norm) / c, bound=bound, variance=variance, modulus_bits=modulus_bits, noise=noise)

    @property
    def mask(self) -> int:
        return (1 << self.modulus_bits) - 1

    def sensitivity(self, numel: int) -> tuple[float, float]:
        """(Δ1, Δ2) of the integer sum: one client's rounded input, ‖q‖₂ ≤ bound, ‖q‖₁ ≤ min(‖q‖₂², √d‖q‖₂)."""
        return min(self.bound**2, math.sqrt(numel) * self.bound), self.bound

    @property
    def max_clients(self) -> int:
        """The most inputs whose sum plus 8 noise standard deviations stays inside the signed range."""
        half = float(1 << (self.modulus_bits - 1))
        lo, hi = 0, 1 << 24
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if mid * self.bound + 8 * math.sqrt(mid * self.variance) < half:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def wire_dtype(self) -> torch.dtype:
        return torch.int16 if self.modulus_bits <= 16 else torch.int32

    def quantize(self, x: torch.Tensor, generator: torch.Generator) -> np.ndarray:
        """Clip to C, scale by 1/γ, round conditionally to ‖q‖₂ ≤ bound, add this client's Skellam noise (int64)."""
        v = x.detach().to(torch.float64).cpu().reshape(-1)
        norm = float(v.norm())
        if norm > self.clip_norm:
            v = v * (self.clip_norm / norm)
        v = v / self.gamma
        for _ in range(64):  # each try succeeds with probability >= 1 - e^(-1/2)
            q = torch.floor(v + torch.rand(v.shape, generator=generator, dtype=torch.float64))
            if float(q.norm()) <= self.bound:
                break
        else:  # pragma: no cover - probability < 0.61^64
            raise ProtocolError("conditional rounding did not meet the norm bound in 64 tries")
        seed = secrets.randbits(63) if self.noise == "os" else int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        lam = self.variance / 2
        noise = rng.poisson(lam, v.shape[0]) - rng.poisson(lam, v.shape[0])
        return q.to(torch.int64).numpy() + noise

    def decode_sum(self, total: np.ndarray, n: int) -> torch.Tensor:
        """Σ x_i + noise (float64) from the sum of ``n`` inputs, read as signed integers mod 2^k, times γ."""
        t = total.astype(np.int64) & self.mask
        t = np.where(t >= 1 << (self.modulus_bits - 1), t - (1 << self.modulus_bits), t)
        return torch.from_numpy(t.astype(np.float64) * self.gamma)

    def sum_range(self, n: int) -> tuple[int, int]:
        return -(1 << (self.modulus_bits - 1)), (1 << (self.modulus_bits - 1)) - 1

    def meta(self) -> dict[str, Any]:
        return {
            "encoding": self.kind, "clip_norm": float(self.clip_norm), "gamma": float(self.gamma), "bound": float(self.bound),
            "variance": float(self.variance), "modulus_bits": self.modulus_bits, "noise": self.noise,
        }  # fmt: skip

    to_wire = QuantizationPlan.to_wire
    from_wire = QuantizationPlan.from_wire


EncodingPlan = QuantizationPlan | SkellamPlan


def plan_from_meta(meta: Mapping[str, Any]) -> EncodingPlan:
    """The plan a server's message names (ProtocolError with the reason if it names none or a bad one)."""
    enc = meta.get("encoding")
    try:
        if enc == QuantizationPlan.kind:
            return QuantizationPlan(**{k: meta[k] for k in ("bits", "modulus_bits", "clip", "scale")})
        if enc == SkellamPlan.kind:
            return SkellamPlan(**{k: meta[k] for k in ("clip_norm", "gamma", "bound", "variance", "modulus_bits", "noise")})
    except (KeyError, ConfigError, TypeError) as exc:
        raise ProtocolError(f"bad encoding plan: {exc}") from None
    raise ProtocolError(f"unknown encoding {enc!r}")
