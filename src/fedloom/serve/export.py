"""Export a trained model for a device or another runtime (``fedloom export``).

One version of one run (a store's checkpoint, or a run directory's final model), optionally
cut down first — structured pruning (``prune`` = the fraction of neurons / channels removed
per layer, :mod:`fedloom.cutting.structured`) and quantization (``int8`` / ``fp16``,
:mod:`fedloom.cutting.quantize`) — written as:

* ``safetensors`` — fedloom's cut format (``fedloom-cut/1``; with ``sparse`` the zeros of a
  pruned model are stored as bits), loadable with :func:`fedloom.cutting.quantize.load_cut`;
* ``onnx`` — via ``torch.onnx.export`` (the dynamo exporter, a dynamic batch axis), then run
  with onnxruntime on a test batch and compared with torch: the export fails if they differ
  by more than 1e-4 (relative to the output's scale). Float32 only: torch's dynamically
  quantized Linear has no ONNX export (quantize with onnxruntime's own tools instead);
* ``torchscript`` — ``torch.jit.trace`` (int8 and fp16 included), reloaded and compared.

Every file carries what it holds: run, version, task (input shape, feature names, kind),
architecture, the cuts applied (safetensors metadata, ONNX ``metadata_props``, a TorchScript
extra file ``fedloom.json``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fedloom.core.errors import ConfigError
from fedloom.cutting.quantize import Quantize, build_model_from_cut, cut_state, save_cut
from fedloom.cutting.structured import cut
from fedloom.serve.source import ModelSource, SourceError

__all__ = ["ExportReport", "Format", "export_model"]

Format = Literal["safetensors", "onnx", "torchscript"]
log = logging.getLogger("fedloom.export")


@dataclass(frozen=True)
class ExportReport:
    """What was written: the file, its size, the model's parameter count, the runtime check."""

    path: Path
    bytes: int
    dense_bytes: int
    params: int
    max_abs_diff: float | None = None
    kept_units: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)


def _batch(models: Any, n: int = 16) -> torch.Tensor:
    try:
        test = models.dataset.server_test
        if test is not None and len(test):
            return test.x[:n].float().reshape(-1, *models.task.input_shape)  # the task's shape, as the service sends
    except Exception:  # noqa: BLE001 - a random batch is as good for comparing two runtimes
        pass
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *models.task.input_shape, generator=g)


def _check(ref: torch.Tensor, got: torch.Tensor, what: str) -> float:
    diff = float((ref - got).abs().max())
    if diff > 1e-4 * max(1.0, float(ref.abs().max())):
        raise ConfigError(f"{what} differs from torch by {diff:.3g}", key="format")
    return diff


def export_model(
    source: ModelSource,
    out: str | Path,
    *,
    run: str | None = None,
    version: int | str = "latest",
    fmt: Format = "safetensors",
    prune: float = 0.0,
    quantize: Quantize = "none",
    sparse: bool = False,
) -> ExportReport:
    """Write ``version`` of ``run`` (default: the newest run) to ``out``; see the module docstring."""
    if fmt not in ("safetensors", "onnx", "torchscript"):
        raise ConfigError(f"must be safetensors, onnx or torchscript, got {fmt!r}", key="format")
    if quantize not in ("none", "int8", "fp16"):
        raise ConfigError(f"must be none, int8 or fp16, got {quantize!r}", key="quantize")
    if fmt == "onnx" and quantize != "none":
        raise ConfigError("ONNX export is float32 only (torch's quantized Linear has no ONNX export)", key="quantize")
    if sparse and fmt != "safetensors":
        raise ConfigError("--sparse is a property of fedloom's safetensors format", key="sparse")
    name = run if run is not None else source.default_run()
    versions = [v.version for v in source.versions(name)]
    if not versions:
        raise SourceError(f"run {name!r} has no checkpoint yet")
    chosen = versions[-1] if version == "latest" else version
    if chosen not in versions:
        raise SourceError(f"run {name!r} has no version {chosen}; it has {versions}")
    models = source.run(name)
    model = models.load(int(chosen))
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    kept: dict[str, tuple[int, int]] = {}
    if prune > 0.0:
        _, model, rep = cut(model, prune)
        kept = rep.kept
    state = cut_state(model, quantize)
    runnable = build_model_from_cut(models.new_model(), state, quantize)
    info = {
        "run": name,
        "version": int(chosen),
        "task": dataclasses.asdict(models.task),
        "model": {"name": models.config.model.name, "options": models.config.model.options()},
        "prune": prune,
        "kept_units": {k: list(v) for k, v in kept.items()},
        "quantize": quantize,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = _batch(models)
    with torch.inference_mode():
        ref = runnable(x).float()
    diff: float | None = None
    if fmt == "safetensors":
        save_cut(out, state, quantize=quantize, sparse=sparse, metadata=info)
        from fedloom.cutting.quantize import load_cut

        loaded, _ = load_cut(out, models.new_model)
        with torch.inference_mode():
            diff = _check(ref, loaded(x).float(), "the reloaded file")
    elif fmt == "onnx":
        diff = _export_onnx(runnable, x, ref, out, info)
    else:
        diff = _export_torchscript(runnable, x, ref, out, info)
    params = sum(p.numel() for p in model.parameters())
    return ExportReport(out, out.stat().st_size, dense_bytes, params, diff, kept)


def _export_onnx(model: nn.Module, x: torch.Tensor, ref: torch.Tensor, out: Path, info: dict[str, Any]) -> float:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("needs onnx and onnxruntime: pip install 'fedloom[export]'", key="format") from None
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        torch.onnx.export(model, (x,), str(out), input_names=["input"], output_names=["output"],
                          dynamic_shapes=({0: batch},), dynamo=True, verbose=False)  # fmt: skip
    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "fedloom", json.dumps(info)
    onnx.save(proto, str(out))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    return _check(ref, got.reshape(ref.shape), "onnxruntime's output")


def _export_torchscript(model: nn.Module, x: torch.Tensor, ref: torch.Tensor, out: Path, info: dict[str, Any]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={"fedloom.json": json.dumps(info)})
        reloaded = torch.jit.load(str(out))
    with torch.inference_mode():
        return _check(ref, reloaded(x).float(), "the reloaded TorchScript")
