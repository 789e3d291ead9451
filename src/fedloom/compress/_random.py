"""Counter-based uniform random numbers: row i, column j is a hash of (seed_i, j).

A stochastic stage must draw the same numbers for a client whether it runs alone (sequential
engine, deployed agent) or as one row of a chunk (vectorized engine), without a Python loop
over clients. A counter-based generator gives exactly that: ``uniform(seeds, n)[i, j]``
depends only on ``seeds[i]`` and ``j``. The hash is Wellons' ``lowbias32`` (two rounds,
keyed by the seed), computed in int64 arithmetic that never overflows; the output has 24
random bits, exactly representable in float32. For stochastic rounding, not cryptography.
"""

from __future__ import annotations

import torch

__all__ = ["uniform"]

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x < 2**32, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(seeds: list[int], n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """A (len(seeds), n) float32 tensor of uniforms in [0, 1), row i a function of seeds[i] only."""
    s = torch.tensor([[seed & _M32, (seed >> 32) & _M32] for seed in seeds], dtype=torch.int64, device=device)
    k_lo = _hash32(s[:, :1] ^ 0x9E3779B9)
    k_hi = _hash32(s[:, 1:] ^ 0x85EBCA6B)
    j = torch.arange(n, dtype=torch.int64, device=device).unsqueeze(0)
    x = _hash32(_hash32(j ^ k_lo) ^ k_hi)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))
