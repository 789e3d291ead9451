"""Federated datasets: MNIST, partitioners, and the three generated application scenarios."""

from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec
from fedloom.data.registry import list_datasets, load_dataset

__all__ = ["ClientData", "FederatedDataset", "Split", "TaskSpec", "list_datasets", "load_dataset"]
