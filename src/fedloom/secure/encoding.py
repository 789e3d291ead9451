"""Real vectors to integers mod 2^k and back: range clipping and stochastic quantization.

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

from dataclasses import dataclass

import numpy as np
import torch

from fedloom.core.errors import ConfigError

__all__ = ["QuantizationPlan"]


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

    def quantize(self, x: torch.Tensor, generator: torch.Generator) -> np.ndarray:
        """Clip ``x / scale`` (1-D) and stochastically round it to uint32 levels in [0, L − 1]."""
        c = float(self.clip)
        v = (x.detach().to(torch.float64).cpu() / float(self.scale)).clamp(-c, c)
        u = torch.rand(v.shape, generator=generator, dtype=torch.float64)
        q = torch.floor((v + c) / self.step + u).clamp_(0, self.levels - 1)
        return q.to(torch.int64).numpy().astype(np.uint32)

    def decode_sum(self, total: np.ndarray, n: int) -> torch.Tensor:
        """Σ x_i (float64) from the unmasked sum of ``n`` clients' levels (uint32, reduced mod 2^k)."""
        return (torch.from_numpy(total.astype(np.float64)) * self.step - n * float(self.clip)) * float(self.scale)

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
