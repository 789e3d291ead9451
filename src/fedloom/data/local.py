"""A data holder's own files: ``.npz`` archives with ``x_train``, ``y_train`` and optionally
``x_test``, ``y_test`` (the format ``fedloom client --data FILE.npz`` reads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedloom.core.errors import DataError
from fedloom.data.base import ClientData, Split, TaskSpec

__all__ = ["load_npz", "save_npz"]


def _split(arrays: np.lib.npyio.NpzFile, prefix: str, task: TaskSpec | None, path: Path) -> Split | None:
    kx, ky = f"x_{prefix}", f"y_{prefix}"
    if kx not in arrays.files and ky not in arrays.files:
        return None
    if kx not in arrays.files or ky not in arrays.files:
        raise DataError(f"{path}: has {kx if kx in arrays.files else ky} but not its pair")
    x = torch.from_numpy(np.ascontiguousarray(arrays[kx], dtype=np.float32))
    y_np = arrays[ky]
    if task is not None and task.kind == "classification":
        if not np.issubdtype(y_np.dtype, np.integer):
            raise DataError(f"{path}: {ky} must hold integer class labels for a classification task")
        y = torch.from_numpy(y_np.astype(np.int64))
    else:
        y = torch.from_numpy(np.asarray(y_np, dtype=np.float32))
    if task is not None and tuple(x.shape[1:]) != tuple(task.input_shape):
        raise DataError(f"{path}: {kx} has examples of shape {tuple(x.shape[1:])}, the task expects {task.input_shape}")
    return Split(x, y)


def load_npz(path: str | Path, task: TaskSpec | None = None) -> ClientData:
    """Load a client's data; with ``task``, check shapes and label types against it."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as arrays:
            train = _split(arrays, "train", task, p)
            test = _split(arrays, "test", task, p)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {p}: {exc}") from None
    if train is None or len(train) == 0:
        raise DataError(f"{p}: needs non-empty x_train and y_train arrays")
    return ClientData(train=train, test=test, site=p.stem)


def save_npz(path: str | Path, data: ClientData) -> None:
    """Write ``data`` in the format :func:`load_npz` reads."""
    arrays = {"x_train": data.train.x.numpy(), "y_train": data.train.y.numpy()}
    if data.test is not None:
        arrays.update(x_test=data.test.x.numpy(), y_test=data.test.y.numpy())
    np.savez(Path(path), **arrays)
