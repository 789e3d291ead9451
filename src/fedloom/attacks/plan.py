"""From an ``[attack]`` table to the run's adversary: the registry of attacks and the soundness checks.

:func:`plan_attack` chooses the attackers (a seeded share of the population, or named ids),
builds the named attack with its options, poisons the dataset for a data attack, and refuses
with the reason what an experiment cannot mean:

* a deployment (``engine = "remote"``): attacks are simulation experiments; a deployed
  attacker is a hostile client process (``bench/chaos.py``);
* an update attack under secure aggregation (the server, and so the experiment's hook, only
  sees masked or encrypted inputs) or after a stage that encodes updates (QSGD, top-k, casts,
  the sparse codec): the attacks act on dense deltas.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from fedloom.attacks.base import Adversary, Attack, choose_attackers
from fedloom.attacks.poison import LabelFlip
from fedloom.attacks.updates import ALIE, GaussianNoise, Inflate, InnerProduct, Scale, SignFlip
from fedloom.core.errors import ConfigError
from fedloom.data.base import FederatedDataset
from fedloom.pipeline.base import Stage

__all__ = ["ATTACKS", "build_attack", "list_attacks", "plan_attack"]

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (SignFlip, Scale, GaussianNoise, Inflate, LabelFlip, ALIE, InnerProduct)
}
"""Name -> attack class (read-only by convention)."""


def list_attacks() -> list[str]:
    return sorted(ATTACKS)


def build_attack(name: str, options: Mapping[str, Any] | None = None) -> Attack:
    """The attack called ``name`` with its ``options`` (a keyed :class:`ConfigError` if either is wrong)."""
    cls = ATTACKS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown attack {name!r}; known: {', '.join(list_attacks())}", key="attack.name")
    fields = {f.name for f in dataclasses.fields(cls)}
    opts = dict(options or {})
    for k in opts:
        if k not in fields:
            accepted = ", ".join(sorted(fields)) or "none"
            raise ConfigError(f"unknown option of attack {name!r} (accepted: {accepted})", key=f"attack.{k}")
    try:
        return cls(**opts)
    except ConfigError as exc:
        raise ConfigError(exc.detail, key=f"attack.{exc.key}" if exc.key else "attack") from None


def plan_attack(
    name: str,
    options: Mapping[str, Any],
    *,
    dataset: FederatedDataset,
    fraction: float | None,
    clients: Sequence[str],
    knowledge: str,
    seed: int,
    stages: Sequence[Stage],
    secure: bool,
    remote: bool,
) -> tuple[Adversary, FederatedDataset]:
    """The run's adversary and the dataset it trains on (poisoned for a data attack)."""
    attack = build_attack(name, options)
    if remote:
        raise ConfigError(
            "attacks are simulation experiments; a deployed attacker is a hostile client process (see bench/chaos.py)",
            key="attack",
        )
    if not attack.poisons_data:
        if secure:
            raise ConfigError(
                f"attack {name!r} changes individual updates, which secure aggregation hides from the server "
                "(a data attack such as label_flip works under it)",
                key="attack.name",
            )
        encoder = next((st.name for st in stages if st.runs_on_client and getattr(st, "codec", None)), None)
        if encoder is not None:
            raise ConfigError(
                f"attack {name!r} changes dense updates, but stage {encoder!r} encodes them on the client", key="attack.name"
            )
    attackers = choose_attackers(dataset.client_ids, fraction=fraction, clients=clients, seed=seed)
    adversary = Adversary(attack, attackers, seed=seed, knowledge=knowledge)
    if isinstance(attack, LabelFlip):
        dataset = attack.poison(dataset, attackers)
    return adversary, dataset
