"""Checkpoint files: a run's server state and client states as one safetensors file, written durably.

A checkpoint holds the :class:`~fedloom.strategies.base.ServerState` tensors, the engine's
client states under the ``clients/`` prefix, and in its metadata the format, the run's name
and config hash, the round, the :class:`~fedloom.core.params.ParamSpec` JSON and the state's
non-tensor ``meta`` as JSON (:meth:`~fedloom.strategies.base.ServerState.meta_json`).

:func:`atomic_write` makes a file appear complete and durable or not at all (temporary file
in the final directory, fsync, rename, fsync of the directory); :func:`mkdir_durable`
creates directories whose entries survive a power loss. The :class:`~fedloom.store.Store`
relies on both for its write order.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedloom.core.errors import SpecError, StrategyError
from fedloom.core.params import ParamSpec
from fedloom.strategies.base import ServerState

__all__ = [
    "CHECKPOINT_FORMAT",
    "CLIENT_PREFIX",
    "Checkpoint",
    "UnusableCheckpoint",
    "atomic_write",
    "decode_checkpoint",
    "encode_checkpoint",
    "fsync_dir",
    "mkdir_durable",
]

CHECKPOINT_FORMAT = "fedloom-checkpoint/1"
CLIENT_PREFIX = "clients/"
_SERVER_META = "server_meta"


class Checkpoint(NamedTuple):
    """A loaded checkpoint: the server state and the engine's client states."""

    state: ServerState
    client_states: dict[str, torch.Tensor]


class UnusableCheckpoint(Exception):
    """A checkpoint's bytes are malformed or do not belong to the run (the store falls back)."""


def fsync_dir(path: Path) -> None:
    """Make ``path``'s entries durable (a no-op on Windows, where directories cannot be fsynced)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mkdir_durable(path: Path) -> None:
    """Create ``path`` and any missing parents, fsyncing each parent so the entries persist."""
    if path.is_dir():
        return
    mkdir_durable(path.parent)
    path.mkdir(exist_ok=True)
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent/old or complete and durable."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("no metadata mapping in the header")
    return meta


def _standalone(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy with its own storage (safetensors refuses shared storage)."""
    return t.detach().to("cpu", copy=True).contiguous()


def encode_checkpoint(
    state: ServerState,
    client_states: Mapping[str, torch.Tensor],
    spec: ParamSpec,
    *,
    run: str,
    config_hash: str,
) -> bytes:
    """The safetensors bytes of a checkpoint of ``state`` (see the module docstring)."""
    spec.check_vector(state.params)
    tensors = {k: _standalone(v) for k, v in state.to_tensors().items()}
    tensors.update({CLIENT_PREFIX + k: _standalone(v) for k, v in client_states.items()})
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "run": run,
        "round": str(state.round),
        "config_hash": config_hash,
        "spec": spec.to_json(),
        _SERVER_META: state.meta_json(),
    }
    return save_safetensors(tensors, metadata=metadata)


def decode_checkpoint(data: bytes, *, config_hash: str) -> tuple[Checkpoint, ParamSpec]:
    """The checkpoint in ``data`` and its model layout; :class:`UnusableCheckpoint` if malformed or foreign.

    A checkpoint written before ``meta`` was saved loads with an empty ``meta``.
    """
    try:
        meta = _metadata(data)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise UnusableCheckpoint(f"unknown format {meta.get('format')!r}")
        if meta.get("config_hash") != config_hash:
            raise UnusableCheckpoint("written for a different config")
        spec = ParamSpec.from_json(meta["spec"])
        # clone: the loaded tensors are views into the immutable bytes just read
        tensors = {k: v.clone() for k, v in load_safetensors(data).items()}
        clients = {k[len(CLIENT_PREFIX) :]: v for k, v in tensors.items() if k.startswith(CLIENT_PREFIX)}
        state = ServerState.from_tensors({k: v for k, v in tensors.items() if not k.startswith(CLIENT_PREFIX)})
        state = state.with_meta_json(meta.get(_SERVER_META))
        spec.check_vector(state.params)
    except (KeyError, ValueError, SafetensorError, SpecError, StrategyError) as exc:
        raise UnusableCheckpoint(f"malformed: {exc}") from None
    return Checkpoint(state, clients), spec
