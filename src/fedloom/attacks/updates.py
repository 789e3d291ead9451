"""Model-poisoning attacks: what malicious clients send instead of their honest delta.

Each works on the attackers' unweighted trainable deltas (:class:`~fedloom.attacks.base.Attack`):

* ``sign_flip`` — send −Δ (the reversed-gradient attack of Damaskinos et al. 2018, among
  others); ``scale`` — send λ·Δ (λ = 10 by default; the boosting of Bhagoji et al. 2019).
* ``gaussian`` — send a vector of N(0, σ²) entries (the Gaussian Byzantine client of
  Blanchard et al. 2017).
* ``inflate`` — declare λ times the true example count (an authenticated client may register
  any count and so dominate an example-weighted mean) and send ``delta_scale``·Δ (−1 by
  default: the inflated weight carries a flipped update).
* ``alie`` — "a little is enough" (Baruch, Baruch, Goldberg. NeurIPS 2019): every attacker
  sends μ − z·σ, the benign updates' per-coordinate mean and standard deviation, with z the
  largest shift that still leaves the attackers inside the majority a median or Krum trusts:
  s = ⌊n/2 + 1⌋ − f, z = Φ⁻¹((n − s)/n) for n updates of which f are malicious (or ``z``).
* ``ipm`` — inner-product manipulation (Xie, Koyejo, Gupta. "Fall of Empires." UAI 2020): every
  attacker sends −ε·μ, so the aggregate's inner product with the true mean turns negative.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

from fedloom.attacks.base import Attack
from fedloom.core.errors import ConfigError

__all__ = ["ALIE", "GaussianNoise", "Inflate", "InnerProduct", "Scale", "SignFlip", "alie_z"]


def _real(value: object, key: str, *, low: float | None = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        raise ConfigError(f"must be a finite number, got {value!r}", key=key)
    x = float(value)
    if positive and not x > 0.0:
        raise ConfigError(f"must be > 0, got {value!r}", key=key)
    if low is not None and x < low:
        raise ConfigError(f"must be >= {low}, got {value!r}", key=key)
    return x


@dataclass(frozen=True)
class SignFlip(Attack):
    """Send −Δ."""

    name = "sign_flip"

    def craft(self, own, benign, *, n, gen):  # type: ignore[no-untyped-def]
        return -own


@dataclass(frozen=True)
class Scale(Attack):
    """Send ``factor``·Δ (×10 by default)."""

    name = "scale"

    factor: float = 10.0

    def __post_init__(self) -> None:
        _real(self.factor, "factor")

    def craft(self, own, benign, *, n, gen):  # type: ignore[no-untyped-def]
        return own * self.factor


@dataclass(frozen=True)
class GaussianNoise(Attack):
    """Send N(0, ``sigma``²) in every trainable entry instead of the delta."""

    name = "gaussian"

    sigma: float = 1.0

    def __post_init__(self) -> None:
        _real(self.sigma, "sigma", positive=True)

    def craft(self, own, benign, *, n, gen):  # type: ignore[no-untyped-def]
        return torch.randn(own.shape, generator=gen, dtype=torch.float64) * self.sigma


@dataclass(frozen=True)
class Inflate(Attack):
    """Declare ``factor`` × the true example count and send ``delta_scale``·Δ."""

    name = "inflate"

    factor: float = 100.0
    delta_scale: float = -1.0

    def __post_init__(self) -> None:
        _real(self.factor, "factor", low=1.0)
        _real(self.delta_scale, "delta_scale")

    def examples(self, num_examples: int) -> int:
        return math.floor(num_examples * self.factor)

    def craft(self, own, benign, *, n, gen):  # type: ignore[no-untyped-def]
        return own * self.delta_scale


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s z_max for ``n`` updates of which ``f`` are malicious (0 if they cannot shift)."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if p <= 0.5:
        return 0.0
    return NormalDist().inv_cdf(min(p, 1.0 - 1e-12))


@dataclass(frozen=True)
class ALIE(Attack):
    """"A little is enough": every attacker sends μ − z·σ of the benign updates (Baruch et al. 2019)."""

    name = "alie"
    collusive = True

    z: float | None = None

    def __post_init__(self) -> None:
        if self.z is not None:
            _real(self.z, "z")

    def craft(self, own, benign, *, n, gen):  # type: ignore[no-untyped-def]
        if benign is None:  # nothing to hide among: send the honest updates
            return own
        z = alie_z(n, own.shape[0]) if self.z is None else self.z
        return (benign[0] - z * benign[1]).expand_as(own).clone()


@dataclass(frozen=True)
class InnerProduct(Attack):
    """Inner-product manipulation: every attacker sends −ε·μ of the benign updates (Xie et al. 2020)."""

    name = "ipm"
    collusive = True

    epsilon: float = 0.5

    def __post_init__(self) -> None:
        _real(self.epsilon, "epsilon", positive=True)

    def craft(self, own, benign, *, n, gen):  # type: ignore[no-untyped-def]
        if benign is None:
            return own
        return (-self.epsilon * benign[0]).expand_as(own).clone()
