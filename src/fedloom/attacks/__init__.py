"""Attacks for robustness experiments: malicious clients' updates and poisoned data.

``[attack]`` in a config names an attack and who carries it out (a seeded share of the
population, or named clients); :func:`plan_attack` builds the run's :class:`Adversary`, which
the round loop puts on the update stream of every simulation engine. Defences live with the
rules they belong to: robust aggregators in :mod:`fedloom.strategies.robust`, norm bounding
and capped weights in :mod:`fedloom.pipeline`.
"""

from fedloom.attacks.base import Adversary, Attack, AttackContext, choose_attackers
from fedloom.attacks.plan import ATTACKS, build_attack, list_attacks, plan_attack
from fedloom.attacks.poison import LabelFlip, flip_labels
from fedloom.attacks.updates import ALIE, GaussianNoise, Inflate, InnerProduct, Scale, SignFlip, alie_z

__all__ = [
    "ALIE",
    "ATTACKS",
    "Adversary",
    "Attack",
    "AttackContext",
    "GaussianNoise",
    "Inflate",
    "InnerProduct",
    "LabelFlip",
    "Scale",
    "SignFlip",
    "alie_z",
    "build_attack",
    "choose_attackers",
    "flip_labels",
    "list_attacks",
    "plan_attack",
]
