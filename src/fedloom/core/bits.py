"""Packing b-bit codes (b in 1, 2, 4, 8) into bytes, row by row, and back (codecs, pruning masks)."""

from __future__ import annotations

import torch

__all__ = ["pack", "packed_len", "unpack"]


def packed_len(n: int, bits: int) -> int:
    """Bytes holding n codes of ``bits`` bits."""
    per = 8 // bits
    return -(-n // per)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(k, n) integer codes < 2**bits -> (k, packed_len(n, bits)) uint8, low bits first."""
    k, n = codes.shape
    c = codes.to(torch.uint8)
    if bits == 8:
        return c.contiguous()
    per = 8 // bits
    pad = packed_len(n, bits) * per - n
    if pad:
        c = torch.cat([c, c.new_zeros(k, pad)], dim=1)
    c = c.view(k, -1, per)
    out = c[:, :, 0].clone()
    for j in range(1, per):
        out |= c[:, :, j] << (bits * j)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack` for one row: (packed_len,) uint8 -> (n,) int64 codes."""
    if bits == 8:
        return packed.to(torch.int64)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(1) >> shifts) & mask
    return codes.reshape(-1)[:n].to(torch.int64)
