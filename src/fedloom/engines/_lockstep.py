"""Lockstep programs: one optimizer step's losses and gradients for K clients at once.

A program maps the stacked trainable parameters of the active clients, ``theta`` of shape
``(k, P)`` (row i: client i's trainable entries in spec order), and one padded batch per
client, ``x`` of shape ``(k, B, *input)`` with ``counts[i] <= B`` real samples, to each
client's mean loss over its own real samples and that loss's gradient w.r.t. its own row.
Two programs exist:

* :class:`LoweredProgram` — the model's forward graph (traced with ``torch.fx``) must be a
  chain of supported layers: Linear (``torch.baddbmm`` on ``(k, out, in)`` weights), Conv2d
  (one grouped convolution, clients as groups), MaxPool2d, BatchNorm1d/2d, ReLU, Dropout,
  Flatten/reshape. Padded samples carry zero loss weight; BatchNorm uses masked per-client
  batch statistics (biased variance to normalize, unbiased for ``running_var``, as torch
  does), so padding changes nothing. Gradients come from one autograd pass over the whole
  cohort: clients share no parameter, so the gradient of the sum of the clients' losses
  w.r.t. row i is client i's own gradient.
* :class:`VmapProgram` — any buffer-free model ``torch.func`` can trace:
  ``vmap(grad_and_value(functional_call))`` over clients. Clients are grouped by their real
  batch size, so no padding is needed and even batch-coupled models stay exact.

Dropout draws independent masks per client (not the sequential engine's masks).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call, grad_and_value, vmap

from fedloom.client.losses import get_loss
from fedloom.core.params import ParamSpec

__all__ = ["LockstepProgram", "LoweredProgram", "Slot", "UnsupportedModel", "VmapProgram", "per_sample_loss", "slots_of"]


class UnsupportedModel(Exception):
    """The model cannot run as this lockstep program; the message says why."""


@dataclass(frozen=True)
class Slot:
    """A trainable entry: its columns ``[col, col + numel)`` in ``theta`` and its shape."""

    name: str
    col: int
    numel: int
    shape: tuple[int, ...]


def slots_of(spec: ParamSpec) -> dict[str, Slot]:
    """The trainable entries of ``spec`` laid out back to back, in spec order."""
    slots: dict[str, Slot] = {}
    col = 0
    for e in spec.entries:
        if e.trainable:
            slots[e.name] = Slot(e.name, col, e.numel, e.shape)
            col += e.numel
    return slots


# --------------------------------------------------------------------------- losses
def per_sample_loss(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample losses ``(N,)`` whose mean is :func:`fedloom.client.losses.get_loss` ``(name)``."""
    n = out.shape[0]
    if name == "cross_entropy":
        return F.cross_entropy(out, y, reduction="none")
    target = y.to(out.dtype).reshape(n, -1)
    out = out.reshape(n, -1)
    if name == "bce":
        per = F.binary_cross_entropy_with_logits(out, target, reduction="none")
    elif name == "mse":
        per = F.mse_loss(out, target, reduction="none")
    elif name == "l1":
        per = F.l1_loss(out, target, reduction="none")
    elif name == "huber":
        per = F.huber_loss(out, target, reduction="none")
    else:
        get_loss(name)  # raises the ConfigError naming the unknown loss
        raise AssertionError(name)
    return per.mean(1)


class LockstepProgram(ABC):
    """One lockstep training step for the active clients (rows of ``theta``)."""

    kind: str

    @abstractmethod
    def step(
        self,
        theta: torch.Tensor,
        state: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        counts: torch.Tensor,
        count_list: list[int],
        loss: str,
        gen: torch.Generator,
        grad_out: torch.Tensor,
    ) -> torch.Tensor:
        """Write each client's gradient into ``grad_out`` (k, P) and return its mean loss (k,).

        ``state`` (k, numel) holds the clients' full state rows (non-trainable entries and
        buffers; the program updates BatchNorm statistics in it). ``counts`` / ``count_list``
        are the real batch sizes, ``gen`` drives dropout.
        """


# --------------------------------------------------------------- lowered program
@dataclass
class _Ctx:
    """What the lowered ops of one step see."""

    k: int
    b: int
    param: Callable[[str], torch.Tensor]
    state: torch.Tensor
    mask: torch.Tensor | None  # (k, B) 1.0 for real samples; None when no client is padded
    counts: torch.Tensor  # (k,) real samples, float
    min_count: int
    gen: torch.Generator


@dataclass
class _Act:
    """An activation: client-major ``(k, B, *sample)`` or grouped ``(B, k*C, H, W)``."""

    t: torch.Tensor
    grouped: bool


def _client_major(a: _Act, ctx: _Ctx) -> torch.Tensor:
    if not a.grouped:
        return a.t
    b, kc, h, w = a.t.shape
    return a.t.view(b, ctx.k, kc // ctx.k, h, w).transpose(0, 1)


def _grouped(a: _Act, ctx: _Ctx) -> torch.Tensor:
    if a.grouped:
        return a.t
    if a.t.dim() != 5:
        raise UnsupportedModel(f"a 2-d layer gets per-sample shape {tuple(a.t.shape[2:])}, not (C, H, W)")
    k, b, c, h, w = a.t.shape
    return a.t.transpose(0, 1).reshape(b, k * c, h, w)


class _Op(ABC):
    @abstractmethod
    def __call__(self, a: _Act, ctx: _Ctx) -> _Act: ...


@dataclass(frozen=True)
class _Linear(_Op):
    prefix: str
    bias: bool

    def __call__(self, a: _Act, ctx: _Ctx) -> _Act:
        h = _client_major(a, ctx)
        w = ctx.param(self.prefix + "weight")  # (k, out, in)
        flat = h.reshape(ctx.k, -1, h.shape[-1])
        if self.bias:
            out = torch.baddbmm(ctx.param(self.prefix + "bias").unsqueeze(1), flat, w.transpose(1, 2))
        else:
            out = torch.bmm(flat, w.transpose(1, 2))
        return _Act(out.view(*h.shape[:-1], w.shape[1]), grouped=False)


@dataclass(frozen=True)
class _Conv2d(_Op):
    prefix: str
    bias: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int

    def __call__(self, a: _Act, ctx: _Ctx) -> _Act:
        h = _grouped(a, ctx)
        w = ctx.param(self.prefix + "weight")  # (k, out, in/groups, kh, kw)
        weight = w.reshape(-1, *w.shape[2:])
        bias = ctx.param(self.prefix + "bias").reshape(-1) if self.bias else None
        out = F.conv2d(h, weight, bias, self.stride, self.padding, self.dilation, self.groups * ctx.k)
        return _Act(out, grouped=True)


@dataclass(frozen=True)
class _MaxPool2d(_Op):
    kernel_size: int | tuple[int, ...]
    stride: int | tuple[int, ...] | None
    padding: int | tuple[int, ...]
    dilation: int | tuple[int, ...]
    ceil_mode: bool

    def __call__(self, a: _Act, ctx: _Ctx) -> _Act:
        out = F.max_pool2d(_grouped(a, ctx), self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        return _Act(out, grouped=True)


class _Identity(_Op):
    def __call__(self, a: _Act, ctx: _Ctx) -> _Act:
        return a


class _ReLU(_Op):
    def __call__(self, a: _Act, ctx: _Ctx) -> _Act:
        return _Act(torch.relu(a.t), a.grouped)


@dataclass(frozen=True)
class _Dropout(_Op):
    p: float

    def __call__(self, a: _Act, ctx: _Ctx) -> _Act:
        if self.p == 0.0:
            return a
        if self.p == 1.0:
            return _Act(a.t * 0.0, a.grouped)
        keep = torch.empty_like(a.t).bernoulli_(1.0 - self.p, generator=ctx.gen)
        return _Act(a.t * keep * (1.0 / (1.0 - self.p)), a.grouped)


@dataclass(frozen=True)
class _Reshape(_Op):
    """Per-sample reshape (``flatten(1)``, ``reshape(-1, *shape)``); ``shape`` may hold one -1."""

    shape: tuple[int, ...]

    def __call__(self, a: _Act, ctx: _Ctx) -> _Act:
        return _Act(_client_major(a, ctx).reshape(ctx.k, ctx.b, *self.shape), grouped=False)


@dataclass(frozen=True)
class _BatchNorm(_Op):
    """BatchNorm over the real samples of each client (``dims`` 1: (N, C); 2: (N, C, H, W))."""

    prefix: str
    dims: int
    affine: bool
    eps: float
    momentum: float | None
    running: tuple[slice, slice, int] | None  # running_mean, running_var, num_batches_tracked in the state

    def __call__(self, a: _Act, ctx: _Ctx) -> _Act:
        if self.dims == 1:
            h = _client_major(a, ctx)
            if h.dim() != 3:
                raise UnsupportedModel(f"BatchNorm1d on per-sample shape {tuple(h.shape[2:])}, not (C,)")
            h4 = h.unsqueeze(-1)
        else:
            g = _grouped(a, ctx)
            bsz, kc, hh, ww = g.shape
            h4 = g.view(bsz, ctx.k, kc // ctx.k, hh * ww).transpose(0, 1)
        spatial = h4.shape[3]
        if ctx.min_count * spatial < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {spatial}")
        count = (ctx.counts * spatial).unsqueeze(1)  # (k, 1)
        if ctx.mask is None:
            mean = h4.mean((1, 3))
            centered = h4 - mean[:, None, :, None]
            var = (centered * centered).mean((1, 3))
        else:
            m = ctx.mask[:, :, None, None]
            mean = (h4 * m).sum((1, 3)) / count
            centered = h4 - mean[:, None, :, None]
            var = (centered * centered * m).sum((1, 3)) / count
        out = centered * torch.rsqrt(var + self.eps)[:, None, :, None]
        if self.affine:
            w = ctx.param(self.prefix + "weight")
            bias = ctx.param(self.prefix + "bias")
            out = out * w[:, None, :, None] + bias[:, None, :, None]
        if self.running is not None:
            self._update_running(ctx, mean.detach(), var.detach(), count)
        if self.dims == 1:
            return _Act(out.squeeze(-1), grouped=False)
        return _Act(out.transpose(0, 1).reshape(bsz, kc, hh, ww), grouped=True)

    def _update_running(self, ctx: _Ctx, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        assert self.running is not None
        rm_cols, rv_cols, nbt_col = self.running
        with torch.no_grad():
            nbt = ctx.state[:, nbt_col : nbt_col + 1]
            nbt.add_(1.0)
            factor: torch.Tensor | float = 1.0 / nbt if self.momentum is None else self.momentum
            rm, rv = ctx.state[:, rm_cols], ctx.state[:, rv_cols]
            rm.copy_(factor * mean + (1.0 - factor) * rm)
            rv.copy_(factor * (var * count / (count - 1.0)) + (1.0 - factor) * rv)


def _pair(v: object) -> object:
    return tuple(v) if isinstance(v, list) else v


def _lower_module(name: str, mod: nn.Module, spec: ParamSpec) -> _Op:
    prefix = f"{name}." if name else ""
    if isinstance(mod, nn.Linear):
        return _Linear(prefix, mod.bias is not None)
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros":
            raise UnsupportedModel(f"Conv2d {name!r} has padding_mode {mod.padding_mode!r}")
        return _Conv2d(prefix, mod.bias is not None, mod.stride, mod.padding, mod.dilation, mod.groups)
    if isinstance(mod, nn.MaxPool2d):
        if mod.return_indices:
            raise UnsupportedModel(f"MaxPool2d {name!r} returns indices")
        return _MaxPool2d(_pair(mod.kernel_size), _pair(mod.stride), _pair(mod.padding), _pair(mod.dilation), mod.ceil_mode)  # type: ignore[arg-type]
    if isinstance(mod, nn.ReLU):
        return _ReLU()
    if isinstance(mod, nn.Dropout):
        return _Dropout(float(mod.p))
    if isinstance(mod, nn.Identity):
        return _Identity()
    if isinstance(mod, nn.Flatten):
        if mod.start_dim != 1 or mod.end_dim != -1:
            raise UnsupportedModel(f"Flatten {name!r} with dims ({mod.start_dim}, {mod.end_dim})")
        return _Reshape((-1,))
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        running = None
        if mod.track_running_stats and mod.running_mean is not None:
            rm, rv, nbt = (spec.entry(prefix + n) for n in ("running_mean", "running_var", "num_batches_tracked"))
            running = (slice(rm.offset, rm.stop), slice(rv.offset, rv.stop), nbt.offset)
        dims = 1 if isinstance(mod, nn.BatchNorm1d) else 2
        return _BatchNorm(prefix, dims, mod.affine, float(mod.eps), mod.momentum, running)
    raise UnsupportedModel(f"layer {name!r} ({type(mod).__name__}) has no lockstep lowering")


def _lower_call(node: fx.Node) -> _Op:
    fn, args, kwargs = node.target, node.args[1:], dict(node.kwargs)
    if node.op == "call_function" and fn in (torch.relu, F.relu) or node.op == "call_method" and fn == "relu":
        return _ReLU()
    if node.op == "call_function" and fn is torch.flatten or node.op == "call_method" and fn == "flatten":
        start = args[0] if args else kwargs.get("start_dim", 0)
        end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
        if (start, end) == (1, -1):
            return _Reshape((-1,))
    if node.op == "call_method" and fn in ("reshape", "view") and not kwargs:
        shape = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)
        if len(shape) >= 1 and shape[0] == -1 and all(isinstance(s, int) and (s > 0 or s == -1) for s in shape[1:]):
            if shape.count(-1) == 1:
                return _Reshape(tuple(int(s) for s in shape[1:]) or (1,))
    raise UnsupportedModel(f"operation {node.format_node()} has no lockstep lowering")


class LoweredProgram(LockstepProgram):
    """A chain of supported layers, run for all clients with stacked weights (see the module doc)."""

    kind = "lowered"

    def __init__(self, model: nn.Module, spec: ParamSpec) -> None:
        try:
            graph = fx.symbolic_trace(model).graph
        except Exception as exc:  # noqa: BLE001 - any tracing failure means "not lowerable"
            raise UnsupportedModel(f"torch.fx cannot trace the model: {exc}") from exc
        modules = dict(model.named_modules())
        self.slots = slots_of(spec)
        self._entries = {e.name: e for e in spec.entries}
        ops: list[_Op] = []
        used: set[str] = set()
        prev: fx.Node | None = None
        for node in graph.nodes:
            if node.op == "placeholder":
                if prev is not None:
                    raise UnsupportedModel("the model takes more than one input")
                prev = node
                continue
            if node.op == "output":
                if node.args[0] is not prev:
                    raise UnsupportedModel("the model's output is not its last operation")
                continue
            if node.op == "get_attr" or len(node.all_input_nodes) != 1 or node.all_input_nodes[0] is not prev:
                raise UnsupportedModel(f"operation {node.format_node()} is not a single-input step of a chain")
            if node.op == "call_module":
                mod = modules[str(node.target)]
                if node.args[1:] or node.kwargs:
                    raise UnsupportedModel(f"module {node.target!r} is called with extra arguments")
                ops.append(_lower_module(str(node.target), mod, spec))
                used.update(f"{node.target}.{n}" for n, _ in mod.named_parameters())
            else:
                ops.append(_lower_call(node))
            prev = node
        unused = sorted(set(self.slots) - used)
        if unused:
            raise UnsupportedModel(f"trainable entries {unused} are not used by a lowered layer")
        lowered_buffers = {
            f"{name}.{b}" for name, mod in modules.items() if isinstance(mod, nn.modules.batchnorm._BatchNorm) for b, _ in mod.named_buffers()
        }
        other = [n for n, _ in model.named_buffers() if n not in lowered_buffers]
        if other:
            raise UnsupportedModel(f"buffers {other} have no lockstep lowering")
        self.ops = ops

    def step(
        self,
        theta: torch.Tensor,
        state: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        counts: torch.Tensor,
        count_list: list[int],
        loss: str,
        gen: torch.Generator,
        grad_out: torch.Tensor,
    ) -> torch.Tensor:
        k, b = x.shape[0], x.shape[1]
        leaves = {
            s.name: theta[:, s.col : s.col + s.numel].detach().view(k, *s.shape).requires_grad_(True)
            for s in self.slots.values()
        }

        def param(name: str) -> torch.Tensor:
            leaf = leaves.get(name)
            if leaf is not None:
                return leaf
            e = self._entries[name]
            return state[:, e.offset : e.stop].view(k, *e.shape)

        min_count = min(count_list)
        ctx = _Ctx(k, b, param, state, None, counts, min_count, gen)
        if min_count < b:
            ctx.mask = (torch.arange(b, device=x.device) < counts.unsqueeze(1)).to(theta.dtype)
        with torch.enable_grad():
            a = _Act(x, grouped=False)
            for op in self.ops:
                a = op(a, ctx)
            out = _client_major(a, ctx)
            per = per_sample_loss(loss, out.reshape(k * b, *out.shape[2:]), y.reshape(k * b, *y.shape[2:])).view(k, b)
            losses = per.mean(1) if ctx.mask is None else (per * ctx.mask).sum(1) / counts
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        for s, g in zip(self.slots.values(), grads, strict=True):
            grad_out[:, s.col : s.col + s.numel].copy_(g.reshape(k, -1))
        return losses.detach()

    def activation_numel(self, sample_shape: tuple[int, ...], spec: ParamSpec, dtype: torch.dtype) -> int:
        """Elements of all activations of ONE sample (for the chunk-size estimate)."""
        state = spec.empty().to(dtype).unsqueeze(0)
        theta = torch.zeros(1, sum(s.numel for s in self.slots.values()), dtype=dtype)
        leaves = {s.name: theta[:, s.col : s.col + s.numel].view(1, *s.shape) for s in self.slots.values()}

        def param(name: str) -> torch.Tensor:
            if name in leaves:
                return leaves[name]
            e = self._entries[name]
            return state[:, e.offset : e.stop].view(1, *e.shape)

        gen = torch.Generator().manual_seed(0)
        ctx = _Ctx(1, 2, param, state.clone(), None, torch.full((1,), 2.0, dtype=dtype), 2, gen)
        a = _Act(torch.zeros(1, 2, *sample_shape, dtype=dtype), grouped=False)
        total = 0
        with torch.no_grad():
            for op in self.ops:
                a = op(a, ctx)
                total += a.t.numel() // 2
        return total


# ------------------------------------------------------------------- vmap program
class VmapProgram(LockstepProgram):
    """``torch.func``: ``vmap`` over clients of ``grad_and_value`` of the model's mean loss."""

    kind = "vmap"

    def __init__(self, model: nn.Module, spec: ParamSpec) -> None:
        buffers = [n for n, _ in model.named_buffers()]
        if buffers:
            raise UnsupportedModel(f"torch.func training of models with buffers ({buffers}) is not exact")
        self.model = model.train()
        self.slots = slots_of(spec)
        self._consts = [e for e in spec.entries if not e.trainable]
        self._fns: dict[str, Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]] = {}

    def _fn(self, loss: str) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]:
        fn = self._fns.get(loss)
        if fn is None:
            loss_fn = get_loss(loss)
            model = self.model

            def client_loss(params: dict[str, torch.Tensor], consts: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                return loss_fn(functional_call(model, (params, consts), (x,)), y)

            fn = vmap(grad_and_value(client_loss), in_dims=(0, None, 0, 0), randomness="different")
            self._fns[loss] = fn
        return fn

    def step(
        self,
        theta: torch.Tensor,
        state: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        counts: torch.Tensor,
        count_list: list[int],
        loss: str,
        gen: torch.Generator,
        grad_out: torch.Tensor,
    ) -> torch.Tensor:
        fn = self._fn(loss)
        k = x.shape[0]
        consts = {e.name: state[0, e.offset : e.stop].view(e.shape) for e in self._consts}
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(count_list):
            groups.setdefault(c, []).append(i)
        losses = torch.empty(k, dtype=theta.dtype, device=theta.device)
        for c, rows in groups.items():
            whole = len(rows) == k
            index = None if whole else torch.tensor(rows, device=theta.device)
            th = theta if index is None else theta[index]
            xs = (x if index is None else x[index])[:, :c]
            ys = (y if index is None else y[index])[:, :c]
            params = {s.name: th[:, s.col : s.col + s.numel].view(len(rows), *s.shape) for s in self.slots.values()}
            grads, values = fn(params, consts, xs, ys)
            flat = torch.cat([grads[s.name].reshape(len(rows), -1) for s in self.slots.values()], dim=1)
            if index is None:
                grad_out.copy_(flat)
                losses.copy_(values)
            else:
                grad_out[index] = flat
                losses[index] = values.to(losses.dtype)
        return losses

