"""Casting codecs: the trainable entries as float16 or bfloat16 (2 bytes instead of 4).

float16 keeps 11 significant bits over a narrow range (overflow past 65504 becomes Inf, which
the server rejects as it does any non-finite update); bfloat16 keeps float32's range with 8
significant bits. Deterministic, biased by rounding to nearest only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from fedloom.compress.base import EncodingStage, check_finite

__all__ = ["BFloat16", "Float16"]

VALUES = "values"


class _Cast(EncodingStage):
    target: ClassVar[torch.dtype]

    def _layout(self, p: int, dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {VALUES: (self.target, (p,))}

    def _encode(self, rows, seeds, states):  # type: ignore[no-untyped-def]
        cast = rows.to(self.target)
        return [{VALUES: cast[i].clone()} for i in range(rows.shape[0])]

    def _decode(self, tensors: Mapping[str, torch.Tensor], p: int, dtype: torch.dtype) -> torch.Tensor:
        out = tensors[VALUES].to(dtype)
        check_finite(out, VALUES)
        return out


@dataclass(frozen=True)
class Float16(_Cast):
    """Trainable entries as IEEE float16."""

    name: ClassVar[str] = "fp16"
    target: ClassVar[torch.dtype] = torch.float16


@dataclass(frozen=True)
class BFloat16(_Cast):
    """Trainable entries as bfloat16."""

    name: ClassVar[str] = "bf16"
    target: ClassVar[torch.dtype] = torch.bfloat16
