"""A model's state as ONE contiguous float vector plus the spec to go back.

:class:`ParamSpec` records, for every entry of a ``state_dict``, its name, shape, dtype,
offset in the flat vector and whether it is a trainable parameter or a buffer. Aggregation,
clipping, compression and masking then work on a single tensor.

Exactness: float16, bfloat16 and float32 entries round-trip exactly through a float32
vector; float64 entries make the spec choose a float64 vector. Integer and bool buffers
(BatchNorm's ``num_batches_tracked``) are stored as float values and rounded back; a value
that the vector's dtype cannot hold exactly (above 2**24 in float32) raises
:class:`~fedloom.core.errors.SpecError` instead of being silently altered.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedloom.core.errors import SpecError

__all__ = ["ParamSpec", "TensorEntry", "dtype_from_name", "dtype_name"]

_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# Largest integer magnitude a float dtype represents exactly (every integer up to it).
_EXACT_INT = {torch.float32: 2**24, torch.float64: 2**53}


def dtype_name(dtype: torch.dtype) -> str:
    """Stable string name of a supported torch dtype (``torch.float32`` -> ``"float32"``)."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise SpecError(f"unsupported dtype {dtype}") from None


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise SpecError(f"unknown dtype name {name!r}") from None


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a state_dict: where it lives in the flat vector and what it was."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    numel: int
    trainable: bool

    @property
    def stop(self) -> int:
        return self.offset + self.numel

    @property
    def is_float(self) -> bool:
        return dtype_from_name(self.dtype).is_floating_point


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes, dtypes and offsets of a flattened state_dict.

    Build one with :meth:`from_module` or :meth:`from_state_dict`; then :meth:`flatten`
    and :meth:`unflatten` convert between a ``state_dict`` and the flat vector.
    """

    entries: tuple[TensorEntry, ...]
    vector_dtype: str = "float32"

    # ------------------------------------------------------------------ building
    @classmethod
    def from_module(cls, module: nn.Module, *, vector_dtype: torch.dtype | None = None) -> ParamSpec:
        """Spec of ``module.state_dict()``; parameters with ``requires_grad`` are trainable."""
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        return cls.from_state_dict(module.state_dict(), trainable=trainable, vector_dtype=vector_dtype)

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, torch.Tensor],
        *,
        trainable: Iterable[str] | None = None,
        vector_dtype: torch.dtype | None = None,
    ) -> ParamSpec:
        """Spec of a state_dict. ``trainable`` names the trainable entries (default: all float ones)."""
        train_set = set(trainable) if trainable is not None else None
        entries: list[TensorEntry] = []
        offset = 0
        has_f64 = False
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise SpecError(f"state entry {name!r} is not a tensor but {type(t).__name__}")
            dname = dtype_name(t.dtype)
            has_f64 |= t.dtype == torch.float64
            is_train = (name in train_set) if train_set is not None else t.dtype.is_floating_point
            entries.append(TensorEntry(name, tuple(t.shape), dname, offset, t.numel(), is_train))
            offset += t.numel()
        if vector_dtype is None:
            vector_dtype = torch.float64 if has_f64 else torch.float32
        if vector_dtype not in _EXACT_INT:
            raise SpecError(f"vector dtype must be float32 or float64, not {vector_dtype}")
        return cls(tuple(entries), dtype_name(vector_dtype))

    # ---------------------------------------------------------------- properties
    @property
    def numel(self) -> int:
        """Length of the flat vector."""
        return self.entries[-1].stop if self.entries else 0

    @property
    def dtype(self) -> torch.dtype:
        """The flat vector's dtype."""
        return dtype_from_name(self.vector_dtype)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    def entry(self, name: str) -> TensorEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise SpecError(f"no entry named {name!r} in spec")

    def trainable_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Boolean vector, True where the flat vector holds a trainable parameter."""
        mask = torch.zeros(self.numel, dtype=torch.bool, device=device)
        for e in self.entries:
            if e.trainable:
                mask[e.offset : e.stop] = True
        return mask

    def trainable_slices(self) -> list[slice]:
        """Contiguous slices of the flat vector that hold trainable parameters (merged)."""
        out: list[slice] = []
        for e in self.entries:
            if not e.trainable or e.numel == 0:
                continue
            if out and out[-1].stop == e.offset:
                out[-1] = slice(out[-1].start, e.stop)
            else:
                out.append(slice(e.offset, e.stop))
        return out

    # ------------------------------------------------------------- conversions
    def empty(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.zeros(self.numel, dtype=self.dtype, device=device)

    def flatten(self, state: Mapping[str, torch.Tensor], *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The flat vector of ``state``, which must hold exactly this spec's entries."""
        if len(state) != len(self.entries):
            missing = set(self.names) - set(state)
            extra = set(state) - set(self.names)
            raise SpecError(f"state_dict does not match spec: missing {sorted(missing)}, unexpected {sorted(extra)}")
        first = next(iter(state.values()), None)
        device = first.device if first is not None else None
        vec = out if out is not None else torch.empty(self.numel, dtype=self.dtype, device=device)
        if vec.shape != (self.numel,) or vec.dtype != self.dtype:
            raise SpecError(f"output vector must have shape ({self.numel},) and dtype {self.dtype}")
        limit = _EXACT_INT[self.dtype]
        for e in self.entries:
            try:
                t = state[e.name]
            except KeyError:
                raise SpecError(f"state_dict lacks entry {e.name!r}") from None
            if tuple(t.shape) != e.shape:
                raise SpecError(f"entry {e.name!r} has shape {tuple(t.shape)}, spec says {e.shape}")
            if dtype_name(t.dtype) != e.dtype:
                raise SpecError(f"entry {e.name!r} has dtype {dtype_name(t.dtype)}, spec says {e.dtype}")
            if not e.is_float and t.numel() and t.dtype != torch.bool and int(t.abs().max()) > limit:
                raise SpecError(
                    f"integer entry {e.name!r} holds {int(t.abs().max())}, beyond what a "
                    f"{self.vector_dtype} vector stores exactly ({limit}); use vector_dtype=float64"
                )
            vec[e.offset : e.stop].copy_(t.detach().reshape(-1))
        return vec

    def unflatten(self, vec: torch.Tensor, *, copy: bool = True) -> dict[str, torch.Tensor]:
        """The state_dict held by ``vec``, each entry in its original dtype and shape.

        With ``copy=False`` float entries of the vector's own dtype are views into ``vec``.
        """
        self.check_vector(vec)
        out: dict[str, torch.Tensor] = {}
        for e in self.entries:
            part = vec[e.offset : e.stop].view(e.shape)
            dt = dtype_from_name(e.dtype)
            if not dt.is_floating_point:
                part = part.round().to(dt) if dt != torch.bool else part != 0
            elif dt != vec.dtype or copy:
                part = part.to(dt, copy=True)
            out[e.name] = part
        return out

    def check_vector(self, vec: torch.Tensor) -> None:
        """Raise :class:`SpecError` unless ``vec`` is a 1-D vector of this spec's length."""
        if not isinstance(vec, torch.Tensor):
            raise SpecError(f"expected a tensor, got {type(vec).__name__}")
        if vec.dim() != 1 or vec.numel() != self.numel:
            raise SpecError(f"vector has shape {tuple(vec.shape)}, spec expects ({self.numel},)")
        if not vec.dtype.is_floating_point:
            raise SpecError(f"vector has dtype {vec.dtype}, expected a float dtype")

    def load_into(self, module: nn.Module, vec: torch.Tensor) -> None:
        """Copy the vector's values into ``module`` in place (strict)."""
        module.load_state_dict(self.unflatten(vec, copy=False), strict=True)

    def module_vector(self, module: nn.Module) -> torch.Tensor:
        """Flat vector of a module's current state."""
        return self.flatten(module.state_dict())

    # ----------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "vector_dtype": self.vector_dtype,
            "entries": [
                {"name": e.name, "shape": list(e.shape), "dtype": e.dtype, "trainable": e.trainable}
                for e in self.entries
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParamSpec:
        try:
            entries: list[TensorEntry] = []
            offset = 0
            for raw in data["entries"]:
                shape = tuple(int(s) for s in raw["shape"])
                numel = 1
                for s in shape:
                    numel *= s
                dtype_from_name(raw["dtype"])
                entries.append(TensorEntry(str(raw["name"]), shape, raw["dtype"], offset, numel, bool(raw["trainable"])))
                offset += numel
            vdt = str(data["vector_dtype"])
            if dtype_from_name(vdt) not in _EXACT_INT:
                raise SpecError(f"bad vector dtype {vdt!r}")
            return cls(tuple(entries), vdt)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(f"malformed spec: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ParamSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SpecError(f"malformed spec JSON: {exc}") from exc
