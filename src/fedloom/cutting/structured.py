"""Structured pruning at export: remove whole neurons and channels, keeping a smaller dense model.

A model is cut along its **links**: a producer layer (Linear or Conv2d) whose output units
(neurons, channels) feed a consumer layer (Linear or Conv2d), possibly through a BatchNorm1d,
an elementwise activation, dropout or pooling, and a flatten (then one channel is a block of
``H·W`` consumer inputs). Removing unit j of a link deletes row j of the producer (its
weights and bias), entry j of the norm between, and the consumer's input column(s) of j.

The definition is exact by construction: the *masked model* — the same architecture with the
removed units' consumer columns (and producer rows) set to zero — computes the same function
as the *smaller dense model*, because a removed unit's output only ever meets zero weights.
:func:`cut` returns both, and ``tests/cutting/test_structured.py`` checks that they agree.

Which units go: per link, the ``fraction`` of units with the smallest L2 norm of their
incoming weights (and bias), always including the *free* units, keeping at least one: a unit
whose incoming weights are all zero (what magnitude pruning leaves behind) outputs a constant
c = ReLU(norm(bias)); when c = 0, or when the consumer is a Linear layer, removing it changes
nothing — its constant contribution W[:, j]·c is added to the consumer's bias (in both the
masked and the smaller model), so removing only free units (``fraction = 0``) returns the same
function as the original model. (A padded convolution sees a constant channel as non-constant
at its borders, so a constant channel feeding one is free only when c = 0.) The links of the built-in
architectures (McMahan's CNN and 2NN, the tabular MLP) are known; another architecture is
refused with the reason.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from fedloom.core.errors import ConfigError

__all__ = ["Link", "CutReport", "cut", "links_of"]


@dataclass(frozen=True)
class Link:
    """A producer's output units feeding a consumer (module names within the model)."""

    producer: str
    consumer: str
    norm: str | None = None
    block: int = 1  # consumer inputs per unit (H·W when a conv's channels are flattened into a Linear)
    fold: bool = True  # a constant unit's output can be folded into the consumer's bias (False: a padded conv)


@dataclass(frozen=True)
class CutReport:
    """Units kept per link (producer name -> (kept, total)) and parameter counts before and after."""

    kept: dict[str, tuple[int, int]]
    params_before: int
    params_after: int


def links_of(model: nn.Module) -> list[Link]:
    """The links of a built-in architecture; :class:`ConfigError` for one this module cannot cut."""
    from fedloom.models.mnist import McMahan2NN, McMahanCNN
    from fedloom.models.tabular import MLP

    if isinstance(model, McMahanCNN):
        # conv2 pads its input: a constant channel is not constant at the borders, so only a zero one is free
        return [Link("conv1", "conv2", fold=False), Link("conv2", "fc1", block=49), Link("fc1", "fc2")]
    if isinstance(model, McMahan2NN):
        return [Link("fc1", "fc2"), Link("fc2", "fc3")]
    if isinstance(model, MLP):
        names = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.BatchNorm1d))]
        out, prev, norm = [], None, None
        for n, m in names:
            if isinstance(m, nn.BatchNorm1d):
                norm = n
            else:
                if prev is not None:
                    out.append(Link(prev, n, norm=norm))
                prev, norm = n, None
        return out
    raise ConfigError(
        f"structured pruning knows the links of the CNN, 2NN and MLP models, not {type(model).__name__}", key="prune"
    )


def _scores(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().flatten(1)  # type: ignore[union-attr]
    s = w.pow(2).sum(1)
    if getattr(layer, "bias", None) is not None:
        s = s + layer.bias.detach().pow(2)  # type: ignore[union-attr]
    return s.sqrt()


def _constant(model: nn.Module, ln: Link) -> torch.Tensor:
    """Each unit's output if its incoming weights were all zero: ReLU(norm(bias)) (the built-in models' activation)."""
    prod = model.get_submodule(ln.producer)
    n = prod.weight.shape[0]  # type: ignore[index]
    b = prod.bias.detach().clone() if prod.bias is not None else torch.zeros(n)  # type: ignore[union-attr]
    if ln.norm is not None:
        bn = model.get_submodule(ln.norm)
        b = (b - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)  # type: ignore[operator]
        if bn.affine:  # type: ignore[union-attr]
            b = b * bn.weight.detach() + bn.bias.detach()  # type: ignore[union-attr]
    return torch.relu(b)


def _free(model: nn.Module, ln: Link) -> torch.Tensor:
    """Units whose removal changes nothing: no incoming weight, and a constant output that is 0 or foldable."""
    prod = model.get_submodule(ln.producer)
    dead = prod.weight.detach().flatten(1).abs().sum(1) == 0  # type: ignore[union-attr]
    return dead & ((_constant(model, ln) == 0) | ln.fold)


def _keep(model: nn.Module, ln: Link, fraction: float) -> torch.Tensor:
    """Indices (sorted) of the units of the link's producer that stay."""
    scores = _scores(model.get_submodule(ln.producer))
    n = scores.numel()
    free = _free(model, ln)
    drop = min(max(math.floor(fraction * n), int(free.sum())), n - 1)
    order = torch.argsort(scores + torch.where(free, -1.0, 0.0) * (scores.max() + 1), stable=True)
    return order[drop:].sort().values


def _fold(model: nn.Module, ln: Link, gone: torch.Tensor, free: torch.Tensor) -> None:
    """Add the removed free units' constant contribution to the consumer's bias (exact: no padding in between)."""
    units = (gone & free).nonzero().flatten()
    if not len(units) or not ln.fold:
        return
    consumer = model.get_submodule(ln.consumer)
    const = _constant(model, ln)
    cols = _columns(units, ln.block)
    values = const[units].repeat_interleave(ln.block)
    with torch.no_grad():
        w = consumer.weight[:, cols]  # type: ignore[index]
        extra = (w.flatten(2).sum(2) if w.dim() > 2 else w) @ values
        if consumer.bias is None:  # type: ignore[union-attr]
            raise ConfigError(f"cannot fold removed units into {ln.consumer}: it has no bias", key="prune")
        consumer.bias.add_(extra)  # type: ignore[union-attr]


def _columns(keep: torch.Tensor, block: int) -> torch.Tensor:
    return (keep.unsqueeze(1) * block + torch.arange(block)).reshape(-1)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _shrink_out(layer: nn.Module, keep: torch.Tensor) -> nn.Module:
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(layer.in_features, len(keep), bias=layer.bias is not None)
    elif isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(layer.in_channels, len(keep), layer.kernel_size, layer.stride, layer.padding,  # type: ignore[arg-type]
                        layer.dilation, layer.groups, bias=layer.bias is not None)  # fmt: skip
    else:
        raise ConfigError(f"cannot cut a {type(layer).__name__}", key="prune")
    with torch.no_grad():
        new.weight.copy_(layer.weight[keep])  # type: ignore[index]
        if layer.bias is not None:
            new.bias.copy_(layer.bias[keep])  # type: ignore[index, union-attr]
    return new


def _shrink_in(layer: nn.Module, cols: torch.Tensor) -> nn.Module:
    if isinstance(layer, nn.Linear):
        new: nn.Module = nn.Linear(len(cols), layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            new.weight.copy_(layer.weight[:, cols])
    elif isinstance(layer, nn.Conv2d):
        new = nn.Conv2d(len(cols), layer.out_channels, layer.kernel_size, layer.stride, layer.padding,  # type: ignore[arg-type]
                        layer.dilation, layer.groups, bias=layer.bias is not None)  # fmt: skip
        with torch.no_grad():
            new.weight.copy_(layer.weight[:, cols])
    else:
        raise ConfigError(f"cannot cut a {type(layer).__name__}", key="prune")
    if layer.bias is not None:
        with torch.no_grad():
            new.bias.copy_(layer.bias)  # type: ignore[union-attr]
    return new


def _shrink_norm(norm: nn.BatchNorm1d, keep: torch.Tensor) -> nn.BatchNorm1d:
    new = nn.BatchNorm1d(len(keep), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                         track_running_stats=norm.track_running_stats)  # fmt: skip
    with torch.no_grad():
        if norm.affine:
            new.weight.copy_(norm.weight[keep])
            new.bias.copy_(norm.bias[keep])
        if norm.track_running_stats:
            new.running_mean.copy_(norm.running_mean[keep])  # type: ignore[index]
            new.running_var.copy_(norm.running_var[keep])  # type: ignore[index]
            new.num_batches_tracked.copy_(norm.num_batches_tracked)  # type: ignore[arg-type]
    return new


def cut(model: nn.Module, fraction: float) -> tuple[nn.Module, nn.Module, CutReport]:
    """``(masked, smaller, report)``: ``fraction`` of each link's units removed (see the module docstring).

    ``model`` is not modified. Both results are in eval mode.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (0.0 <= fraction < 1.0):
        raise ConfigError(f"the fraction of units to remove must be in [0, 1), got {fraction!r}", key="prune")
    links = links_of(model)
    masked = copy.deepcopy(model).eval()
    small = copy.deepcopy(model).eval()
    kept: dict[str, tuple[int, int]] = {}
    keeps = {ln.producer: _keep(model, ln, fraction) for ln in links}
    for ln in links:
        keep = keeps[ln.producer]
        prod = model.get_submodule(ln.producer)
        n = prod.weight.shape[0]  # type: ignore[index]
        kept[ln.producer] = (len(keep), int(n))
        gone = torch.ones(n, dtype=torch.bool)
        gone[keep] = False
        free = _free(model, ln)
        _fold(masked, ln, gone, free)  # removed constant units live on in the consumer's bias, in both models
        _fold(small, ln, gone, free)
        with torch.no_grad():  # the masked model: removed units' rows and consumer columns zeroed
            mp, mc = masked.get_submodule(ln.producer), masked.get_submodule(ln.consumer)
            mp.weight[gone] = 0.0  # type: ignore[index]
            if mp.bias is not None:
                mp.bias[gone] = 0.0  # type: ignore[index]
            cols = _columns(gone.nonzero().flatten(), ln.block)
            mc.weight[:, cols] = 0.0  # type: ignore[index]
    # the smaller model: producers lose rows, consumers lose columns (a layer can be both)
    for ln in links:
        keep = keeps[ln.producer]
        _set(small, ln.producer, _shrink_out(small.get_submodule(ln.producer), keep))
        if ln.norm is not None:
            _set(small, ln.norm, _shrink_norm(small.get_submodule(ln.norm), keep))  # type: ignore[arg-type]
        _set(small, ln.consumer, _shrink_in(small.get_submodule(ln.consumer), _columns(keep, ln.block)))
    small.eval()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return masked, small, CutReport(kept, count(model), count(small))
