"""Shamir t-of-n secret sharing over the prime field GF(2^521 − 1).

Shamir, "How to share a secret", CACM 1979. A secret s (here a 32-byte key, an integer
below 2^256) is the constant term of a random polynomial f of degree t − 1 over GF(p); the
share of participant x (x = 1, 2, ..., never 0) is (x, f(x)). Any t shares give s by
Lagrange interpolation at 0; fewer reveal nothing about s. p = 2^521 − 1 is a Mersenne prime,
so any 32-byte secret fits in one field element and a share is 66 bytes.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Mapping

from fedloom.core.errors import ProtocolError

__all__ = ["PRIME", "SHARE_BYTES", "reconstruct", "share_from_bytes", "share_to_bytes", "split"]

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: bytes, xs: list[int], threshold: int) -> dict[int, int]:
    """Shares of ``secret`` for the points ``xs`` (distinct, in [1, p)); any ``threshold`` recover it."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and in [1, p)")
    s = int.from_bytes(secret, "big")
    if s >= PRIME:
        raise ValueError("secret too large for the field")
    coeffs = [s] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):  # Horner
            acc = (acc * x + c) % PRIME
        out[x] = acc
    return out


def reconstruct(shares: Mapping[int, int], threshold: int, *, length: int = 32) -> bytes:
    """The secret from at least ``threshold`` shares ``{x: f(x)}`` (the first ``threshold`` by x are used)."""
    if len(shares) < threshold:
        raise ProtocolError(f"{len(shares)} shares < threshold {threshold}: the secret cannot be recovered")
    pts = sorted(shares.items())[:threshold]
    coeffs = _lagrange_at_zero(tuple(x for x, _ in pts))
    secret = sum(y * c for (_, y), c in zip(pts, coeffs, strict=True)) % PRIME
    if secret >= 1 << (8 * length):
        raise ProtocolError("the shares do not interpolate to a valid secret (a corrupted share?)")
    return secret.to_bytes(length, "big")


@functools.lru_cache(maxsize=64)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """λ_i = Π_{j≠i} x_j / (x_j − x_i) mod p: f(0) = Σ λ_i f(x_i) for any f of degree < len(xs).

    O(t²) once per set of share points; a server recovering many secrets from the same
    survivors (SecAgg's unmasking: one per client) reuses them, so each secret costs O(t).
    """
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def share_to_bytes(value: int) -> bytes:
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ProtocolError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    v = int.from_bytes(data, "big")
    if v >= PRIME:
        raise ProtocolError("share value outside the field")
    return v
