"""The adversary of robustness experiments: which clients attack, and what they send.

An :class:`Attack` says how malicious clients change what they send; an :class:`Adversary`
pairs one with the set of attacking clients and sits on the round's update stream
(:meth:`Adversary.intercept`), between the engine and the server's checks. Attacks act on
the attackers' outgoing updates after their client stages, so the one hook serves every
simulation engine (sequential, vectorized, Ray) with the same semantics. A hook on the
stream, not a per-client stage, because the collusive attacks ("a little is enough",
inner-product manipulation) need the statistics of the whole round, which no single
client's stage sees.

An attack works on *unweighted* deltas: where a weighting stage multiplied a delta by its
weight w, the adversary divides by w, lets the attack craft the malicious delta, and
multiplies by the weight the weighting stage gives the (possibly re-declared) example
count, so the server's checks see a consistent update. Only the trainable entries are
attacked; buffers travel as trained. Data attacks (label flipping) change the attackers'
training data instead (:mod:`fedloom.attacks.poison`) and pass the updates through.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch

from fedloom.core.errors import ConfigError
from fedloom.core.params import ParamSpec
from fedloom.core.seeding import derive_seed
from fedloom.core.types import ClientUpdate
from fedloom.pipeline.weighting import WeightingStage

__all__ = ["Adversary", "Attack", "AttackContext", "choose_attackers"]


@dataclass(frozen=True)
class AttackContext:
    """What an adversary sees of a round: the model's spec, the round, the run's weighting stage."""

    spec: ParamSpec
    round: int
    weighting: WeightingStage | None = None


class Attack:
    """Base of every attack; subclasses are frozen dataclasses whose fields are their options.

    ``collusive`` attacks see the round's statistics (:meth:`craft` gets ``benign``);
    ``poisons_data`` attacks change the attackers' training data and leave updates alone.
    """

    name: ClassVar[str] = "attack"
    collusive: ClassVar[bool] = False
    poisons_data: ClassVar[bool] = False

    def craft(self, own: torch.Tensor, benign: torch.Tensor | None, *, n: int, gen: torch.Generator) -> torch.Tensor:
        """The malicious unweighted deltas, one row per attacker.

        ``own`` (k, d): the attackers' honestly trained deltas (trainable entries only);
        ``benign`` (2, d): the mean and standard deviation of the round's benign deltas, for a
        collusive attack (None otherwise); ``n``: the number of updates in the round.
        """
        return own

    def examples(self, num_examples: int) -> int:
        """The example count an attacker declares (default: the true one)."""
        return num_examples


def choose_attackers(client_ids: Sequence[str], *, fraction: float | None, clients: Sequence[str], seed: int) -> frozenset[str]:
    """The attacking clients: the ids named, or ⌊fraction·N + ½⌋ of the population drawn with ``seed``."""
    ids = sorted(client_ids)
    if clients and fraction is not None:
        raise ConfigError("give the attackers' share (fraction) or their ids (clients), not both", key="attack")
    if clients:
        unknown = sorted(set(clients) - set(ids))
        if unknown:
            raise ConfigError(f"unknown client(s) {', '.join(map(repr, unknown[:3]))}", key="attack.clients")
        return frozenset(clients)
    if fraction is None:
        raise ConfigError("give the attackers' share of the population (fraction) or their ids (clients)", key="attack")
    m = math.floor(fraction * len(ids) + 0.5)
    rng = np.random.default_rng(derive_seed(seed, "attackers"))
    return frozenset(ids[i] for i in rng.choice(len(ids), size=m, replace=False))


class _Moments:
    """Streaming per-coordinate mean and standard deviation (float64, O(d) memory)."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.to(torch.float64)
        s, q = rows.sum(dim=0), (rows * rows).sum(dim=0)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = q if self.sumsq is None else self.sumsq + q
        self.count += rows.shape[0]

    def stats(self) -> torch.Tensor | None:
        """(2, d): mean and (population) standard deviation; None before any row."""
        if self.count == 0 or self.sum is None or self.sumsq is None:
            return None
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean * mean).clamp_min(0.0)
        return torch.stack([mean, var.sqrt()])


@dataclass(frozen=True)
class Adversary:
    """An attack and the clients that carry it out, applied to a round's update stream.

    ``knowledge`` (collusive attacks): ``omniscient`` — the attackers know the mean and
    standard deviation of the round's benign updates (the strongest, usual assumption of
    Baruch et al. 2019 and Xie et al. 2020); ``own`` — they estimate them from their own
    honestly trained updates.
    """

    attack: Attack
    attackers: frozenset[str]
    seed: int = 0
    knowledge: str = "omniscient"

    def __post_init__(self) -> None:
        if self.knowledge not in ("omniscient", "own"):
            raise ConfigError(f"must be 'omniscient' or 'own', got {self.knowledge!r}", key="attack.knowledge")

    def intercept(self, updates: Iterator[ClientUpdate], ctx: AttackContext) -> Iterator[ClientUpdate]:
        """The round's updates with the attackers' replaced; benign ones pass unchanged and in order.

        A collusive attack holds the attackers' updates back until the stream ends (it needs
        the round's statistics); the others are changed as they pass.
        """
        attack = self.attack
        held: list[ClientUpdate] = []
        moments = _Moments()
        mask = ctx.spec.trainable_mask()
        try:
            for up in updates:
                if up.client_id not in self.attackers or attack.poisons_data:
                    if attack.collusive and self.knowledge == "omniscient" and up.delta is not None:
                        d = _unweighted(up)[mask]
                        if bool(torch.isfinite(d).all()):
                            moments.add(d.unsqueeze(0))
                    yield up
                    continue
                if up.delta is None:
                    raise ConfigError(
                        f"attack {attack.name!r} needs dense updates, but client {up.client_id!r} sent an encoded payload",
                        key="attack",
                    )
                if attack.collusive:
                    held.append(up)
                    continue
                yield from self._replace([up], None, n=0, ctx=ctx)
            if held:
                own = torch.stack([_unweighted(u)[mask] for u in held])
                if self.knowledge == "own":
                    moments.add(own)
                n = len(held) + (moments.count if self.knowledge == "omniscient" else 0)
                yield from self._replace(held, moments.stats(), n=n, ctx=ctx)
        finally:
            close = getattr(updates, "close", None)
            if close is not None:
                close()

    def _replace(
        self, ups: list[ClientUpdate], benign: torch.Tensor | None, *, n: int, ctx: AttackContext
    ) -> Iterator[ClientUpdate]:
        mask = ctx.spec.trainable_mask()
        own = torch.stack([_unweighted(u)[mask] for u in ups]).to(torch.float64)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "attack", ctx.round, ups[0].client_id) % (2**63))
        bad = self.attack.craft(own, benign, n=n, gen=gen)
        for i, up in enumerate(ups):
            assert up.delta is not None
            claimed = self.attack.examples(up.num_examples)
            out = replace(up, num_examples=claimed)
            weight = up.weight
            if ctx.weighting is not None and weight is not None:
                weight = ctx.weighting.weight_of(out)  # the rule's weight for the declared count
            delta = _unweighted(up).clone()
            delta[mask] = bad[i].to(delta.dtype)
            if weight is not None:
                delta = delta * weight
            yield replace(out, delta=delta, weight=weight)


def _unweighted(up: ClientUpdate) -> torch.Tensor:
    """The update's delta divided by the weight a weighting stage applied (as is without one)."""
    assert up.delta is not None
    if up.weight is None or up.weight == 0.0:
        return up.delta
    return up.delta / up.weight
