"""Small models the engine tests share: one per lockstep path (vmap, sequential fallback)."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """Not a chain (a skip connection): no lowering, but torch.func handles it (the vmap program)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.c(h + torch.tanh(self.b(h)))


class Branchy(Residual):
    """Data-dependent Python control flow: neither fx nor vmap can take it (the sequential fallback)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            h = self.b(h)
        return self.c(h)
