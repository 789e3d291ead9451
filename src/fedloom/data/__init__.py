"""Federated datasets: MNIST, partitioners, and the three generated application scenarios."""

from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec

__all__ = ["ClientData", "FederatedDataset", "Split", "TaskSpec"]
