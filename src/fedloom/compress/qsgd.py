"""QSGD: unbiased stochastic quantization to 8, 4 or 2 bits.

Alistarh, Grubic, Li, Tomioka, Vojnovic. "QSGD: Communication-Efficient SGD via Gradient
Quantization and Encoding." NeurIPS 2017.

The trainable part of the delta is cut into buckets of ``bucket`` entries (the paper's
bucketing, d = 512 by default). With s = 2^(b−1) − 1 levels per sign (127, 7, 1 for
b = 8, 4, 2) and a bucket's scale m = max_j |v_j| (the ∞-norm variant of the paper's
scaling, which wastes no levels on small buckets), each entry becomes

    Q(v_j) = m · sign(v_j) · ℓ_j / s,   ℓ_j = ⌊s|v_j|/m⌋ + Bernoulli(s|v_j|/m − ⌊s|v_j|/m⌋),

so E[Q(v_j)] = v_j (unbiased) and Var ≤ m²/(4s²). The signed level ℓ_j·sign(v_j) + s
(0..2s) is packed in b bits, so a payload is P·b/8 bytes of codes plus 4 bytes per bucket
of scales. The Bernoulli draws come from a counter-based hash of the client's round seed
(:mod:`fedloom.compress._random`), the same alone or in a vectorized chunk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from fedloom.core.bits import pack, packed_len, unpack
from fedloom.compress._random import uniform
from fedloom.compress.base import EncodingStage, check_finite
from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.core.seeding import derive_seed
from fedloom.core.types import JSONScalar

__all__ = ["QSGD"]

CODES, SCALES = "codes", "scales"


@dataclass(frozen=True)
class QSGD(EncodingStage):
    """Stochastic quantization to ``bits`` (8, 4 or 2) per entry, one float32 scale per ``bucket``."""

    name: ClassVar[str] = "qsgd"
    bits: int = 8
    bucket: int = 512

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (2, 4, 8):
            raise ConfigError(f"must be 2, 4 or 8, got {self.bits!r}", key="bits")
        if isinstance(self.bucket, bool) or not isinstance(self.bucket, int) or self.bucket < 1:
            raise ConfigError(f"must be an integer >= 1, got {self.bucket!r}", key="bucket")

    @property
    def levels(self) -> int:
        """s, the number of levels per sign."""
        return 2 ** (self.bits - 1) - 1

    def _meta(self, p: int) -> dict[str, JSONScalar]:
        return {"bits": self.bits, "bucket": self.bucket}

    def _layout(self, p: int, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {CODES: (torch.uint8, (packed_len(p, self.bits),)), SCALES: (torch.float32, (math.ceil(p / self.bucket),))}

    def _encode(self, rows, seeds, states):  # type: ignore[no-untyped-def]
        k, p = rows.shape
        s, d = self.levels, self.bucket
        nb = math.ceil(p / d)
        v = F.pad(rows.to(torch.float32), (0, nb * d - p)).view(k, nb, d)
        scale = v.abs().amax(dim=2)
        x = v.abs() / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(2) * s
        low = x.floor()
        u = uniform([derive_seed(seed, self.name) for seed in seeds], nb * d, rows.device).view(k, nb, d)
        level = (low + (u < (x - low)).to(low.dtype)).clamp_(0, s)
        codes = torch.where(v < 0, s - level, s + level).view(k, -1)[:, :p]
        packed = pack(codes, self.bits)
        return [{CODES: packed[i].clone(), SCALES: scale[i].clone()} for i in range(k)]

    def _decode(self, tensors: Mapping[str, torch.Tensor], p: int, dtype: torch.dtype) -> torch.Tensor:
        s, d = self.levels, self.bucket
        scales = tensors[SCALES]
        check_finite(scales, SCALES)
        if bool((scales < 0).any()):
            raise InvalidUpdateError(f"{SCALES} has negative entries")
        codes = unpack(tensors[CODES], self.bits, p)
        if bool((codes > 2 * s).any()):
            raise InvalidUpdateError(f"{CODES} holds a level beyond ±{s}")
        per_entry = scales.to(torch.float64).repeat_interleave(d)[:p]
        return ((codes - s).to(torch.float64) * per_entry / s).to(dtype)
