"""Lockstep programs: one optimizer step's losses and gradients for k clients at once.

A program maps the active clients' trainable parameters, stacked per entry as ``(k, *shape)``
tensors (views of a :class:`SlotStack` buffer), and one padded batch per client, ``x`` of
shape ``(k, B, *input)`` with ``counts[i] <= B`` real samples, to each client's mean loss
over its own real samples, and writes that loss's gradient w.r.t. the client's own
parameters into the gradient buffer. Two programs exist:

* :class:`LoweredProgram` — the model's forward graph (traced with ``torch.fx``) must be a
  chain of supported layers: Linear (``torch.baddbmm`` on ``(k, out, in)`` weights), Conv2d
  (one grouped convolution, clients as groups), MaxPool2d, BatchNorm1d/2d, ReLU, Dropout,
  Identity, Flatten/reshape. Padded samples carry zero loss weight; BatchNorm uses masked per-client
  batch statistics (biased variance to normalize, unbiased for ``running_var``, as torch
  does), so padding changes nothing. Gradients come from one autograd pass over the whole
  cohort: clients share no parameter, so the gradient of the sum of the clients' losses
  w.r.t. client i's parameters is client i's own gradient. Linear layers have their own
  backward, which writes the weight gradient straight into the gradient buffer.
* :class:`VmapProgram` — any buffer-free model ``torch.func`` can trace:
  ``vmap(grad_and_value(functional_call))`` over clients. Clients are grouped by their real
  batch size, so no padding is needed and even batch-coupled models stay exact.

Dropout draws independent masks per client (the lowered program from the generator it is
given, the vmap program from the global RNG), not the sequential engine's masks.

Mixed precision. Called inside a ``torch.autocast`` region (the engine's ``bf16`` mode), a
program runs its forward pass in the autocast dtype and everything else in the parameters'
dtype: the loss is computed from float32 logits, the backward pass runs with autocast off
(each op's gradient in the dtype its forward used), and gradients and updates land in the
float32 buffers. Stacked Linear layers cast their inputs and weights explicitly (their own
backward needs the dtypes); grouped convolutions are cast by autocast itself; BatchNorm
statistics are computed in float32.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call, grad_and_value, vmap

from fedloom.client.losses import get_loss, per_sample_loss
from fedloom.core.params import ParamSpec
from fedloom.engines._device import autocast_dtype

__all__ = [
    "LockstepProgram",
    "LoweredProgram",
    "Slot",
    "SlotStack",
    "UnsupportedModel",
    "VmapProgram",
    "per_sample_loss",
    "slots_of",
]


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


class SlotStack:
    """K clients' trainable entries in ONE flat buffer, slot-major: slot s holds a ``(K, *shape)`` block.

    Each slot's rows are contiguous, so the first ``ka`` clients of a slot are one contiguous
    prefix (the active clients), weights feed ``bmm`` without copies, and elementwise
    updates run on the whole buffer (all clients active) or on one prefix per slot.
    """

    def __init__(self, slots: dict[str, Slot], k: int) -> None:
        self.slots = slots
        self.k = k
        self.numel = k * sum(s.numel for s in slots.values())

    def views(self, buf: torch.Tensor, ka: int) -> dict[str, torch.Tensor]:
        """``name -> (ka, *shape)`` views of the first ``ka`` clients."""
        k = self.k
        return {n: buf[k * s.col : k * s.col + ka * s.numel].view(ka, *s.shape) for n, s in self.slots.items()}

    def flat(self, buf: torch.Tensor, ka: int) -> list[torch.Tensor]:
        """The first ``ka`` clients' part of ``buf`` as few contiguous 1-d tensors."""
        if ka == self.k:
            return [buf]
        k = self.k
        return [buf[k * s.col : k * s.col + ka * s.numel] for s in self.slots.values()]

    def stack(self, rows: torch.Tensor) -> torch.Tensor:
        """A buffer from per-client trainable vectors ``rows`` (K, P) in slot order (one copy; ``rows``
        may be a broadcast view, e.g. the global vector expanded to K rows)."""
        k = self.k
        buf = rows.new_empty(self.numel)
        for s in self.slots.values():
            buf[k * s.col : k * (s.col + s.numel)].view(k, s.numel).copy_(rows[:, s.col : s.col + s.numel])
        return buf


class LockstepProgram(ABC):
    """One lockstep training step for the active clients."""

    kind: str
    graph_safe: bool = False
    """Whether :meth:`step` may be captured in a CUDA graph: no host synchronization, no host
    data read on the device, no random draws from a generator the graph does not own."""
    thread_invariant: bool = False
    """Whether a step gives the same bits with any number of intra-op threads: only batched
    products over clients (each client's product computed whole by one thread) and elementwise
    operations; convolutions (whose weight gradient a thread split sums in another order),
    pooling, normalization and random draws are not."""

    @abstractmethod
    def step(
        self,
        params: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        state: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        counts: torch.Tensor,
        count_list: list[int],
        loss: str,
        gen: torch.Generator,
        sgd_lr: float | None = None,
    ) -> torch.Tensor:
        """Write each active client's gradient into ``grads`` and return its mean loss (k,).

        ``params`` / ``grads`` map trainable names to ``(k, *shape)`` tensors (views of
        :class:`SlotStack` buffers); ``state`` (k, numel) holds the clients' full state rows
        (non-trainable entries and buffers: the program updates BatchNorm statistics in it);
        ``x`` (k, B, *input) and ``y`` are padded batches with ``counts`` / ``count_list``
        real samples; ``gen`` drives dropout. With ``sgd_lr`` the program applies plain SGD
        itself, ``p -= sgd_lr * grad`` on every parameter (``grads`` is then scratch space):
        the lowered program fuses it into the weight-gradient products of Linear layers.
        """


# --------------------------------------------------------------- lowered program
@dataclass
class _Ctx:
    """What the lowered ops of one step see."""

    k: int
    b: int
    param: Callable[[str], torch.Tensor]
    weight_out: Callable[[str], torch.Tensor | None]  # gradient buffer, or the parameter under fused SGD
    sgd_lr: float | None
    state: torch.Tensor
    mask: torch.Tensor | None  # (k, B) 1.0 for real samples; None when no client is padded
    counts: torch.Tensor  # (k,) real samples, float
    min_count: int
    gen: torch.Generator
    compute_dtype: torch.dtype | None = None  # the autocast dtype of the forward pass, if any


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
        bias = ctx.param(self.prefix + "bias") if self.bias else None
        out_buf = ctx.weight_out(self.prefix + "weight")
        if ctx.compute_dtype is not None and h.device.type == "cpu":
            # On CPU a client's (out, in) weight meets only its B samples per step: the product is
            # bound by weight traffic, which casting float32 master weights to bfloat16 every step
            # adds to (measured: the McMahan CNN 2,486 vs 1,806 samples/s, the 2NN 5x slower cast).
            # So Linear layers keep float32 products there; convolutions take the bfloat16 path.
            with torch.autocast("cpu", enabled=False):
                out = _StackedLinear.apply(flat.to(w.dtype), w, bias, out_buf, ctx.sgd_lr, None)
        else:
            out = _StackedLinear.apply(flat, w, bias, out_buf, ctx.sgd_lr, ctx.compute_dtype)
        return _Act(out.view(*h.shape[:-1], w.shape[1]), grouped=False)


class _StackedLinear(torch.autograd.Function):
    """``x @ W_i^T + b_i`` per client with ``(k, out, in)`` weights.

    Its own backward computes ``dW_i = dout_i^T @ x_i`` directly in the weight's
    ``(out, in)`` layout (autograd's generic rule would produce it transposed, and the
    transposing copy costs more than the matrix product on CPU). Given ``weight_out``, it
    writes ``dW`` there (the gradient buffer: no allocation, no copy) or, with ``sgd_lr``,
    applies plain SGD ``W -= sgd_lr * dW`` to ``weight_out`` (the parameter buffer) in the
    same product, so the gradient never goes through memory.

    With ``compute_dtype`` (the autocast dtype, e.g. bfloat16) the products run in that dtype
    on cast copies of ``x``, ``W`` and ``b``; the gradients are returned (or written, or
    applied) in the dtypes of the float32 inputs and buffers.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        weight_out: torch.Tensor | None,
        sgd_lr: float | None,
        compute_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)  # type: ignore[attr-defined]
        if compute_dtype is not None:  # cast copies: the fused SGD step rewrites the float32 weight later
            x, weight = x.to(compute_dtype), weight.to(compute_dtype)
            bias = bias.to(compute_dtype) if bias is not None else None
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        ctx.weight_out = weight_out  # type: ignore[attr-defined]
        ctx.sgd_lr = sgd_lr  # type: ignore[attr-defined]
        ctx.compute_dtype = compute_dtype  # type: ignore[attr-defined]
        wt = weight.transpose(1, 2)
        return torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, wt)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:  # type: ignore[override]
        x, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        if ctx.compute_dtype is not None:  # type: ignore[attr-defined]
            return _StackedLinear._backward_cast(ctx, grad.to(ctx.compute_dtype), x, weight)  # type: ignore[attr-defined]
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None  # type: ignore[attr-defined]
        grad_w = None
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            grad_t = grad.transpose(1, 2).contiguous()
            out, lr = ctx.weight_out, ctx.sgd_lr  # type: ignore[attr-defined]
            if out is None:
                grad_w = torch.bmm(grad_t, x)
            elif lr is None:
                grad_w = torch.bmm(grad_t, x, out=out)
            else:  # fused SGD: grad_x above already used the old weight
                out.baddbmm_(grad_t, x, alpha=-lr)
        grad_b = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None  # type: ignore[attr-defined]
        return grad_x, grad_w, grad_b, None, None, None

    @staticmethod
    def _backward_cast(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor, x: torch.Tensor,
                       weight: torch.Tensor) -> tuple:  # fmt: skip
        """The backward under a compute dtype: products in it, results in the inputs' dtypes."""
        x_dtype, w_dtype, b_dtype = ctx.dtypes  # type: ignore[attr-defined]
        need = ctx.needs_input_grad  # type: ignore[attr-defined]
        grad_x = torch.bmm(grad, weight).to(x_dtype) if need[0] else None
        grad_w = None
        if need[1]:
            dw = torch.bmm(grad.transpose(1, 2).contiguous(), x)
            out, lr = ctx.weight_out, ctx.sgd_lr  # type: ignore[attr-defined]
            if out is None:
                grad_w = dw.to(w_dtype)
            elif lr is None:
                grad_w = out.copy_(dw)
            else:  # fused SGD on the float32 master weight
                out.add_(dw, alpha=-lr)
        grad_b = grad.sum(1, dtype=b_dtype) if ctx.has_bias and need[2] else None  # type: ignore[attr-defined]
        return grad_x, grad_w, grad_b, None, None, None


@dataclass(frozen=True)
class _Conv2d(_Op):
    prefix: str
    bias: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int

    def __call__(self, a: _Act, ctx: _Ctx) -> _Act:
        # Channels-last (NHWC): oneDNN's grouped convolutions and the max-pooling after them run
        # faster on it (the McMahan CNN: 1,734 -> 2,035 samples/s on 2 CPU threads; pooling an
        # NCHW (10, 128, 28, 28) batch takes 5.0 ms, NHWC 0.3 ms), and it is the tensor-core layout.
        h = _grouped(a, ctx).contiguous(memory_format=torch.channels_last)
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
    """Per-sample reshape: ``flatten(1)`` (shape ``(-1,)``) or ``reshape(-1, *shape)``."""

    shape: tuple[int, ...]

    def __call__(self, a: _Act, ctx: _Ctx) -> _Act:
        h = _client_major(a, ctx)
        if -1 not in self.shape and math.prod(self.shape) != math.prod(h.shape[2:]):
            raise UnsupportedModel(f"reshape of per-sample shape {tuple(h.shape[2:])} to {self.shape} mixes samples")
        return _Act(h.reshape(ctx.k, ctx.b, *self.shape), grouped=False)


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
        if h4.dtype != ctx.state.dtype:  # mixed precision: statistics and normalization in float32
            h4 = h4.to(ctx.state.dtype)
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
    """The op for a leaf module; exact types only (a subclass may change ``forward``)."""
    prefix = f"{name}." if name else ""
    kind = type(mod)
    if kind is nn.Linear:
        return _Linear(prefix, mod.bias is not None)
    if kind is nn.Conv2d:
        if mod.padding_mode != "zeros":
            raise UnsupportedModel(f"Conv2d {name!r} has padding_mode {mod.padding_mode!r}")
        return _Conv2d(prefix, mod.bias is not None, mod.stride, mod.padding, mod.dilation, mod.groups)
    if kind is nn.MaxPool2d:
        if mod.return_indices:
            raise UnsupportedModel(f"MaxPool2d {name!r} returns indices")
        return _MaxPool2d(
            _pair(mod.kernel_size), _pair(mod.stride), _pair(mod.padding), _pair(mod.dilation), mod.ceil_mode  # type: ignore[arg-type]
        )
    if kind is nn.ReLU:
        return _ReLU()
    if kind is nn.Dropout:
        return _Dropout(float(mod.p))
    if kind is nn.Identity:
        return _Identity()
    if kind is nn.Flatten:
        if mod.start_dim != 1 or mod.end_dim != -1:
            raise UnsupportedModel(f"Flatten {name!r} with dims ({mod.start_dim}, {mod.end_dim})")
        return _Reshape((-1,))
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        running = None
        if mod.track_running_stats and mod.running_mean is not None:
            rm, rv, nbt = (spec.entry(prefix + n) for n in ("running_mean", "running_var", "num_batches_tracked"))
            running = (slice(rm.offset, rm.stop), slice(rv.offset, rv.stop), nbt.offset)
        dims = 1 if kind is nn.BatchNorm1d else 2
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
        # Only reshape(-1, d1, ..., dn) with every d > 0: the batch dimension stays first.
        shape = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)
        if len(shape) >= 2 and shape[0] == -1 and all(isinstance(s, int) and s > 0 for s in shape[1:]):
            return _Reshape(tuple(shape[1:]))
    raise UnsupportedModel(f"operation {node.format_node()} has no lockstep lowering")


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor on ``t``'s memory with its own autograd version counter (unlike ``detach``)."""
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


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
        uses: dict[str, int] = {}
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
                for n, _ in mod.named_parameters():
                    uses[f"{node.target}.{n}"] = uses.get(f"{node.target}.{n}", 0) + 1
            else:
                ops.append(_lower_call(node))
            prev = node
        unused = sorted(set(self.slots) - set(uses))
        if unused:
            raise UnsupportedModel(f"trainable entries {unused} are not used by a lowered layer")
        norm_buffers = {
            f"{name}.{b}"
            for name, mod in modules.items()
            if isinstance(mod, nn.modules.batchnorm._BatchNorm)
            for b, _ in mod.named_buffers()
        }
        other = [n for n, _ in model.named_buffers() if n not in norm_buffers]
        if other:
            raise UnsupportedModel(f"buffers {other} have no lockstep lowering")
        self.ops = ops
        # Dropout draws from the chunk's own generator, which a CUDA graph would not advance.
        self.graph_safe = not any(isinstance(op, _Dropout) and op.p > 0.0 for op in ops)
        self.thread_invariant = all(
            isinstance(op, (_Linear, _ReLU, _Identity, _Reshape)) or (isinstance(op, _Dropout) and op.p == 0.0) for op in ops
        )
        # A layer may write a weight's gradient straight into the gradient buffer (or fuse the
        # SGD step) only when that weight is used once; else autograd sums the contributions.
        self._direct = {n for n, c in uses.items() if c == 1 and n in self.slots}

    def _forward(self, ctx: _Ctx, x: torch.Tensor) -> torch.Tensor:
        a = _Act(x, grouped=False)
        for op in self.ops:
            a = op(a, ctx)
        return _client_major(a, ctx)

    def _param_fn(self, params: dict[str, torch.Tensor], state: torch.Tensor) -> Callable[[str], torch.Tensor]:
        k = state.shape[0]

        def param(name: str) -> torch.Tensor:
            p = params.get(name)
            if p is not None:
                return p
            e = self._entries[name]  # a non-trainable parameter: the state rows hold it
            return state[:, e.offset : e.stop].view(k, *e.shape)

        return param

    def step(
        self,
        params: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        state: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        counts: torch.Tensor,
        count_list: list[int],
        loss: str,
        gen: torch.Generator,
        sgd_lr: float | None = None,
    ) -> torch.Tensor:
        k, b = x.shape[0], x.shape[1]
        compute_dtype = autocast_dtype(x.device.type)
        # Leaves alias the parameter buffers but count versions on their own: the fused SGD
        # step writes a weight during backward, which must not invalidate other saved weights.
        leaves = {n: _alias(p).requires_grad_(True) for n, p in params.items()}
        min_count = min(count_list)
        mask = None
        if min_count < b:
            mask = (torch.arange(b, device=x.device) < counts.unsqueeze(1)).to(state.dtype)
        ctx = _Ctx(
            k,
            b,
            self._param_fn(leaves, state),
            lambda name: None if name not in self._direct else grads[name] if sgd_lr is None else params[name],
            sgd_lr,
            state,
            mask,
            counts,
            min_count,
            gen,
            compute_dtype,
        )
        with torch.enable_grad():
            out = self._forward(ctx, x)
            if out.dtype != state.dtype:  # mixed precision: the loss from float32 logits
                out = out.to(state.dtype)
            per = per_sample_loss(loss, out.reshape(k * b, *out.shape[2:]), y.reshape(k * b, *y.shape[2:])).view(k, b)
            losses = per.mean(1) if mask is None else (per * mask).sum(1) / counts
            with torch.autocast(x.device.type, enabled=False):  # backward in the forward's dtypes
                computed = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
        for name, g in zip(leaves, computed, strict=True):
            if g is None:  # its layer applied the fused SGD step
                continue
            if sgd_lr is not None:
                params[name].add_(g, alpha=-sgd_lr)
            elif g.data_ptr() != grads[name].data_ptr():
                grads[name].copy_(g)
        return losses.detach()

    def activation_numel(self, sample_shape: tuple[int, ...], spec: ParamSpec) -> int:
        """Elements of all layer outputs for ONE sample (for the chunk-size estimate)."""
        return self._walk(sample_shape, spec)[0]

    def macs_per_sample(self, sample_shape: tuple[int, ...], spec: ParamSpec) -> int:
        """Multiply-accumulates of ONE sample's forward pass through the Linear and Conv2d layers.

        A layer's weight meets each output position once: (weight elements) x (output elements
        per sample / output channels). A training step costs about three times this per sample.
        """
        return self._walk(sample_shape, spec)[1]

    def _walk(self, sample_shape: tuple[int, ...], spec: ParamSpec) -> tuple[int, int]:
        """One sample (of 2 clients x 2 samples) through the ops: (activation elements, MACs)."""
        state = spec.empty().unsqueeze(0).repeat(2, 1)
        params = {n: torch.zeros(2, *s.shape, dtype=spec.dtype) for n, s in self.slots.items()}
        counts = torch.full((2,), 2.0, dtype=spec.dtype)
        ctx = _Ctx(2, 2, self._param_fn(params, state), lambda _: None, None, state, None, counts, 2, torch.Generator())
        a = _Act(torch.zeros(2, 2, *sample_shape, dtype=spec.dtype), grouped=False)
        total = macs = 0
        with torch.no_grad():
            for op in self.ops:
                a = op(a, ctx)
                out = a.t.numel() // 4
                total += out
                if isinstance(op, (_Linear, _Conv2d)):
                    w = self.slots[op.prefix + "weight"]
                    macs += w.numel * (out // w.shape[0])
        return total, macs


# ------------------------------------------------------------------- vmap program
class VmapProgram(LockstepProgram):
    """``torch.func``: ``vmap`` over clients of ``grad_and_value`` of the model's mean loss."""

    kind = "vmap"

    def __init__(self, model: nn.Module, spec: ParamSpec) -> None:
        buffers = [n for n, _ in model.named_buffers()]
        if buffers:
            raise UnsupportedModel(f"torch.func training of models with buffers ({buffers}) is not exact")
        self.model = model.train()
        self._consts = [e for e in spec.entries if not e.trainable]
        self._dtype = spec.dtype
        self._fns: dict[tuple, Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]] = {}

    def _fn(
        self, loss: str, device_type: str = "cpu", compute_dtype: torch.dtype | None = None
    ) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]:
        key = (loss, device_type, compute_dtype)
        fn = self._fns.get(key)
        if fn is None:
            loss_fn = get_loss(loss)
            model, dtype = self.model, self._dtype

            def client_loss(
                params: dict[str, torch.Tensor], consts: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
            ) -> torch.Tensor:
                if compute_dtype is None:
                    return loss_fn(functional_call(model, (params, consts), (x,)), y)
                # Mixed precision: the forward under autocast, the loss from float32 outputs.
                with torch.autocast(device_type, dtype=compute_dtype, cache_enabled=False):
                    out = functional_call(model, (params, consts), (x,))
                return loss_fn(out.to(dtype), y)

            fn = vmap(grad_and_value(client_loss), in_dims=(0, None, 0, 0), randomness="different")
            self._fns[key] = fn
        return fn

    def step(
        self,
        params: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        state: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        counts: torch.Tensor,
        count_list: list[int],
        loss: str,
        gen: torch.Generator,
        sgd_lr: float | None = None,
    ) -> torch.Tensor:
        device_type = x.device.type
        fn = self._fn(loss, device_type, autocast_dtype(device_type))
        k = x.shape[0]
        consts = {e.name: state[0, e.offset : e.stop].view(e.shape) for e in self._consts}
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(count_list):
            groups.setdefault(c, []).append(i)
        losses = torch.empty(k, dtype=state.dtype, device=state.device)
        # Clients grouped by real batch size: no padding, so even batch-coupled models are exact.
        # Autocast is off around the transforms: ``client_loss`` turns it on for the forward only.
        with torch.autocast(device_type, enabled=False):
            self._grouped_steps(fn, params, grads, consts, x, y, groups, losses, k)
        if sgd_lr is not None:
            for n, p in params.items():
                p.add_(grads[n], alpha=-sgd_lr)
        return losses

    @staticmethod
    def _grouped_steps(
        fn: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]],
        params: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        consts: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        groups: dict[int, list[int]],
        losses: torch.Tensor,
        k: int,
    ) -> None:
        for c, rows in groups.items():
            if len(rows) == k:
                computed, values = fn(params, consts, x[:, :c], y[:, :c])
                for n, g in computed.items():
                    grads[n].copy_(g)
                losses.copy_(values)
                continue
            index = torch.tensor(rows, device=losses.device)
            sub = {n: p[index] for n, p in params.items()}
            computed, values = fn(sub, consts, x[index, :c], y[index, :c])
            for n, g in computed.items():
                grads[n][index] = g
            losses[index] = values
