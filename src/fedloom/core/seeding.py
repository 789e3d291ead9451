"""Deterministic seed derivation: one run seed -> independent, stable per-(round, client) seeds.

Seeds are derived with BLAKE2b, so they never depend on Python's salted ``hash`` and are
identical across processes and machines (needed for resumable, reproducible runs).
"""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part, e.g. ``derive_seed(run_seed, "train", rnd, cid)``."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "little") >> 1
