"""MNIST split among simulated clients, as in McMahan et al. 2017.

:func:`mnist_federated` partitions the 60k training set with one of the partitioners of
:mod:`fedloom.data.partition` (IID 600 each; pathological non-IID shards; Dirichlet label
skew; power-law quantity skew) and keeps the 10k test set as the server's test split.
With ``server_only`` it builds a deployed server's view (:meth:`FederatedDataset.server_view`)
from the test set alone, without reading the training set.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
Networks from Decentralized Data." AISTATS 2017.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch

from fedloom.core.errors import DataError
from fedloom.core.seeding import derive_seed
from fedloom.data import partition as parts
from fedloom.data.base import ClientData, FederatedDataset, LazyClients, Split, TaskSpec
from fedloom.data.mnist import load_mnist, load_mnist_test

__all__ = ["MNIST_TASK", "MnistPartition", "client_id", "mnist_federated"]

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

MnistPartition = Literal["iid", "shards", "dirichlet", "power_law"]

MNIST_TASK = TaskSpec(
    kind="classification",
    input_shape=(784,),
    num_outputs=10,
    loss="cross_entropy",
    metrics=("accuracy", "loss"),
    target_name="digit",
)
"""The MNIST task: 10-way classification of flattened 28x28 images."""


def client_id(i: int, num_clients: int) -> str:
    """``client-007``: zero-padded (at least 3 digits) so ids sort in client order."""
    width = max(3, len(str(num_clients - 1)))
    return f"client-{i:0{width}d}"


def mnist_federated(
    *,
    num_clients: int = 100,
    partition: MnistPartition = "iid",
    alpha: float = 0.5,
    shards_per_client: int = 2,
    sigma: float = 1.0,
    min_size: int = 10,
    seed: int = 0,
    local_test_fraction: float = 0.0,
    normalize: bool = True,
    server_only: bool = False,
) -> FederatedDataset:
    """MNIST over ``num_clients`` clients; the server keeps the 10k test set.

    ``partition``: ``iid`` (equal random parts), ``shards`` (``shards_per_client`` label-sorted
    shards each), ``dirichlet`` (label skew with concentration ``alpha``, every client
    >= ``min_size`` examples) or ``power_law`` (lognormal sizes with shape ``sigma``, every
    client >= ``min_size``). ``local_test_fraction`` > 0 holds out that fraction of each
    client's examples (at least one, at random) as its local test split. ``normalize``
    standardizes pixels with the usual MNIST statistics, ``(x - 0.1307) / 0.3081``
    (``False`` keeps raw [0, 1) intensities, as McMahan et al. used). ``server_only``: the
    server's view (task, test set, info without ``train_sizes``, the client ids); the options
    are checked the same way, but the training set is neither read nor partitioned unless a
    client's data is read (:class:`~fedloom.data.base.LazyClients`).
    """
    if partition not in ("iid", "shards", "dirichlet", "power_law"):
        raise DataError(f"unknown MNIST partition {partition!r}; known: iid, shards, dirichlet, power_law")
    if not (isinstance(local_test_fraction, (int, float)) and 0.0 <= local_test_fraction < 1.0):
        raise DataError(f"local_test_fraction must be in [0, 1), got {local_test_fraction!r}")
    if not isinstance(normalize, bool):
        raise DataError(f"normalize must be true or false, got {normalize!r}")
    if server_only:
        if not isinstance(num_clients, int) or num_clients < 1:
            raise DataError(f"num_clients must be a positive integer, got {num_clients!r}")
        test = load_mnist_test()  # our own tensors: normalized in place, no second copy
        if normalize:
            test.x.sub_(MNIST_MEAN).div_(MNIST_STD)
        view_info: dict[str, object] = {
            "partition": partition,
            "seed": seed,
            "num_clients": num_clients,
            "local_test_fraction": local_test_fraction,
            "normalize": normalize,
            "server_test_size": len(test),
        }
        def load_clients() -> Mapping[str, ClientData]:  # the same partition, if a client's data is ever read
            return mnist_federated(
                num_clients=num_clients, partition=partition, alpha=alpha, shards_per_client=shards_per_client, sigma=sigma,
                min_size=min_size, seed=seed, local_test_fraction=local_test_fraction, normalize=normalize,
            ).clients  # fmt: skip

        clients = LazyClients([client_id(i, num_clients) for i in range(num_clients)], load_clients)
        return FederatedDataset(name="mnist", task=MNIST_TASK, clients=clients, server_test=test, info=view_info, server_only=True)
    train, test = load_mnist()
    if normalize:  # new tensors: the cached loader output is never modified
        train = Split((train.x - MNIST_MEAN) / MNIST_STD, train.y)
        test = Split((test.x - MNIST_MEAN) / MNIST_STD, test.y)
    n = len(train)
    if partition == "iid":
        index = parts.iid(n, num_clients, seed=seed)
    elif partition == "shards":
        index = parts.shards(train.y, num_clients, shards_per_client=shards_per_client, seed=seed)
    elif partition == "dirichlet":
        index = parts.dirichlet(train.y, num_clients, alpha=alpha, seed=seed, min_size=min_size)
    else:
        index = parts.power_law(n, num_clients, sigma=sigma, seed=seed, min_size=min_size)

    clients: dict[str, ClientData] = {}
    sizes: dict[str, int] = {}
    for i, idx in enumerate(index):
        cid = client_id(i, num_clients)
        local_test: Split | None = None
        if local_test_fraction > 0.0:
            if idx.numel() < 2:
                raise DataError(f"client {cid!r} has {idx.numel()} example(s): too few to hold out a local test split")
            rng = np.random.default_rng(derive_seed(seed, "mnist-local-test", cid))
            perm = torch.from_numpy(rng.permutation(idx.numel()))
            k = min(idx.numel() - 1, max(1, round(local_test_fraction * idx.numel())))
            test_idx, idx = idx[perm[:k]].sort().values, idx[perm[k:]].sort().values
            local_test = train.subset(test_idx)
        clients[cid] = ClientData(train=train.subset(idx), test=local_test)
        sizes[cid] = int(idx.numel())

    options: dict[str, object] = {
        "iid": {},
        "shards": {"shards_per_client": shards_per_client},
        "dirichlet": {"alpha": alpha, "min_size": min_size},
        "power_law": {"sigma": sigma, "min_size": min_size},
    }[partition]
    info: dict[str, object] = {
        "partition": partition,
        "partition_options": options,
        "seed": seed,
        "num_clients": num_clients,
        "local_test_fraction": local_test_fraction,
        "normalize": normalize,
        "train_sizes": sizes,
        "server_test_size": len(test),
    }
    return FederatedDataset(name="mnist", task=MNIST_TASK, clients=clients, server_test=test, info=info)
