"""A deployed server's view of a dataset: the task, the server's test split and the client ids, no client data.

The clients' data is loaded only if something reads it (a test starting agents from the
same config); the view itself never holds it.
"""

from __future__ import annotations

import pytest
import torch

from fedloom.core.errors import DataError
from fedloom.data.base import ClientData, FederatedDataset, LazyClients, Split, TaskSpec
from fedloom.data.mnist import load_mnist, load_mnist_test
from fedloom.data.registry import dataset_options, load_dataset

TASK = TaskSpec("regression", (2,), 1, "mse", ("mae",))


def test_load_mnist_test_equals_the_full_loaders_test_split() -> None:
    test = load_mnist_test()
    _, full = load_mnist()
    assert test.x.shape == (10000, 784) and test.x.dtype == torch.float32 and test.y.dtype == torch.int64
    assert torch.equal(test.x, full.x) and torch.equal(test.y, full.y)
    assert test.x is not full.x  # not the cached one: the caller may change it


def test_mnist_server_view_has_the_same_test_split_and_no_clients() -> None:
    options = {"num_clients": 100, "partition": "shards", "seed": 3}
    full = load_dataset("mnist", **options)
    view = load_dataset("mnist", server_only=True, **options)
    assert view.server_only and isinstance(view.clients, LazyClients) and not view.clients.loaded
    assert view.client_ids == full.client_ids and len(view.clients) == 100 and "client-007" in view.clients
    assert not view.clients.loaded  # ids, length and membership read no data
    assert view.task == full.task and view.name == "mnist"
    assert view.server_test is not None and full.server_test is not None
    assert torch.equal(view.server_test.x, full.server_test.x) and torch.equal(view.server_test.y, full.server_test.y)
    assert view.info["num_clients"] == 100 and view.info["partition"] == "shards" and "train_sizes" not in view.info
    with pytest.raises(DataError, match="holds no client data"):
        view.pooled_train()
    # reading a client's data loads the same partition (what a test's agents train on)
    got, want = view.clients["client-007"].train, full.clients["client-007"].train
    assert view.clients.loaded and torch.equal(got.x, want.x) and torch.equal(got.y, want.y)
    with pytest.raises(KeyError):
        view.clients["client-100"]


def test_mnist_server_view_checks_options_like_the_full_loader() -> None:
    with pytest.raises(DataError, match="unknown MNIST partition 'nope'"):
        load_dataset("mnist", server_only=True, partition="nope")
    with pytest.raises(DataError, match="unknown option 'server_onl'"):
        load_dataset("mnist", server_onl=True)
    with pytest.raises(DataError, match="num_clients must be a positive integer"):
        load_dataset("mnist", server_only=True, num_clients=0)
    assert "server_only" not in dataset_options("mnist")  # not a [data] option


def test_raw_mnist_server_view_keeps_raw_intensities() -> None:
    view = load_dataset("mnist", server_only=True, normalize=False)
    assert view.server_test is not None
    assert torch.equal(view.server_test.x, load_mnist()[1].x)


def test_scenario_server_view_is_the_loaded_datasets_view() -> None:
    full = load_dataset("hospital", seed=1)
    view = load_dataset("hospital", seed=1, server_only=True)
    assert view.server_only and view.task == full.task and view.client_ids == full.client_ids
    assert isinstance(view.clients, LazyClients) and not view.clients.loaded
    assert view.server_test is not None and full.server_test is not None
    assert torch.equal(view.server_test.y, full.server_test.y)
    site = full.client_ids[0]
    assert torch.equal(view.clients[site].train.y, full.clients[site].train.y)


def test_server_view_of_a_dataset_and_its_checks() -> None:
    split = Split(torch.zeros(3, 2), torch.zeros(3))
    ds = FederatedDataset("toy", TASK, {"a": ClientData(split)}, server_test=split, info={"k": 1})
    view = ds.server_view()
    assert view == FederatedDataset("toy", TASK, {}, split, {"k": 1}, server_only=True)
    assert not ds.server_only
    lazy = ds.server_view(reload=lambda: {"a": ClientData(split)})
    assert list(lazy.clients) == ["a"] and not lazy.clients.loaded  # type: ignore[attr-defined]
    assert lazy.clients["a"].num_examples == 3
    wrong = ds.server_view(reload=lambda: {"b": ClientData(split)})
    with pytest.raises(DataError, match="differ from the server view's client ids"):
        wrong.clients["a"]
    with pytest.raises(DataError, match="holds no client data"):
        FederatedDataset("toy", TASK, {"a": ClientData(split)}, server_only=True)
    with pytest.raises(DataError, match="has no clients"):
        FederatedDataset("toy", TASK, {})
