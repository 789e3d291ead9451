"""What the privacy stages share: L2 clipping of a batch of updates, Gaussian noise, checks.

:func:`clip_rows` clips each row of a ``(k, numel)`` matrix to L2 norm ≤ C over the model's
trainable entries in one batched operation (the norms are computed in float64) and zeroes the
other entries (frozen parameters do not move; models with buffers are refused before a run,
since their statistics would leave unclipped). :func:`gaussian` draws the noise: from a
generator seeded by a known seed (``noise = "seeded"``: reproducible, for simulation) or by 63
bits of OS entropy (``noise = "os"``: what a deployment needs, since anyone who knows a seed
can subtract the noise). Torch's generator is a Mersenne twister, not a cryptographic
generator, and floating-point attacks on the Gaussian sampler (Mironov 2012) are not
addressed here; both are written in the README's privacy section.
"""

from __future__ import annotations

import math
import secrets
from typing import Literal

import torch

from fedloom.core.errors import ConfigError
from fedloom.core.types import ClientUpdate

__all__ = [
    "CLIP_TOLERANCE",
    "NoiseSource",
    "check_positive",
    "clip_rows",
    "gaussian",
    "stripped",
    "trainable_norm",
]

NoiseSource = Literal["seeded", "os"]
CLIP_TOLERANCE = 1e-5
"""Relative slack of the server's norm check: float32 rounding of a clipped update, no more."""


def check_positive(value: object, key: str, *, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (≥ 0 with ``allow_zero``), else a ConfigError naming ``key``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    if ok:
        ok = float(value) >= 0.0 if allow_zero else float(value) > 0.0  # type: ignore[arg-type]
    if not ok:
        raise ConfigError(f"must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}", key=key)
    return float(value)  # type: ignore[arg-type]


def check_noise_source(value: object, key: str = "privacy.noise") -> None:
    if value not in ("seeded", "os"):
        raise ConfigError(f"must be 'seeded' or 'os', got {value!r}", key=key)


def clip_rows(deltas: torch.Tensor, mask: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``deltas`` scaled to L2 norm ≤ ``clip_norm`` on ``mask``, zero elsewhere; and the norms before.

    One batched operation for k rows: factor_i = min(1, C / ||Δ_i||) (a zero row stays zero).
    """
    masked = torch.where(mask.to(deltas.device), deltas, torch.zeros((), dtype=deltas.dtype, device=deltas.device))
    norms = masked.to(torch.float64).norm(dim=1)
    factor = torch.clamp(clip_norm / torch.clamp(norms, min=1e-300), max=1.0)
    return masked * factor.to(deltas.dtype).unsqueeze(1), norms


def trainable_norm(delta: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(L2 norm on the trainable entries, max |value| elsewhere) of one update, in float64."""
    d = delta.to(torch.float64)
    m = mask.to(d.device)
    inside = float(d[m].norm()) if bool(m.any()) else 0.0
    outside = float(d[~m].abs().max()) if bool((~m).any()) else 0.0
    return inside, outside


def gaussian(shape: tuple[int, ...], std: float, *, source: NoiseSource, seed: int | None, dtype: torch.dtype) -> torch.Tensor:
    """N(0, std²) noise of ``shape``: from ``seed`` (``seeded``) or from OS entropy (``os``)."""
    gen = torch.Generator()
    if source == "os" or seed is None:
        gen.manual_seed(secrets.randbits(63))
    else:
        gen.manual_seed(seed % (2**63))
    return torch.randn(shape, generator=gen, dtype=torch.float64).mul_(std).to(dtype)


def stripped(update: ClientUpdate) -> ClientUpdate:
    """``update`` without its training metrics (they are not noised, so they do not leave under DP)."""
    from dataclasses import replace

    return replace(update, metrics={}) if update.metrics else update
