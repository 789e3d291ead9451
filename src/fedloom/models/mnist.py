"""The two MNIST models of McMahan et al. 2017.

* :class:`McMahanCNN` — "CNN": two 5x5 convolutions (32 and 64 channels, each followed by
  ReLU and 2x2 max pooling), a 512-unit ReLU layer and a softmax output; 1,663,370 parameters.
* :class:`McMahan2NN` — "2NN": a multilayer perceptron with two 200-unit ReLU hidden layers;
  199,210 parameters.

Initialization (``init``): ``"he"`` is He-normal (He et al. 2015, fan-in, for ReLU networks)
with zero biases; ``"torch"`` is PyTorch's default (weights and biases uniform with variance
1/(3·fan_in)). Defaults: ``"torch"`` for the CNN, ``"he"`` for the 2NN, measured in the
McMahan setting (MNIST standardized, 100 clients, C = 0.1, B = 10, plain SGD; seeds 0/1/2):

* CNN, He: under plain SGD a layer's pre-activations move by about lr · fan_in · E[input²]
  times their gradient per step, and He keeps E[input²] ≈ 1 through the network (PyTorch's
  default shrinks it ~6x a layer), so the 3,136-input ``fc1`` takes far larger early steps:
  the initial gradient norm at B = 10 is 46-65 (PyTorch default: 1.9-2.4). With lr 0.05 and
  E = 1, round-1 test accuracy was 20.8 / 11.4 / 11.4% (chance) with round-1 training loss
  2.7-4.4; with E = 5, 59 / 22 / 18%. He needs lr <= 0.02 (0.02: 87 / 83 / 88%; 0.01: 89 /
  89 / 90%).
* CNN, PyTorch default: round 1 at 84 / 85 / 86% (lr 0.05, E = 1), 83 / 84 / 84% (lr 0.1,
  E = 1), 95 / 95 / 95% (lr 0.05, E = 5).
* 2NN: both stable at lr 0.1, E = 1 (round 1: He 84 / 85 / 87% IID, 34 / 31 / 35% non-IID;
  PyTorch default 83 / 86 / 84% IID, 11 / 22 / 33% non-IID); He learns faster on the
  non-IID split, so it stays.

Both take flattened images ``(N, 784)`` (or ``(N, 1, 28, 28)``) and return logits ``(N, 10)``.

McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of Deep
Networks from Decentralized Data." AISTATS 2017.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["McMahan2NN", "McMahanCNN", "he_init"]


def he_init(module: nn.Module) -> None:
    """He-normal (fan-in) weights and zero biases for every Linear and Conv2d of ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _check_init(init: str) -> None:
    if init not in ("he", "torch"):
        from fedloom.core.errors import ConfigError

        raise ConfigError(f"must be 'he' or 'torch', got {init!r}", key="model.init")


class McMahanCNN(nn.Module):
    """conv5x5(32, pad 2) → ReLU → maxpool2 → conv5x5(64, pad 2) → ReLU → maxpool2 → fc 3136→512 → ReLU → fc 512→C."""

    def __init__(self, num_classes: int = 10, init: str = "torch") -> None:
        super().__init__()
        _check_init(init)
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(7 * 7 * 64, 512)
        self.fc2 = nn.Linear(512, num_classes)
        if init == "he":
            he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 28, 28)
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class McMahan2NN(nn.Module):
    """784 → 200 → ReLU → 200 → ReLU → C."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: int = 200, init: str = "he") -> None:
        super().__init__()
        _check_init(init)
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)
        if init == "he":
            he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)
