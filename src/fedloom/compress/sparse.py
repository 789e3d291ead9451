"""Lossless sparse codec: only the nonzero trainable entries travel, with a bitmap of where they are.

For a pruned model (:mod:`fedloom.cutting.magnitude`) the pruned weights are exactly zero in
the global model and in every client's delta, so sending them is waste. ``sparse`` sends a
bitmap of the nonzero trainable entries (1 bit each, packed low bit first) and their values
in the vector's dtype: ``P/8 + 4·nnz`` bytes for P float32 entries instead of ``4·P`` (at 90 %
sparsity 0.525 bytes per entry, 7.6x fewer). Exact: the decoded vector equals the encoded
one bit for bit. Also a broadcast codec (the pruned global model sent down).

The server checks the bitmap's length, that the number of values equals the number of set
bits (at most P), that no padding bit is set, and that the values are finite, before it
scatters them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedloom.core.bits import pack, packed_len, unpack
from fedloom.compress.base import EncodingStage, check_finite
from fedloom.core.errors import InvalidUpdateError

__all__ = ["Sparse"]

BITMAP, VALUES = "bitmap", "values"


@dataclass(frozen=True)
class Sparse(EncodingStage):
    """Send the nonzero trainable entries and a bitmap of their positions (exact)."""

    name: ClassVar[str] = "sparse"
    variable: ClassVar[frozenset[str]] = frozenset({VALUES})

    def _layout(self, p: int, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {BITMAP: (torch.uint8, (packed_len(p, 1),)), VALUES: (dtype, (p,))}  # VALUES: up to p, checked in _decode

    def _encode(self, rows, seeds, states):  # type: ignore[no-untyped-def]
        nonzero = rows != 0
        bitmaps = pack(nonzero.to(torch.uint8), 1)
        return [{BITMAP: bitmaps[i].clone(), VALUES: rows[i][nonzero[i]].clone()} for i in range(rows.shape[0])]

    def _decode(self, tensors: Mapping[str, torch.Tensor], p: int, dtype: torch.dtype) -> torch.Tensor:
        bitmap, vals = tensors[BITMAP], tensors[VALUES]
        bits = unpack(bitmap, 1, packed_len(p, 1) * 8)
        if bool(bits[p:].any()):
            raise InvalidUpdateError(f"{BITMAP} sets bits past the {p} trainable entries")
        where = bits[:p].bool()
        n = int(where.sum())
        if vals.numel() != n:
            raise InvalidUpdateError(f"{VALUES} holds {vals.numel()} entries but {BITMAP} sets {n} bits")
        check_finite(vals, VALUES)
        out = torch.zeros(p, dtype=dtype)
        out[where] = vals.to(dtype)
        return out
