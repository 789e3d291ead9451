"""Shared by the peer-framework throughput scripts (Flower, pfl-research).

These scripts run in their OWN virtual environments (see ``bench/throughput.py
--setup-peers``), where fedloom is not installed. To train exactly the same thing as the
fedloom rows they take, from a data directory that ``bench/throughput.py`` writes:

* ``x.npy`` / ``y.npy`` — fedloom's MNIST (``mnist_federated(num_clients=100,
  partition="iid", seed=0)``, normalized), the clients' rows concatenated in client order;
* ``offsets.npy`` — client ``i`` owns rows ``offsets[i]:offsets[i+1]``;
* ``init_<model>.pt`` — fedloom's initial model (``build_model(model, MNIST_TASK, seed=0)``);

and the model classes from fedloom's own source file ``src/fedloom/models/mnist.py``, loaded
by path (it imports only torch), so the architecture is fedloom's, not a copy.

:func:`local_train` is fedloom's reference local training (``fedloom.client.training``):
one seeded ``randperm`` per epoch, batches of ``batch_size`` with a smaller last one,
truncated at ``max_steps``, plain SGD (fresh each round), mean cross-entropy.

Only numpy and torch are imported here: the module is imported by Ray actors too.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_MODELS: dict[str, Any] = {}
_SCRATCH: dict[str, nn.Module] = {}
_DATA: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _models_module(src: str) -> Any:
    mod = _MODELS.get(src)
    if mod is None:
        spec = importlib.util.spec_from_file_location("_fedloom_models_mnist", src)
        assert spec is not None and spec.loader is not None, src
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        _MODELS[src] = mod
    return mod


def build_model(name: str, models_src: str) -> nn.Module:
    """fedloom's McMahan ``2nn`` or ``cnn`` (10 classes), from fedloom's source file."""
    mod = _models_module(models_src)
    cls = {"2nn": mod.McMahan2NN, "cnn": mod.McMahanCNN}[name]
    return cls(10)


def scratch_model(name: str, models_src: str) -> nn.Module:
    """One reusable model per process and architecture (its weights are overwritten each round)."""
    model = _SCRATCH.get(name)
    if model is None:
        model = _SCRATCH[name] = build_model(name, models_src)
    return model


def init_state(data_dir: str, name: str) -> dict[str, torch.Tensor]:
    """fedloom's initial weights for ``name`` (written by bench/throughput.py)."""
    return torch.load(Path(data_dir) / f"init_{name}.pt", weights_only=True)


def _arrays(data_dir: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arr = _DATA.get(data_dir)
    if arr is None:  # memory-mapped: every process of a run shares the page cache
        d = Path(data_dir)
        arr = (np.load(d / "x.npy", mmap_mode="r"), np.load(d / "y.npy", mmap_mode="r"), np.load(d / "offsets.npy"))
        _DATA[data_dir] = arr
    return arr


def num_clients(data_dir: str) -> int:
    return len(_arrays(data_dir)[2]) - 1


def client_data(data_dir: str, cid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``cid``'s training examples ``(x float32 (n, 784), y int64 (n,))``, in memory."""
    x, y, off = _arrays(data_dir)
    a, b = int(off[cid]), int(off[cid + 1])
    return torch.from_numpy(np.array(x[a:b])), torch.from_numpy(np.array(y[a:b]))


def batch_order(n: int, epochs: int, batch_size: int, max_steps: int | None, seed: int) -> list[torch.Tensor]:
    """fedloom's ``batch_order``: one seeded randperm per epoch, truncated at ``max_steps``."""
    gen = torch.Generator().manual_seed(seed % (2**63))
    batches: list[torch.Tensor] = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        batches.extend(perm[i : i + batch_size] for i in range(0, n, batch_size))
    return batches if max_steps is None else batches[:max_steps]


def local_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    max_steps: int | None,
    seed: int,
) -> tuple[int, float]:
    """Plain SGD on ``(x, y)`` from the model's current weights; ``(samples trained, mean loss)``."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    loss_sum = torch.zeros((), dtype=torch.float64)
    seen = 0
    for idx in batch_order(len(y), epochs, batch_size, max_steps, seed):
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        loss_sum += loss.detach().to(torch.float64) * len(idx)
        seen += len(idx)
    return seen, float(loss_sum) / max(seen, 1)


def round_seed(rnd: int, cid: int) -> int:
    """The shuffling seed of client ``cid`` in round ``rnd`` (any fixed function will do)."""
    return (rnd * 1_000_003 + cid) % (2**31 - 1)


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def versions() -> dict[str, str]:
    import platform

    return {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()}
