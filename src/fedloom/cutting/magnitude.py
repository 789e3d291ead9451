"""Magnitude pruning of the global model during training (Zhu & Gupta 2017).

Zhu, Gupta. "To prune, or not to prune: exploring the efficacy of pruning for model
compression." ICLR workshop 2018 (arXiv:1710.01878). Their gradual schedule raises the
sparsity from s_i = 0 to the final s_f over rounds ``start`` .. ``end``, every ``every`` rounds::

    s_t = s_f + (s_i − s_f) · (1 − (t − start) / (end − start))³

pruning fast while the network is redundant and slowly as it approaches s_f. After each
pruning round's aggregate is applied, the server sets the ⌊s_t · n⌋ smallest-magnitude
prunable weights to exactly zero — over all prunable tensors at once (``scope = "global"``) or
in each tensor separately (``"layer"``). Prunable: trainable tensors of two or more dimensions
(Linear and Conv weights); biases and normalization parameters stay dense unless
``include_bias``. A pruned weight stays pruned (the mask only grows).

The mask is server state (checkpointed with the model) and travels to the clients in the
instruction (:data:`~fedloom.core.keys.PRUNE_MASK`, 1 bit per entry of the flat vector, packed);
the gradient transform :class:`~fedloom.client.transforms.PruneMask` zeroes the pruned
weights' gradients and keeps the weights at exactly zero after every optimizer step, in
every engine. The server re-applies the mask after every apply, so no client (honest with
local DP noise, or hostile) can revive a pruned weight. The pipeline then sends only the
nonzero entries (:class:`~fedloom.compress.sparse.Sparse`) both ways unless another codec is
configured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch

from fedloom.core.bits import pack
from fedloom.core.errors import ConfigError
from fedloom.core.keys import PRUNE, PRUNE_MASK
from fedloom.core.params import ParamSpec
from fedloom.core.types import ComponentSpec

if TYPE_CHECKING:
    from fedloom.strategies.base import ServerState

__all__ = ["MASK_STATE", "MagnitudePruner", "pack_mask", "sparsity_at"]

MASK_STATE = "pruning.keep"
"""ServerState tensor: bool (numel,), True where a weight is kept."""


def sparsity_at(rnd: int, *, final: float, start: int, end: int, every: int) -> float:
    """Zhu & Gupta's target sparsity after round ``rnd`` (0 before ``start``, ``final`` from ``end``).

    Between the two it changes only on rounds ``start + j·every`` (and at ``end``).
    """
    if rnd < start:
        return 0.0
    if rnd >= end or end == start:
        return final
    t = start + ((rnd - start) // every) * every
    return final * (1.0 - (1.0 - (t - start) / (end - start)) ** 3)


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A bool (n,) mask as uint8 bits, low bit first (:func:`fedloom.core.bits.pack`)."""
    return pack(keep.reshape(1, -1).to(torch.uint8), 1)[0].clone()


@dataclass(frozen=True)
class MagnitudePruner:
    """Gradual magnitude pruning to ``sparsity`` over rounds ``start``..``end`` (see module docstring)."""

    sparsity: float
    start: int = 1
    end: int = 1
    every: int = 1
    scope: Literal["global", "layer"] = "global"
    include_bias: bool = False

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 <= s < 1.0):
            raise ConfigError(f"must be in [0, 1), got {s!r}", key="pruning.sparsity")
        for key in ("start", "end", "every"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"must be an integer >= 1, got {v!r}", key=f"pruning.{key}")
        if self.end < self.start:
            raise ConfigError(f"must be >= pruning.start ({self.start}), got {self.end}", key="pruning.end")
        if self.scope not in ("global", "layer"):
            raise ConfigError(f"must be 'global' or 'layer', got {self.scope!r}", key="pruning.scope")

    # ------------------------------------------------------------------ layout
    def prunable(self, spec: ParamSpec) -> torch.Tensor:
        """Bool (numel,): the entries this pruner may zero."""
        out = torch.zeros(spec.numel, dtype=torch.bool)
        for e in spec.entries:
            if e.trainable and (len(e.shape) >= 2 or self.include_bias):
                out[e.offset : e.stop] = True
        if not bool(out.any()):
            raise ConfigError("the model has no prunable tensor (no trainable tensor of 2+ dimensions)", key="pruning")
        return out

    def target(self, rnd: int) -> float:
        return sparsity_at(rnd, final=float(self.sparsity), start=self.start, end=self.end, every=self.every)

    # ------------------------------------------------------------------ rounds
    def keep_mask(self, state: ServerState, spec: ParamSpec) -> torch.Tensor:
        """The current keep-mask (all True before the first pruning round)."""
        keep = state.tensors.get(MASK_STATE)
        if keep is None:
            return torch.ones(spec.numel, dtype=torch.bool)
        if keep.dtype != torch.bool or tuple(keep.shape) != (spec.numel,):
            raise ConfigError(f"server state {MASK_STATE!r} is {keep.dtype} {tuple(keep.shape)}, not bool ({spec.numel},)")
        return keep

    def apply(self, state: ServerState, spec: ParamSpec, rnd: int) -> tuple[ServerState, dict[str, float]]:
        """After round ``rnd``'s apply: grow the mask to this round's target and zero the pruned weights."""
        prunable = self.prunable(spec)
        keep = self.keep_mask(state, spec).clone()
        params = state.params
        target = self.target(rnd)
        if target > 0.0:
            mag = params.detach().abs().to(torch.float64).cpu()
            mag[~keep] = -1.0  # already pruned: always among the smallest
            groups = [prunable] if self.scope == "global" else _per_tensor(spec, prunable)
            for g in groups:
                idx = g.nonzero().flatten()
                k = math.floor(target * idx.numel())
                if k > 0:
                    smallest = mag[idx].topk(k, largest=False, sorted=False).indices
                    keep[idx[smallest]] = False
        if bool((~keep).any()):
            params = params.masked_fill(~keep.to(params.device), 0.0)
        n = int(prunable.sum())
        sparsity = float((~keep & prunable).sum()) / n
        state = replace(state, params=params, tensors={**state.tensors, MASK_STATE: keep})
        return state, {"sparsity": sparsity}

    # ------------------------------------------------------------ instructions
    def for_clients(self, state: ServerState, spec: ParamSpec) -> tuple[ComponentSpec, dict[str, torch.Tensor]] | None:
        """The transform recipe and payload that keep pruned weights at zero (None before any pruning)."""
        keep = state.tensors.get(MASK_STATE)
        if keep is None or bool(keep.all()):
            return None
        return ComponentSpec.of(PRUNE), {PRUNE_MASK: pack_mask(keep)}


def _per_tensor(spec: ParamSpec, prunable: torch.Tensor) -> list[torch.Tensor]:
    groups = []
    for e in spec.entries:
        g = torch.zeros(spec.numel, dtype=torch.bool)
        g[e.offset : e.stop] = prunable[e.offset : e.stop]
        if bool(g.any()):
            groups.append(g)
    return groups
