"""The client side of round protocols for in-process clients, with simulated dropouts.

Simulation engines (and the deployed agent) keep one :class:`ProtocolClients`: it holds
each client's protocol session for the round — a :class:`~fedloom.secure.secagg.SecAggClient`
or a :class:`~fedloom.secure.ckks.CkksClient`, chosen by the message's protocol — answers the
server's exchange messages, and seals (masks or encrypts) trained updates. ``drop``
decides whether a client drops out before answering a stage (SecAgg: ``advertise``,
``share``, ``input`` (after sending its shares), ``unmask`` (after sending its masked
input); CKKS: ``keys``, ``input``, ``decrypt``); a dropped client's session is discarded,
so it never answers that round again. :class:`DropoutModel` is the seeded Bernoulli model a
config names.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedloom.core.errors import ConfigError, ProtocolError
from fedloom.core.seeding import derive_seed
from fedloom.core.types import ClientInstruction, ClientUpdate, ProtocolMessage

# the stage names of each protocol (its module, and cryptography or tenseal, load on first use)
PROTOCOL = "secagg"
ADVERTISE = "advertise"
STAGES = ("advertise", "share", "input", "unmask")
PROTOCOLS: Mapping[str, tuple[str, str, tuple[str, ...], tuple[str, ...]]] = {
    # protocol: (module, session class, stages, stages that open a session)
    "secagg": ("fedloom.secure.secagg", "SecAggClient", STAGES, (ADVERTISE,)),
    "ckks": ("fedloom.secure.ckks", "CkksClient", ("keys", "input", "decrypt"), ("keys", "input")),
}

Exchange = Callable[[Sequence[ProtocolMessage]], Iterable[ProtocolMessage]]
"""Sends one message to each addressed client and yields the replies that come back (an engine's ``exchange``)."""

__all__ = ["DropFn", "DropoutModel", "Exchange", "ProtocolClients", "SecureConfig", "SecureServer"]

log = logging.getLogger("fedloom.secure")

class SecureServer(Protocol):
    """The server's side of one secure round (SecAgg's or CKKS's), as the round loop drives it."""

    rejected: dict[str, str]
    bytes_down: int
    bytes_up: int

    def setup(self, exchange: Exchange) -> list[str]: ...
    def input_message(self, cid: str) -> ProtocolMessage: ...
    def check(self, update: ClientUpdate) -> None: ...
    def add(self, update: ClientUpdate, numel: int) -> None: ...
    def finish(self, exchange: Exchange) -> tuple[Any, list[str]]: ...


class SecureConfig(Protocol):
    """A secure-aggregation protocol's options (:class:`~fedloom.secure.secagg.SecAggConfig`, :class:`~fedloom.secure.ckks.CkksConfig`)."""

    @property
    def name(self) -> str: ...
    def wire_bytes(self, numel: int) -> int: ...
    def server(self, rnd: int, cohort: Sequence[str], seed: int) -> Any: ...


DropFn = Callable[[int, str, str], bool]
"""``drop(round, client_id, stage)``: True if the client drops out before answering that stage."""


@dataclass(frozen=True)
class DropoutModel:
    """Each client drops before each stage with that stage's probability (seeded, reproducible)."""

    rates: Mapping[str, float] = field(default_factory=dict)
    seed: int = 0
    stages: tuple[str, ...] = STAGES

    def __post_init__(self) -> None:
        for stage, p in self.rates.items():
            if stage not in self.stages:
                raise ConfigError(f"unknown stage {stage!r}; stages: {', '.join(self.stages)}", key=f"dropout.{stage}")
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
            self.last_error = f"dropped out (simulated) before stage {stage!r}"
            return True
        return False

    def _session(self, msg: ProtocolMessage, stage: str) -> Any:
        """The client's session for ``msg`` (a new one if the stage opens a session of a new round), or None."""
        spec = PROTOCOLS.get(msg.protocol)
        if spec is None:
            log.warning("client %r: unknown protocol %r", msg.client_id, msg.protocol)
            self.last_error = f"unknown protocol {msg.protocol!r}"
            return None
        module, cls, _, opens = spec
        session = self._sessions.get(msg.client_id)
        fresh = session is None or type(session).__name__ != cls or session.round not in (None, msg.round)
        if stage in opens and (stage == opens[0] or fresh):
            session = getattr(importlib.import_module(module), cls)(msg.client_id)
            self._sessions[msg.client_id] = session
        elif session is None or type(session).__name__ != cls:
            log.warning("client %r: %s message without a session; ignored", msg.client_id, stage)
            self.last_error = f"{stage}: no session of this round (a message out of order)"
            return None
        return session

    def handle(self, msg: ProtocolMessage) -> ProtocolMessage | None:
        """The client's reply, or None if it dropped or refused the message (logged)."""
        if self._dropped(msg, msg.stage):
            return None
        session = self._session(msg, msg.stage)
        if session is None:
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
        """``update`` masked or encrypted by its client's session (the input stage), or None if the client drops."""
        msg = instruction.protocol
        assert msg is not None
        if self._dropped(msg, msg.stage):
            return None
        session = self._session(msg, msg.stage)
        if session is None:
            log.warning("client %r: a protocol input task without a session; dropped", instruction.client_id)
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
