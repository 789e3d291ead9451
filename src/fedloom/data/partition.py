"""Partitioners: split one pooled dataset's row indices among simulated clients.

Each partitioner returns ``list[torch.Tensor]``: one int64 tensor of row indices per
client, sorted ascending, with no index given to two clients. All are deterministic given
``seed`` (NumPy's PCG64 generator).

* :func:`iid` — a random permutation cut into equal parts (sizes differ by at most one);
  McMahan et al. 2017's IID MNIST split (100 clients x 600 examples).
* :func:`shards` — McMahan et al. 2017's pathological non-IID split: sort by label, cut
  into ``num_clients * shards_per_client`` equal shards, deal each client random shards.
* :func:`dirichlet` — label skew, per class proportions over clients ~ Dir(alpha)
  (Hsu, Qi, Brown 2019; the per-class form of Yurochkin et al. 2019 / Wang et al. 2020).
* :func:`power_law` — quantity skew with IID labels: client sizes from a heavy-tailed
  lognormal law, as the synthetic and LEAF datasets of FedProx (Li et al. 2020) and
  LEAF (Caldas et al. 2018).
* :func:`natural` — one client per distinct group value (a site id, a writer id).

:func:`partition` dispatches by name.

References:
    McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of
    Deep Networks from Decentralized Data." AISTATS 2017.
    Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification." arXiv:1909.06335, 2019.
    Yurochkin et al. "Bayesian Nonparametric Federated Learning of Neural Networks." ICML 2019.
    Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith. "Federated Optimization in Heterogeneous
    Networks." MLSys 2020.
    Caldas et al. "LEAF: A Benchmark for Federated Settings." arXiv:1812.01097, 2018.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedloom.core.errors import DataError

__all__ = ["PARTITIONERS", "dirichlet", "iid", "natural", "partition", "power_law", "shards"]

ArrayLike = torch.Tensor | np.ndarray | Sequence[Any]


# ----------------------------------------------------------------------------- helpers
def _rng(seed: int) -> np.random.Generator:
    _check_int(seed, "seed", 0)
    return np.random.default_rng(int(seed))


def _check_int(value: object, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_clients(num_clients: int, n: int) -> None:
    _check_int(num_clients, "num_clients", 1)
    if num_clients > n:
        raise DataError(f"cannot give {num_clients} clients at least one example each from {n} examples")


def _as_numpy(values: ArrayLike, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        arr = values.detach().cpu().numpy()
    else:
        arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{what} must be one-dimensional, got shape {arr.shape}")
    return arr


def _labels(labels: ArrayLike) -> np.ndarray:
    arr = _as_numpy(labels, "labels")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise DataError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _to_tensors(parts: Sequence[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.sort(p).astype(np.int64, copy=False)) for p in parts]


def _split_by_sizes(perm: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return np.split(perm, np.cumsum(sizes)[:-1])


# ----------------------------------------------------------------------------- partitioners
def iid(n: int, num_clients: int, seed: int = 0) -> list[torch.Tensor]:
    """A random permutation of ``range(n)`` cut into ``num_clients`` equal parts.

    When ``num_clients`` does not divide ``n`` the first ``n % num_clients`` clients get
    one example more; every index is used exactly once.
    """
    _check_int(n, "n", 0)
    _check_clients(num_clients, n)
    perm = _rng(seed).permutation(n)
    return _to_tensors(np.array_split(perm, num_clients))


def shards(labels: ArrayLike, num_clients: int, shards_per_client: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """McMahan et al. 2017's pathological non-IID split.

    Stable-sort the examples by label, cut them into ``num_clients * shards_per_client``
    contiguous shards of equal size (sizes differ by at most one when they do not divide
    evenly), and give each client ``shards_per_client`` shards drawn at random without
    replacement. MNIST with 100 clients: 200 shards of 300, most clients see two digits.
    Every index is used exactly once. A shard spans at most two labels when no label has
    fewer examples than a shard, so a client then holds at most ``2 * shards_per_client``
    labels.
    """
    y = _labels(labels)
    _check_int(shards_per_client, "shards_per_client", 1)
    _check_clients(num_clients, y.size)
    num_shards = num_clients * shards_per_client
    if num_shards > y.size:
        raise DataError(
            f"{num_clients} clients x {shards_per_client} shards = {num_shards} shards, "
            f"but there are only {y.size} examples"
        )
    order = np.argsort(y, kind="stable")
    pieces = np.array_split(order, num_shards)
    deal = _rng(seed).permutation(num_shards).reshape(num_clients, shards_per_client)
    return _to_tensors([np.concatenate([pieces[s] for s in row]) for row in deal])


def dirichlet(
    labels: ArrayLike,
    num_clients: int,
    alpha: float = 0.5,
    seed: int = 0,
    *,
    min_size: int = 10,
    max_retries: int = 100,
) -> list[torch.Tensor]:
    """Label-skewed split: for each class, its examples go to clients in proportions ~ Dir(alpha).

    Small ``alpha`` (0.1) gives clients few classes; large ``alpha`` (100) approaches IID.
    The whole draw is repeated until every client holds at least ``min_size`` examples; after
    ``max_retries`` failed draws a :class:`DataError` says so. Every index is used exactly once.
    (Hsu et al. 2019; per-class sampling as in Yurochkin et al. 2019.)
    """
    y = _labels(labels)
    _check_clients(num_clients, y.size)
    if not (isinstance(alpha, (int, float)) and np.isfinite(alpha) and alpha > 0):
        raise DataError(f"alpha must be a finite number > 0, got {alpha!r}")
    _check_int(min_size, "min_size", 0)
    _check_int(max_retries, "max_retries", 1)
    if num_clients * min_size > y.size:
        raise DataError(f"{num_clients} clients x min_size {min_size} exceeds the {y.size} examples")
    rng = _rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(max_retries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(props)[:-1] * idx.size).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(m.size for m in merged) >= min_size:
            return _to_tensors(merged)
    raise DataError(
        f"dirichlet partition: no draw in {max_retries} tries gave every one of {num_clients} clients "
        f"at least {min_size} examples (alpha={alpha}); raise alpha or max_retries, or lower min_size"
    )


def power_law(
    n: int,
    num_clients: int,
    sigma: float = 1.0,
    seed: int = 0,
    *,
    min_size: int = 1,
) -> list[torch.Tensor]:
    """Quantity-skewed split with IID labels: client sizes from a lognormal law.

    Each client gets ``min_size`` examples plus a share of the rest proportional to a
    ``LogNormal(0, sigma)`` draw (largest-remainder rounding, so sizes sum to ``n``). The
    lognormal is the heavy-tailed size law of FedProx's synthetic data (Li et al. 2020);
    larger ``sigma`` means more skew, ``sigma=0`` gives equal sizes. The examples are a
    random permutation, so labels stay IID. Every index is used exactly once.
    """
    _check_int(n, "n", 0)
    _check_clients(num_clients, n)
    if not (isinstance(sigma, (int, float)) and np.isfinite(sigma) and sigma >= 0):
        raise DataError(f"sigma must be a finite number >= 0, got {sigma!r}")
    _check_int(min_size, "min_size", 0)
    if num_clients * min_size > n:
        raise DataError(f"{num_clients} clients x min_size {min_size} exceeds the {n} examples")
    rng = _rng(seed)
    weights = rng.lognormal(mean=0.0, sigma=float(sigma), size=num_clients)
    rest = n - num_clients * min_size
    raw = weights / weights.sum() * rest
    extra = np.floor(raw).astype(np.int64)
    short = rest - int(extra.sum())
    if short:
        extra[np.argsort(-(raw - extra), kind="stable")[:short]] += 1
    sizes = extra + min_size
    return _to_tensors(_split_by_sizes(rng.permutation(n), sizes))


def natural(groups: ArrayLike) -> list[torch.Tensor]:
    """One client per distinct value of ``groups`` (ordered by sorted value), e.g. site ids."""
    g = _as_numpy(groups, "groups")
    if g.size == 0:
        raise DataError("natural partition of an empty groups array")
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    counts = np.bincount(inverse)
    return _to_tensors(_split_by_sizes(order, counts))


PARTITIONERS: dict[str, Callable[..., list[torch.Tensor]]] = {
    "iid": iid,
    "shards": shards,
    "dirichlet": dirichlet,
    "power_law": power_law,
    "natural": natural,
}
"""Partitioners by name, for :func:`partition` and configs."""

_NEEDS_N = ("iid", "power_law")


def partition(
    name: str,
    *,
    num_clients: int | None = None,
    labels: ArrayLike | None = None,
    n: int | None = None,
    groups: ArrayLike | None = None,
    seed: int = 0,
    **options: Any,
) -> list[torch.Tensor]:
    """Dispatch to the partitioner ``name`` (one of :data:`PARTITIONERS`).

    ``labels`` feeds ``shards``/``dirichlet`` (and gives ``n`` to ``iid``/``power_law``
    when ``n`` is not passed); ``groups`` feeds ``natural``; other ``options`` go to the
    partitioner (``shards_per_client``, ``alpha``, ``min_size``, ``sigma``, ...). An
    unknown name or option raises :class:`DataError` naming it.
    """
    fn = PARTITIONERS.get(name)
    if fn is None:
        raise DataError(f"unknown partition {name!r}; known partitions: {', '.join(PARTITIONERS)}")
    accepted = set(inspect.signature(fn).parameters) - {"labels", "n", "num_clients", "seed", "groups"}
    for key in options:
        if key not in accepted:
            raise DataError(
                f"unknown option {key!r} for partition {name!r}; it accepts {', '.join(sorted(accepted)) or 'none'}"
            )
    if name == "natural":
        if groups is None:
            raise DataError("partition 'natural' needs groups=")
        parts = natural(groups)
        if num_clients is not None and num_clients != len(parts):
            raise DataError(f"groups hold {len(parts)} distinct values but num_clients={num_clients}")
        return parts
    if num_clients is None:
        raise DataError(f"partition {name!r} needs num_clients=")
    if name in _NEEDS_N:
        if n is None:
            if labels is None:
                raise DataError(f"partition {name!r} needs n= (or labels=)")
            n = len(_as_numpy(labels, "labels"))
        return fn(n, num_clients, seed=seed, **options)
    if labels is None:
        raise DataError(f"partition {name!r} needs labels=")
    return fn(labels, num_clients, seed=seed, **options)
