"""Shared plumbing of the generated scenarios: seeded site RNGs, exact (stratified) splits,
fixed-reference standardization and assembly into a :class:`FederatedDataset`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedloom.core.errors import DataError
from fedloom.core.seeding import derive_seed
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec

__all__ = ["SiteArrays", "assemble", "check_seed", "site_rng", "split_rows", "standardize"]

TEST_FRACTION = 0.2


def check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def site_rng(seed: int, scenario: str, site: str, stream: str = "data") -> np.random.Generator:
    """An independent generator per (seed, scenario, site, stream): sites never share draws."""
    return np.random.default_rng(derive_seed(seed, scenario, site, stream))


def split_rows(
    n: int, rng: np.random.Generator, *, strata: np.ndarray | None = None, test_fraction: float = TEST_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) row indices; within each stratum ``round(test_fraction * count)`` go to test."""
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == v) for v in np.unique(strata)]
    test = [rng.permutation(g)[: int(round(test_fraction * g.size))] for g in groups]
    test_idx = np.sort(np.concatenate(test))
    mask = np.ones(n, dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


def standardize(raw: np.ndarray, reference: Sequence[tuple[float, float]]) -> np.ndarray:
    """``(raw - center) / scale`` column by column with fixed, documented reference values."""
    ref = np.asarray(reference, dtype=np.float64)
    if raw.shape[1] != ref.shape[0]:
        raise DataError(f"{raw.shape[1]} feature columns but {ref.shape[0]} reference scales")
    return ((raw - ref[:, 0]) / ref[:, 1]).astype(np.float32)


@dataclass(frozen=True)
class SiteArrays:
    """One site's generated rows and its split."""

    site: str
    x: np.ndarray
    y: np.ndarray
    train_idx: np.ndarray
    test_idx: np.ndarray


def assemble(
    name: str, task: TaskSpec, sites: Sequence[SiteArrays], info: Mapping[str, object], *, y_dtype: torch.dtype
) -> FederatedDataset:
    """Clients keyed by site id (local 80/20 train/test); the server tests on all local tests."""
    clients: dict[str, ClientData] = {}
    for s in sites:
        x = torch.from_numpy(np.ascontiguousarray(s.x, dtype=np.float32))
        y = torch.from_numpy(np.ascontiguousarray(s.y)).to(y_dtype)
        tr, te = torch.from_numpy(s.train_idx), torch.from_numpy(s.test_idx)
        clients[s.site] = ClientData(train=Split(x[tr], y[tr]), test=Split(x[te], y[te]), site=s.site)
    tests = [c.test for c in clients.values() if c.test is not None]
    server_test = Split(torch.cat([t.x for t in tests]), torch.cat([t.y for t in tests]))
    return FederatedDataset(name=name, task=task, clients=clients, server_test=server_test, info=dict(info))
