"""Int8 and fp16 models for devices, and a compact file format that stores zeros as bits.

* **int8** (post-training, per-tensor symmetric, weights only: q = round(w / s), s = max|w| / 127,
  zero stays zero): Linear layers run as PyTorch's dynamically quantized Linear
  (``torch.ao.nn.quantized.dynamic``: int8 weights, activations quantized per batch, int8
  GEMM); Conv2d weights are stored as int8 and dequantized at load (the McMahan CNN's convs
  hold 3% of its weights). No calibration data is needed for dynamic quantization; static
  activation quantization of the convolutions is not done (``torch.ao.quantization`` is
  deprecated in torch 2.13 in favour of torchao, which is not a dependency here).
* **fp16**: every floating tensor stored in half precision; the model runs in float16 with
  float32 inputs and outputs cast at its edges.
* **The file** (``fedloom-cut/1``, safetensors): a *cut state* — the state_dict with each
  weight optionally int8 (``<name>`` int8 and ``<name>::scale``) — where, with ``sparse``,
  every tensor of two or more dimensions is stored as a bitmap of its nonzeros
  (``<name>::bitmap``, 1 bit per entry) and the nonzero values (``<name>::values``). At 90%
  sparsity with int8 a weight costs 0.1 + 1/8 byte instead of 4. The metadata holds the
  shapes, the quantization and what the model is (run, version, task). :func:`load_cut`
  rebuilds exactly the module :func:`build_model_from_cut` makes from the same state.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedloom.core.bits import pack, packed_len, unpack
from fedloom.core.errors import ConfigError

__all__ = ["CUT_FORMAT", "Quantize", "build_model_from_cut", "cut_state", "load_cut", "save_cut"]

CUT_FORMAT = "fedloom-cut/1"
Quantize = Literal["none", "int8", "fp16"]
_QUANTIZABLE = (nn.Linear, nn.Conv2d)


def _check(quantize: str) -> None:
    if quantize not in ("none", "int8", "fp16"):
        raise ConfigError(f"must be none, int8 or fp16, got {quantize!r}", key="quantize")


def cut_state(model: nn.Module, quantize: Quantize = "none") -> dict[str, torch.Tensor]:
    """The model's state as stored: float32, fp16, or int8 weights with a ``::scale`` each."""
    _check(quantize)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if quantize == "fp16":
        return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    if quantize == "int8":
        for name, m in model.named_modules():
            if isinstance(m, _QUANTIZABLE):
                key = f"{name}.weight" if name else "weight"
                w = state[key].float()
                scale = float(w.abs().max()) / 127.0 or 1.0
                state[key] = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
                state[f"{key}::scale"] = torch.tensor(scale, dtype=torch.float32)
    return state


class _Half(nn.Module):
    """Runs a float16 module on float32 inputs (cast in and out)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.half()).float()


def _fit(skeleton: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Resize the skeleton's Linear / Conv2d / BatchNorm1d layers to the stored shapes (structured pruning)."""
    for name, m in list(skeleton.named_modules()):
        prefix = f"{name}." if name else ""
        w = state.get(f"{prefix}weight")
        new: nn.Module | None = None
        if isinstance(m, nn.Linear) and w is not None and tuple(w.shape) != tuple(m.weight.shape):
            new = nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        elif isinstance(m, nn.Conv2d) and w is not None and tuple(w.shape) != tuple(m.weight.shape):
            new = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation, m.groups,  # type: ignore[arg-type]
                            bias=m.bias is not None)  # fmt: skip
        elif isinstance(m, nn.BatchNorm1d):
            rm = state.get(f"{prefix}running_mean")
            if rm is not None and rm.numel() != m.num_features:
                new = nn.BatchNorm1d(rm.numel(), eps=m.eps, momentum=m.momentum, affine=m.affine)
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(skeleton.get_submodule(parent) if parent else skeleton, child, new)


def build_model_from_cut(skeleton: nn.Module, state: Mapping[str, torch.Tensor], quantize: Quantize) -> nn.Module:
    """The runnable (eval-mode) module of a cut state; ``skeleton`` is a fresh module of the architecture."""
    _check(quantize)
    model = copy.deepcopy(skeleton)
    _fit(model, state)
    floats = {k: v for k, v in state.items() if "::" not in k}
    if quantize == "int8":
        floats = {k: (v.float() * state[f"{k}::scale"] if f"{k}::scale" in state else v) for k, v in floats.items()}
    if quantize == "fp16":
        model = model.half()
    model.load_state_dict(floats, strict=True)
    model.eval()
    if quantize == "fp16":
        return _Half(model).eval()
    if quantize == "int8":
        import torch.ao.nn.quantized.dynamic as nnqd

        for name, m in list(model.named_modules()):
            if isinstance(m, nn.Linear):
                key = f"{name}.weight" if name else "weight"
                with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors (still supported)
                    warnings.simplefilter("ignore")
                    q = nnqd.Linear(m.in_features, m.out_features, bias_=m.bias is not None, dtype=torch.qint8)
                    qw = torch._make_per_tensor_quantized_tensor(state[key], float(state[f"{key}::scale"]), 0)
                    q.set_weight_bias(qw, None if m.bias is None else m.bias.detach().float())
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def save_cut(
    path: str | Path, state: Mapping[str, torch.Tensor], *, quantize: Quantize, sparse: bool, metadata: Mapping[str, Any]
) -> int:
    """Write a cut state (bitmaps for tensors of 2+ dimensions with ``sparse``); returns the file's size in bytes."""
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, t in state.items():
        t = t.contiguous()
        if sparse and t.dim() >= 2:
            flat = t.reshape(-1)
            nz = flat != 0
            tensors[f"{name}::bitmap"] = pack(nz.to(torch.uint8).unsqueeze(0), 1)[0].clone()
            tensors[f"{name}::values"] = flat[nz].clone()
            shapes[name] = list(t.shape)
        else:
            tensors[name] = t.clone()
    meta = {"format": CUT_FORMAT, "quantize": quantize, "sparse": json.dumps(shapes), "info": json.dumps(dict(metadata))}
    save_file(tensors, str(path), metadata=meta)
    return Path(path).stat().st_size


def load_cut(path: str | Path, skeleton_fn: Callable[[], nn.Module]) -> tuple[nn.Module, dict[str, Any]]:
    """The module saved by :func:`save_cut` and its ``info`` metadata; :class:`ConfigError` if it is not one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != CUT_FORMAT:
        raise ConfigError(f"{path} is not a {CUT_FORMAT} file (format {meta.get('format')!r})", key="model")
    raw = load_file(str(path))
    shapes: dict[str, list[int]] = json.loads(meta["sparse"])
    state: dict[str, torch.Tensor] = {k: v for k, v in raw.items() if not k.endswith(("::bitmap", "::values"))}
    for name, shape in shapes.items():
        n = 1
        for d in shape:
            n *= d
        bits = raw[f"{name}::bitmap"]
        if bits.numel() != packed_len(n, 1):
            raise ConfigError(f"{path}: {name}'s bitmap does not fit its shape {shape}", key="model")
        where = unpack(bits, 1, n).bool()
        vals = raw[f"{name}::values"]
        if int(where.sum()) != vals.numel():
            raise ConfigError(f"{path}: {name} has {vals.numel()} values for {int(where.sum())} set bits", key="model")
        dense = torch.zeros(n, dtype=vals.dtype)
        dense[where] = vals
        state[name] = dense.reshape(shape)
    quantize = meta["quantize"]
    return build_model_from_cut(skeleton_fn(), state, quantize), json.loads(meta["info"])  # type: ignore[arg-type]
