"""Top-k sparsification with error feedback.

Stich, Cordonnier, Jaggi. "Sparsified SGD with Memory." NeurIPS 2018; Karimireddy, Rebjock,
Stich, Jaggi. "Error Feedback Fixes SignSGD and other Gradient Compression Schemes." ICML 2019.

Each client adds its residual e (what it did not send before) to the trainable part of its
delta, a = Δ + e, sends the k = ⌈fraction · P⌉ entries of a largest in magnitude (indices as
int32, ascending, and their float values: 8 bytes per entry) and keeps e ← a − top_k(a) as
client state (``"topk.residual"``), carried across rounds and checkpoints. With
``error_feedback = false`` the rest is simply dropped. Biased; the model never sees an entry
twice. The server checks that the indices are strictly increasing and in range before it
scatters them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedloom.compress.base import EncodingStage, check_finite
from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.core.types import JSONScalar

__all__ = ["TopK"]

INDICES, VALUES = "indices", "values"


@dataclass(frozen=True)
class TopK(EncodingStage):
    """Send the ⌈fraction · P⌉ largest-magnitude trainable entries; keep the rest as a residual."""

    name: ClassVar[str] = "topk"
    supports_broadcast: ClassVar[bool] = False
    fraction: float = 0.01
    error_feedback: bool = True

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 < f <= 1.0):
            raise ConfigError(f"must be in (0, 1], got {f!r}", key="fraction")
        if not isinstance(self.error_feedback, bool):
            raise ConfigError(f"must be true or false, got {self.error_feedback!r}", key="error_feedback")

    def k_of(self, p: int) -> int:
        return min(p, max(1, math.ceil(self.fraction * p)))

    def _meta(self, p: int) -> dict[str, JSONScalar]:
        return {"k": self.k_of(p)}

    def _layout(self, p: int, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        k = self.k_of(p)
        return {INDICES: (torch.int32, (k,)), VALUES: (dtype, (k,))}

    def _encode(self, rows, seeds, states):  # type: ignore[no-untyped-def]
        n, p = rows.shape
        key = self.state_key("residual")
        acc = rows.clone()
        if self.error_feedback and states is not None:
            for i, st in enumerate(states):
                res = st.get(key)
                if res is not None:
                    if tuple(res.shape) != (p,):
                        raise ConfigError(f"client state {key!r} has shape {tuple(res.shape)}, expected ({p},)")
                    acc[i] += res.to(acc.device, acc.dtype)
        k = self.k_of(p)
        idx = acc.abs().topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        vals = acc.gather(1, idx)
        if self.error_feedback and states is not None:
            acc.scatter_(1, idx, 0.0)
            for i, st in enumerate(states):
                st[key] = acc[i].clone()
        idx32 = idx.to(torch.int32)
        return [{INDICES: idx32[i].clone(), VALUES: vals[i].clone()} for i in range(n)]

    def _decode(self, tensors: Mapping[str, torch.Tensor], p: int, dtype: torch.dtype) -> torch.Tensor:
        idx = tensors[INDICES].to(torch.int64)
        vals = tensors[VALUES]
        check_finite(vals, VALUES)
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= p):
            raise InvalidUpdateError(f"{INDICES} out of range [0, {p})")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise InvalidUpdateError(f"{INDICES} are not strictly increasing")
        out = torch.zeros(p, dtype=dtype)
        out[idx] = vals.to(dtype)
        return out
