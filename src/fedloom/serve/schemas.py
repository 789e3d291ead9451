"""What a predict request holds, per task: input specs, generated pydantic models, readable errors.

A run's :class:`InputSpec` (from :func:`input_spec`) says which inputs a predict request for
it may carry and how the service turns them into the model's input tensor. The service takes
values **in the dataset's own units** and replays the data pipeline's scaling itself:

* the scenarios (hospital, fraud, equipment): ``rows`` of F values in the generator's
  feature order, or ``records`` keyed by feature name (every name required, no other), as
  the scenario generates them before scaling (age in years, log(1 + amount), sensor window
  statistics, ...). The dataset standardizes them with the scenario's fixed ``REFERENCE``
  (``(x - center) / scale``, one pair per feature, 0/1 columns as is); the service applies
  :func:`fedloom.data.scenarios._common.standardize` with the same values, so a row gives
  exactly the prediction the model makes on the dataset's tensor.
* MNIST: ``images`` (28 lists of 28 pixels, or one flat list of 784) or ``rows`` of 784
  pixels, in [0, 1] as the bundled file holds them; the service applies the dataset's
  ``(x - 0.1307) / 0.3081`` when the run's data was normalized (the default).
* ``"scaled": true``: the values are already as the model takes them (the dataset's
  tensors: standardized features, normalized pixels) and are passed on unchanged.

:func:`request_model` builds one pydantic model per spec, so ``/openapi.json`` shows the real
schema (feature names and count, the scaling of each feature, image size, batch limit);
:func:`describe_errors` turns pydantic's errors into one reason and a status (413 for a batch
over the limit, else 422); :func:`model_input` gives the model's input tensor.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, create_model, model_validator

from fedloom.core.errors import FedloomError
from fedloom.data.base import TaskSpec
from fedloom.data.mnist_federated import MNIST_MEAN, MNIST_STD
from fedloom.data.scenarios import SCENARIOS
from fedloom.data.scenarios._common import standardize
from fedloom.serve.source import RunModels

__all__ = [
    "InputError",
    "InputSpec",
    "PredictResponse",
    "describe_errors",
    "input_spec",
    "model_input",
    "request_model",
    "task_info",
]

INPUT_KEYS = ("rows", "records", "images")


class InputError(FedloomError, ValueError):
    """A predict request the model cannot take; ``status`` is the HTTP status to answer."""

    def __init__(self, reason: str, status: int = 422) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class InputSpec:
    """What a run's model takes and how a request's values become its input.

    ``reference``: per-feature ``(center, scale)`` the dataset standardizes with (None: no
    scaling); ``pixels``: ``(mean, std)`` of an image dataset's normalization (None: none);
    ``pixel_range``: the closed range of raw pixel values; ``image``: ``(height, width)``
    when ``images`` are accepted.
    """

    dataset: str
    input_shape: tuple[int, ...]
    feature_names: tuple[str, ...] = ()
    reference: tuple[tuple[float, float], ...] | None = None
    image: tuple[int, int] | None = None
    pixels: tuple[float, float] | None = None
    pixel_range: tuple[float, float] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.input_shape)

    @property
    def keys(self) -> tuple[str, ...]:
        """The input keys a request may use (exactly one of them)."""
        return ("rows", "records") if self.feature_names else ("rows", "images") if self.image else ("rows",)

    def describe(self) -> dict[str, Any]:
        """The spec as ``GET /v1/models`` shows it."""
        out: dict[str, Any] = {"accepts": list(self.keys), "units": self.units()}
        if self.reference is not None:
            out["reference"] = [list(r) for r in self.reference]
        if self.pixels is not None:
            out["pixel_normalization"] = {"mean": self.pixels[0], "std": self.pixels[1]}
        if self.pixel_range is not None:
            out["pixel_range"] = list(self.pixel_range)
        if self.image is not None:
            out["image"] = list(self.image)
        return out

    def units(self) -> str:
        if self.reference is not None:
            return (f"the {self.dataset} dataset's own units (before its fixed standardization); the service computes "
                    "(value - center) / scale per feature with the dataset's reference values; "
                    "send \"scaled\": true to give standardized values instead")  # fmt: skip
        if self.pixel_range is not None:
            lo, hi = self.pixel_range
            norm = f"; the service normalizes (x - {self.pixels[0]}) / {self.pixels[1]}" if self.pixels else ""
            return f"pixel values in [{lo:g}, {hi:g}] (divide 0-255 values by 255){norm}; \"scaled\": true for normalized values"
        return "the model's input values as the dataset presents them (no scaling is applied)"


def input_spec(models: RunModels) -> InputSpec:
    """The spec of a run's model, from its dataset (built once per run; the task alone is not enough)."""
    ds = models.dataset
    task = ds.task
    numel = math.prod(task.input_shape)
    reference: tuple[tuple[float, float], ...] | None = None
    if ds.name in SCENARIOS:
        ref = getattr(importlib.import_module(SCENARIOS[ds.name].loader.__module__), "REFERENCE", None)
        if ref is not None and len(ref) == numel:
            reference = tuple((float(c), float(s)) for c, s in ref)
    image: tuple[int, int] | None = None
    pixels: tuple[float, float] | None = None
    pixel_range: tuple[float, float] | None = None
    if len(task.input_shape) >= 2:
        image = (int(task.input_shape[-2]), int(task.input_shape[-1]))
    if ds.name == "mnist":
        side = math.isqrt(numel)
        image = image or (side, side)
        pixel_range = (0.0, 1.0)
        if ds.info.get("normalize", True):
            pixels = (MNIST_MEAN, MNIST_STD)
    return InputSpec(
        dataset=ds.name,
        input_shape=tuple(task.input_shape),
        feature_names=tuple(task.feature_names),
        reference=reference,
        image=image,
        pixels=pixels,
        pixel_range=pixel_range,
    )


def task_info(task: TaskSpec, spec: InputSpec | None = None) -> dict[str, Any]:
    """A task (and what its requests take) as the service shows it."""
    info: dict[str, Any] = {
        "kind": task.kind,
        "input_shape": list(task.input_shape),
        "num_outputs": task.num_outputs,
        "target": task.target_name,
        "feature_names": list(task.feature_names),
        "metrics": list(task.metrics),
    }
    if spec is not None:
        info["input"] = spec.describe()
    return info


Value = Annotated[float, Field(strict=True, allow_inf_nan=False)]


def _feature_doc(name: str, ref: tuple[float, float] | None) -> str:
    if ref is None:
        return f"{name}, as the model takes it"
    c, s = ref
    if (c, s) == (0.0, 1.0):
        return f"{name} (passed as is: a 0/1 flag, one-hot column or unitless value)"
    return f"{name} in the dataset's units; the model sees ({name} - {c:g}) / {s:g}"


def _no_default(schema: dict[str, Any]) -> None:
    """An input key's schema: an array when given (absent, not null: the model's oneOf says which)."""
    schema.pop("default", None)
    members = [m for m in schema.pop("anyOf", []) if m.get("type") != "null"]
    if len(members) == 1:
        schema.update(members[0])


def _image_kind(v: Any) -> str:
    return "nested" if isinstance(v, list) and v and isinstance(v[0], list) else "flat"


def request_model(spec: InputSpec, *, max_rows: int, name: str | None = None) -> type[BaseModel]:
    """A pydantic model of a predict request for ``spec``: exactly one input key, at most ``max_rows`` inputs."""
    title = name or f"{spec.dataset.title().replace('_', '')}PredictRequest"
    F = spec.numel
    units = spec.units()
    batch = {"min_length": 1, "max_length": max_rows}
    fields: dict[str, Any] = {}
    row = Annotated[list[Value], Field(min_length=F, max_length=F)]
    order = f" in this order: {', '.join(spec.feature_names)}" if spec.feature_names else ""
    fields["rows"] = (
        Annotated[list[row], Field(**batch)] | None,
        Field(None, json_schema_extra=_no_default, description=f"inputs as lists of {F} values, one list per example{order}. Values: {units}."),
    )
    if spec.feature_names:
        refs: Sequence[tuple[float, float] | None] = spec.reference or [None] * F
        record = create_model(  # type: ignore[call-overload]
            title.replace("PredictRequest", "Record"),
            __config__=ConfigDict(extra="forbid"),
            __doc__=f"One example keyed by feature name: all {F} features, no other. Values: {units}.",
            **{f"f{i}": (Value, Field(alias=n, description=_feature_doc(n, r))) for i, (n, r) in enumerate(zip(spec.feature_names, refs, strict=True))},
        )  # fmt: skip
        fields["records"] = (
            Annotated[list[record], Field(**batch)] | None,
            Field(None, json_schema_extra=_no_default, description="inputs as objects keyed by feature name (every feature required, unknown names refused)"),
        )
    if spec.image is not None:
        h, w = spec.image
        nested = Annotated[list[Annotated[list[Value], Field(min_length=w, max_length=w)]], Field(min_length=h, max_length=h)]
        flat = Annotated[list[Value], Field(min_length=F, max_length=F)]
        image = Annotated[Annotated[nested, Tag("nested")] | Annotated[flat, Tag("flat")], Discriminator(_image_kind)]
        fields["images"] = (
            Annotated[list[image], Field(**batch)] | None,
            Field(None, json_schema_extra=_no_default, description=f"{h}x{w} images: {h} lists of {w} pixels each, or one flat list of {F}. Pixels: {units}."),
        )
    fields["scaled"] = (
        bool,
        Field(False, strict=True, description="true: the values are already as the model takes them (the dataset's "
              "scaled tensors) and are passed on unchanged; false (default): the dataset's own units"),
    )  # fmt: skip
    keys = spec.keys
    allowed = set(fields)

    def one_input(cls: type[BaseModel], data: Any) -> Any:
        if isinstance(data, dict):  # before the fields: the checks that matter first
            unknown = [str(k) for k in data if k not in allowed]
            if unknown:
                raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: "
                                 f"this model takes {' or '.join(keys)} (and scaled)")  # fmt: skip
            given = [k for k in keys if data.get(k) is not None]
            if len(given) != 1:
                raise ValueError(f"give exactly one of {', '.join(keys)} (got {', '.join(given) or 'none'})")
        return data

    return create_model(  # type: ignore[call-overload, no-any-return]
        title,
        __config__=ConfigDict(extra="forbid", json_schema_extra={"oneOf": [{"required": [k]} for k in keys]}),
        __doc__=f"A batch of inputs for a {spec.dataset} model: exactly one of {', '.join(keys)}, 1 to {max_rows} inputs.",
        __validators__={"one_input": model_validator(mode="before")(classmethod(one_input))},
        **fields,
    )


def _where(loc: Sequence[Any]) -> str:
    out = ""
    for i, p in enumerate(loc):
        if p in ("nested", "flat") and i >= 2 and loc[0] == "images":
            continue  # the discriminator's tag
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out


def describe_errors(errors: Sequence[dict[str, Any]], spec: InputSpec | None = None, *, limit: int = 4) -> tuple[int, str]:
    """``(status, reason)`` for pydantic ``errors``: 413 when the batch is over the limit, else 422."""
    status = 422
    reasons: list[str] = []
    names: dict[tuple[int, str], list[str]] = {}  # (record index, missing|unknown) -> feature names
    for e in errors:
        loc = tuple(p for p in e.get("loc", ()) if p != "body")
        kind, ctx = e.get("type", ""), e.get("ctx") or {}
        where = _where(loc)
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if loc[:1] == ("records",) and len(loc) == 3 and kind in ("missing", "extra_forbidden"):
            names.setdefault((int(loc[1]), "missing" if kind == "missing" else "unknown"), []).append(str(loc[2]))
            continue
        if len(loc) == 1 and loc[0] in INPUT_KEYS and kind == "too_long":
            status = 413
            msg = f"{ctx.get('actual_length', 'too many')} inputs in one request; at most {ctx.get('max_length')}"
        elif len(loc) == 1 and loc[0] in INPUT_KEYS and kind == "too_short":
            msg = f"{loc[0]} is empty"
        elif loc[:1] == ("rows",) and len(loc) == 2 and kind in ("too_short", "too_long"):
            F = spec.numel if spec else ctx.get("min_length", ctx.get("max_length"))
            msg = f"rows[{loc[1]}] has {ctx.get('actual_length', 'a wrong number of')} values; the model takes {F}"
        elif loc[:1] == ("images",) and len(loc) >= 2 and kind in ("too_short", "too_long", "list_type"):
            h, w = spec.image if spec and spec.image else ("?", "?")
            msg = f"images[{loc[1]}] is not {h}x{w}: give {h} lists of {w} pixels, or one flat list of {spec.numel if spec else '?'}"
        elif kind == "finite_number":
            msg = f"{where}: not a finite number (NaN and infinities are refused)"
        elif kind in ("float_type", "float_parsing"):
            msg = f"{where}: not a number"
        elif kind == "extra_forbidden":
            msg = f"{where}: unknown key (extra inputs are not permitted)"
        elif where:
            msg = f"{where}: {msg}"
        if msg not in reasons:
            reasons.append(msg)
    for (i, what), feats in sorted(names.items()):
        shown = ", ".join(feats[:8]) + (f" and {len(feats) - 8} more" if len(feats) > 8 else "")
        reasons.append(f"records[{i}]: {what} feature{'s' if len(feats) > 1 else ''} {shown}")
    out = reasons[:limit]
    if len(reasons) > limit:
        out.append(f"and {len(reasons) - limit} more problems")
    return status, "; ".join(out) or "invalid request"


def model_input(spec: InputSpec, req: BaseModel) -> torch.Tensor:
    """The model's input batch for a validated request (raw values scaled as the dataset scales them)."""
    kind = next(k for k in spec.keys if getattr(req, k) is not None)
    data = getattr(req, kind)
    if kind == "records":
        values = [list(r.__dict__.values()) for r in data]
    elif kind == "images":
        values = [img if not img or not isinstance(img[0], list) else [v for line in img for v in line] for img in data]
    else:
        values = data
    raw = np.asarray(values, dtype=np.float64).reshape(len(values), spec.numel)
    scaled = bool(getattr(req, "scaled", False))
    if not scaled and spec.pixel_range is not None:
        lo, hi = spec.pixel_range
        bad = np.flatnonzero(((raw < lo) | (raw > hi)).any(axis=1))
        if bad.size:
            i = int(bad[0])
            v = float(raw[i][(raw[i] < lo) | (raw[i] > hi)][0])
            raise InputError(
                f"{kind}[{i}]: pixel value {v:g} is outside [{lo:g}, {hi:g}] (divide 0-255 pixels by 255; "
                "\"scaled\": true for already normalized values)"
            )
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: refused just below
        if not scaled and spec.reference is not None:
            x = torch.from_numpy(standardize(raw, spec.reference))
        else:
            x = torch.from_numpy(raw.astype(np.float32))
            if not scaled and spec.pixels is not None:
                x = (x - spec.pixels[0]) / spec.pixels[1]
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        i, j = (int(v) for v in (~finite).nonzero()[0])
        raise InputError(f"{kind}[{i}]: value {float(raw[i, j]):g} is out of the model's float32 range once scaled")
    return x.reshape(len(values), *spec.input_shape)


class PredictResponse(BaseModel):
    """The answer of a predict request (documentation model; answers are built directly)."""

    run: str = Field(description="the run whose model answered")
    version: int = Field(description="the version (round) of the model that answered")
    target: str = Field(description="what is predicted (the task's target name)")
    kind: str = Field(description="classification, binary or regression")
    predictions: list[int | float | None] = Field(
        description="classification: the class index; binary: 0 or 1 (P >= 0.5); regression: the value in the "
        "target's units. null where the model's output is not finite"
    )
    probabilities: list[float | None] | list[list[float | None]] | None = Field(
        None, description="classification: softmax over the classes; binary: P(target = 1); absent for regression"
    )
