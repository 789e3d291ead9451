"""Client side: local training on local data, losses, and evaluation of a flat parameter vector."""

from fedloom.client.evaluate import evaluate_model, evaluate_vector
from fedloom.client.losses import get_loss
from fedloom.client.training import LocalResult, train_local

__all__ = ["LocalResult", "evaluate_model", "evaluate_vector", "get_loss", "train_local"]
