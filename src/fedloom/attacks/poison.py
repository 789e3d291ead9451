"""Data poisoning: the attackers train honestly on corrupted labels.

``label_flip`` (Tolpegin, Truex, Gursoy, Liu. "Data Poisoning Attacks Against Federated
Learning Systems." ESORICS 2020; Fang et al. 2020) relabels every training example of an
attacking client: class c becomes C − 1 − c (MNIST: 0↔9, 1↔8, ...), a binary label y becomes
1 − y. The updates then leave unchanged, so the attack runs wherever the data lives: in
simulation the dataset is poisoned before the engine is built.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

from fedloom.attacks.base import Attack
from fedloom.core.errors import ConfigError
from fedloom.data.base import FederatedDataset, Split, TaskSpec

__all__ = ["LabelFlip", "flip_labels"]


@dataclass(frozen=True)
class LabelFlip(Attack):
    """Train on flipped labels: c → C − 1 − c (classification), y → 1 − y (binary)."""

    name = "label_flip"
    poisons_data = True

    def poison(self, data: FederatedDataset, attackers: Collection[str]) -> FederatedDataset:
        """``data`` with the attackers' training labels flipped (test splits and the server's untouched)."""
        return flip_labels(data, attackers)


def _flip(split: Split, task: TaskSpec) -> Split:
    if task.kind == "classification":
        return Split(split.x, (task.num_outputs - 1) - split.y)
    return Split(split.x, 1 - split.y)


def flip_labels(data: FederatedDataset, attackers: Collection[str]) -> FederatedDataset:
    """The dataset with every attacking client's training labels flipped."""
    if data.task.kind == "regression":
        raise ConfigError(f"label flipping needs class labels; {data.name!r} is a regression task", key="attack.name")
    clients = {
        cid: replace(cd, train=_flip(cd.train, data.task)) if cid in attackers else cd for cid, cd in data.clients.items()
    }
    return replace(data, clients=clients)
