"""The client side of round protocols for in-process clients, with simulated dropouts.

Simulation engines keep one :class:`ProtocolClients`: it holds each simulated client's
protocol session (:class:`~fedloom.secure.secagg.SecAggClient`) for the round, answers the
server's exchange messages, and seals (masks) trained updates. ``drop`` decides whether a
client drops out before answering a stage (``advertise``, ``share``, ``input``: after
sending its shares, ``unmask``: after sending its masked input); a dropped client's
session is discarded, so it never answers that round again. :class:`DropoutModel` is the
seeded Bernoulli model a config names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedloom.core.errors import ConfigError, ProtocolError
from fedloom.core.seeding import derive_seed
from fedloom.core.types import ClientInstruction, ClientUpdate, ProtocolMessage

# the stage names of :mod:`fedloom.secure.secagg` (that module, and cryptography, load on first use)
PROTOCOL = "secagg"
ADVERTISE = "advertise"
STAGES = ("advertise", "share", "input", "unmask")

__all__ = ["DropFn", "DropoutModel", "ProtocolClients"]

log = logging.getLogger("fedloom.secure")

DropFn = Callable[[int, str, str], bool]
"""``drop(round, client_id, stage)``: True if the client drops out before answering that stage."""


@dataclass(frozen=True)
class DropoutModel:
    """Each client drops before each stage with that stage's probability (seeded, reproducible)."""

    rates: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        for stage, p in self.rates.items():
            if stage not in STAGES:
                raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}", key=f"dropout.{stage}")
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ConfigError(f"must be a probability in [0, 1], got {p!r}", key=f"dropout.{stage}")

    def __call__(self, rnd: int, client_id: str, stage: str) -> bool:
        p = float(self.rates.get(stage, 0.0))
        if p <= 0.0:
            return False
        u = (derive_seed(self.seed, "dropout", rnd, client_id, stage) % (1 << 53)) / float(1 << 53)
        return u < p


class ProtocolClients:
    """Protocol sessions of in-process clients, keyed by client id (one round at a time)."""

    def __init__(self, drop: DropFn | None = None) -> None:
        self.drop = drop
        self._sessions: dict[str, Any] = {}
        self.dropped: list[tuple[int, str, str]] = []
        self.last_error = ""  # why the last message was refused

    def _dropped(self, msg: ProtocolMessage, stage: str) -> bool:
        if self.drop is not None and self.drop(msg.round, msg.client_id, stage):
            self._sessions.pop(msg.client_id, None)
            self.dropped.append((msg.round, msg.client_id, stage))
            return True
        return False

    def handle(self, msg: ProtocolMessage) -> ProtocolMessage | None:
        """The client's reply, or None if it dropped or refused the message (logged)."""
        if self._dropped(msg, msg.stage):
            return None
        if msg.protocol != PROTOCOL:
            log.warning("client %r: unknown protocol %r", msg.client_id, msg.protocol)
            return None
        if msg.stage == ADVERTISE:
            from fedloom.secure.secagg import SecAggClient

            self._sessions[msg.client_id] = SecAggClient(msg.client_id)
        session = self._sessions.get(msg.client_id)
        if session is None:
            log.warning("client %r: %s message without a session; ignored", msg.client_id, msg.stage)
            self.last_error = f"{msg.stage}: no session of this round (a message out of order)"
            return None
        try:
            return session.handle(msg)
        except ProtocolError as exc:
            log.warning("client %r refused the server's %s message: %s", msg.client_id, msg.stage, exc)
            self.last_error = f"{msg.stage}: {exc}"
            self._sessions.pop(msg.client_id, None)
            return None

    def exchange(self, requests: Sequence[ProtocolMessage]) -> Iterator[ProtocolMessage]:
        for m in requests:
            r = self.handle(m)
            if r is not None:
                yield r

    def seal(self, instruction: ClientInstruction, update: ClientUpdate) -> ClientUpdate | None:
        """``update`` masked by its client's session (the input stage), or None if the client drops."""
        msg = instruction.protocol
        assert msg is not None
        if self._dropped(msg, msg.stage):
            return None
        session = self._sessions.get(instruction.client_id)
        if session is None:
            log.warning("client %r: a masked-input task without a session; dropped", instruction.client_id)
            self.last_error = "input: no session of this round (a message out of order)"
            return None
        try:
            return session.seal(update, msg, seed=derive_seed(instruction.seed, "secagg"))
        except ProtocolError as exc:
            log.warning("client %r refused the input stage: %s", instruction.client_id, exc)
            self.last_error = f"input: {exc}"
            self._sessions.pop(instruction.client_id, None)
            return None

    def end_round(self) -> None:
        """Forget every session (a new round starts with fresh keys)."""
        self._sessions.clear()
