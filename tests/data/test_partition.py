"""Partitioners: disjointness, coverage, determinism, paper sizes and the shards property."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloom.core.errors import DataError
from fedloom.data.partition import dirichlet, iid, natural, partition, power_law, shards


def check_disjoint(parts: list[torch.Tensor], n: int, *, cover: bool) -> None:
    for p in parts:
        assert p.dtype == torch.int64 and p.dim() == 1
        assert bool((p[1:] > p[:-1]).all()), "indices are sorted and unique"
    allidx = torch.cat(parts)
    assert allidx.numel() == torch.unique(allidx).numel(), "an index went to two clients"
    if allidx.numel():
        assert int(allidx.min()) >= 0 and int(allidx.max()) < n
    if cover:
        assert allidx.numel() == n


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def labels_balanced(num_classes: int, per_class: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


# ------------------------------------------------------------------------ iid
def test_iid_mcmahan_sizes() -> None:
    parts = iid(60000, 100, seed=0)
    assert [p.numel() for p in parts] == [600] * 100
    check_disjoint(parts, 60000, cover=True)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 500), k=st.integers(1, 50), seed=st.integers(0, 2**63 - 1))
def test_iid_sweep(n: int, k: int, seed: int) -> None:
    if k > n:
        with pytest.raises(DataError):
            iid(n, k, seed=seed)
        return
    parts = iid(n, k, seed=seed)
    assert len(parts) == k
    sizes = [p.numel() for p in parts]
    assert max(sizes) - min(sizes) <= 1
    check_disjoint(parts, n, cover=True)
    assert same(parts, iid(n, k, seed=seed))


def test_iid_seed_changes_assignment() -> None:
    assert not same(iid(100, 4, seed=0), iid(100, 4, seed=1))


# --------------------------------------------------------------------- shards
def test_shards_mcmahan_mnist_like() -> None:
    y = labels_balanced(10, 6000)
    parts = shards(y, 100, shards_per_client=2, seed=0)
    assert [p.numel() for p in parts] == [600] * 100  # 200 shards of 300
    check_disjoint(parts, y.size, cover=True)
    classes = [np.unique(y[p.numpy()]).size for p in parts]
    assert max(classes) <= 2  # 6000 per class / 300 per shard: every shard is one digit
    assert np.mean([c == 2 for c in classes]) > 0.5


@settings(max_examples=40, deadline=None)
@given(
    num_classes=st.integers(1, 8),
    per_class=st.integers(10, 40),
    k=st.integers(1, 10),
    spc=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_shards_sweep(num_classes: int, per_class: int, k: int, spc: int, seed: int) -> None:
    y = labels_balanced(num_classes, per_class, seed)
    if k * spc > y.size:
        with pytest.raises(DataError, match="shards"):
            shards(y, k, shards_per_client=spc, seed=seed)
        return
    parts = shards(y, k, shards_per_client=spc, seed=seed)
    assert len(parts) == k
    check_disjoint(parts, y.size, cover=True)
    assert same(parts, shards(y, k, shards_per_client=spc, seed=seed))
    shard_size = y.size // (k * spc)
    if shard_size <= per_class:  # then a shard spans at most two labels
        for p in parts:
            assert np.unique(y[p.numpy()]).size <= 2 * spc


def test_shards_errors() -> None:
    with pytest.raises(DataError, match="shards"):
        shards(np.zeros(10, dtype=np.int64), 6, shards_per_client=2)
    with pytest.raises(DataError, match="integers"):
        shards(np.array([0.5, 1.0]), 1)
    with pytest.raises(DataError, match="shards_per_client"):
        shards(np.zeros(10, dtype=np.int64), 2, shards_per_client=0)


# ------------------------------------------------------------------ dirichlet
@settings(max_examples=30, deadline=None)
@given(
    num_classes=st.integers(2, 6),
    per_class=st.integers(20, 60),
    k=st.integers(1, 8),
    alpha=st.sampled_from([0.1, 0.5, 1.0, 10.0]),
    seed=st.integers(0, 1000),
)
def test_dirichlet_sweep(num_classes: int, per_class: int, k: int, alpha: float, seed: int) -> None:
    y = labels_balanced(num_classes, per_class, seed)
    try:
        parts = dirichlet(y, k, alpha, seed=seed, min_size=2, max_retries=200)
    except DataError as exc:  # allowed only as the documented retry failure
        assert "no draw" in str(exc)
        return
    assert len(parts) == k
    assert min(p.numel() for p in parts) >= 2
    check_disjoint(parts, y.size, cover=True)
    assert same(parts, dirichlet(y, k, alpha, seed=seed, min_size=2, max_retries=200))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    y = labels_balanced(10, 600)

    def mean_classes(alpha: float) -> float:
        parts = dirichlet(y, 20, alpha, seed=3, min_size=5)
        return float(np.mean([np.unique(y[p.numpy()]).size for p in parts]))

    assert mean_classes(0.05) < mean_classes(1.0) < mean_classes(100.0) + 1e-9
    assert mean_classes(100.0) == 10.0


def test_dirichlet_errors() -> None:
    y = labels_balanced(2, 10)
    with pytest.raises(DataError, match="min_size"):
        dirichlet(y, 5, 0.5, min_size=5)  # 25 > 20 examples
    with pytest.raises(DataError, match="no draw in 3 tries"):
        dirichlet(labels_balanced(2, 50), 10, 0.01, seed=0, min_size=9, max_retries=3)
    with pytest.raises(DataError, match="alpha"):
        dirichlet(y, 2, 0.0)


# ------------------------------------------------------------------ power law
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 2000),
    k=st.integers(1, 40),
    sigma=st.floats(0.0, 3.0),
    min_size=st.integers(0, 20),
    seed=st.integers(0, 1000),
)
def test_power_law_sweep(n: int, k: int, sigma: float, min_size: int, seed: int) -> None:
    if k > n or k * min_size > n:
        with pytest.raises(DataError):
            power_law(n, k, sigma, seed=seed, min_size=min_size)
        return
    parts = power_law(n, k, sigma, seed=seed, min_size=min_size)
    assert len(parts) == k
    assert min(p.numel() for p in parts) >= min_size
    check_disjoint(parts, n, cover=True)
    assert same(parts, power_law(n, k, sigma, seed=seed, min_size=min_size))


def test_power_law_is_skewed() -> None:
    sizes = np.array([p.numel() for p in power_law(60000, 100, 1.5, seed=0, min_size=10)])
    assert sizes.min() >= 10 and sizes.sum() == 60000
    assert sizes.max() > 5 * np.median(sizes)
    equal = [p.numel() for p in power_law(1000, 10, 0.0, seed=0)]
    assert equal == [100] * 10


# -------------------------------------------------------------------- natural
def test_natural_by_group_value() -> None:
    groups = np.array(["site-b", "site-a", "site-b", "site-c", "site-a"])
    parts = natural(groups)
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2], [3]]
    assert [p.tolist() for p in natural(torch.tensor([2, 0, 2]))] == [[1], [0, 2]]
    with pytest.raises(DataError, match="empty"):
        natural(np.array([]))


# ----------------------------------------------------------------- dispatcher
def test_partition_dispatch_matches_functions() -> None:
    y = labels_balanced(4, 50)
    assert same(partition("iid", n=200, num_clients=4, seed=1), iid(200, 4, seed=1))
    assert same(partition("iid", labels=y, num_clients=4, seed=1), iid(200, 4, seed=1))
    assert same(partition("shards", labels=y, num_clients=4, seed=2), shards(y, 4, seed=2))
    assert same(
        partition("dirichlet", labels=y, num_clients=4, seed=2, alpha=1.0, min_size=3),
        dirichlet(y, 4, 1.0, seed=2, min_size=3),
    )
    assert same(partition("power_law", n=200, num_clients=4, sigma=2.0), power_law(200, 4, 2.0))
    assert len(partition("natural", groups=y)) == 4


def test_partition_errors_name_the_problem() -> None:
    with pytest.raises(DataError, match="unknown partition 'zipf'.*iid, shards, dirichlet"):
        partition("zipf", n=10, num_clients=2)
    with pytest.raises(DataError, match="unknown option 'alpha' for partition 'iid'"):
        partition("iid", n=10, num_clients=2, alpha=0.1)
    with pytest.raises(DataError, match="needs labels"):
        partition("shards", num_clients=2)
    with pytest.raises(DataError, match="needs num_clients"):
        partition("iid", n=10)
    with pytest.raises(DataError, match="num_clients"):
        iid(10, 0)
