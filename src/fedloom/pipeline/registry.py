"""Stages by name: the one table that maps a recipe's name to its class.

Entries are ``"module:Class"`` strings imported on first use, so this package needs no
import of the packages that define stages (compression, privacy, secure aggregation), the
import graph stays acyclic, and a client process builds exactly the stage a recipe names.
:func:`build_stage` turns a :class:`~fedloom.core.types.ComponentSpec` (or a name and
options, as a TOML ``[[pipeline]]`` entry gives them) into a stage; an unknown name or
option, or a bad value, is one :class:`~fedloom.core.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from fedloom.core.errors import ConfigError
from fedloom.core.types import ComponentSpec
from fedloom.pipeline.base import Stage

__all__ = ["STAGES", "build_stage", "list_stages", "stage_class"]

STAGES: dict[str, str] = {
    "weight_examples": "fedloom.pipeline.weighting:ExampleWeighting",
    "weight_uniform": "fedloom.pipeline.weighting:UniformWeighting",
    "norm_bound": "fedloom.pipeline.bounding:NormBound",
    "fp16": "fedloom.compress.cast:Float16",
    "bf16": "fedloom.compress.cast:BFloat16",
    "qsgd": "fedloom.compress.qsgd:QSGD",
    "topk": "fedloom.compress.topk:TopK",
    "sparse": "fedloom.compress.sparse:Sparse",
    "dp_central": "fedloom.privacy.central:CentralDP",
    "dp_local": "fedloom.privacy.local:LocalDP",
    "dp_sample": "fedloom.privacy.sample:SampleDP",
    "dp_distributed": "fedloom.privacy.distributed:DistributedDP",
}
"""Name -> ``"module:Class"`` of every stage (read-only by convention)."""

_CACHE: dict[str, type[Stage]] = {}


def list_stages() -> list[str]:
    return sorted(STAGES)


def stage_class(name: str, *, key: str = "pipeline.name") -> type[Stage]:
    """The class registered as ``name``."""
    cls = _CACHE.get(name)
    if cls is not None:
        return cls
    target = STAGES.get(name) if isinstance(name, str) else None
    if target is None:
        raise ConfigError(f"unknown stage {name!r}; known: {', '.join(list_stages())}", key=key)
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    _CACHE[name] = cls
    return cls


def build_stage(spec: ComponentSpec | str, options: Mapping[str, Any] | None = None, *, key: str = "pipeline") -> Stage:
    """The stage a recipe (or a name and its options) describes, validated."""
    if isinstance(spec, ComponentSpec):
        name, opts = spec.name, spec.kwargs
    else:
        name, opts = spec, dict(options or {})
    cls = stage_class(name, key=f"{key}.name")
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for k in opts:
        if k not in fields:
            raise ConfigError(
                f"unknown option of stage {name!r} (accepted: {', '.join(sorted(fields)) or 'none'})", key=f"{key}.{k}"
            )
    try:
        return cls(**opts)
    except ConfigError as exc:  # a stage names its own option; prefix where it sits in the config
        raise ConfigError(exc.detail, key=f"{key}.{exc.key}" if exc.key else key) from None
    except TypeError as exc:
        raise ConfigError(str(exc), key=key) from None
