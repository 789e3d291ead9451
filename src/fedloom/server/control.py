"""The server's control-RPC budget: heartbeat and long-poll intervals scaled to its connected clients.

Each connected client costs the server control calls even when it has no work: a heartbeat
every ``heartbeat_interval`` seconds and, between tasks, a long poll that returns ``idle``
every ``pull_wait`` seconds. With the defaults (5 s, 10 s) 10,000 idle clients make ~3,000
calls/s, enough to saturate a small server. :class:`ControlPlan` bounds that rate: the
configured intervals are the shortest the server advertises; with ``N`` clients connected
both grow by the factor ``s = max(1, N (1/heartbeat + 1/pull_wait) / max_rate)``, so the
clients' control calls stay within ``max_rate`` per second. Two bounds keep it safe:

* the heartbeat interval never exceeds ``heartbeat_timeout / 3`` (a live client must not be
  timed out between two heartbeats), nor drops below the configured one;
* the long-poll wait never exceeds :data:`MAX_PULL_WAIT`.

A waiting poll costs nothing but a coroutine and its HTTP/2 stream, and it returns as soon
as a task is posted, so longer polls delay no round. The server keeps the clients holding
open long polls live (:class:`~fedloom.server.service.FleetService` touches them every
``heartbeat_timeout / 3`` seconds), so a client that knows it (the server advertised a
``pull_wait``) does not heartbeat while its long poll waits: an idle client then costs one
call per ``pull_wait``, and only the clients at work (the cohort) heartbeat.

The advertised values reach the clients in the Register and Heartbeat replies
(``heartbeat_interval``, ``pull_wait``); older clients keep their own long-poll wait, which
the server caps at the current ``pull_wait``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_CONTROL_RATE", "MAX_PULL_WAIT", "ControlPlan"]

DEFAULT_MAX_CONTROL_RATE = 500.0
"""Control calls per second (heartbeats + idle long polls) the clients of one server may make together."""

MAX_PULL_WAIT = 600.0
"""The longest long poll the server advertises, in seconds."""


@dataclass(frozen=True)
class ControlPlan:
    """The intervals the server advertises: ``heartbeat_interval`` and ``pull_wait`` (the configured
    ones, ``deploy.heartbeat_interval`` and ``deploy.max_pull_wait``), scaled up with the number of
    clients so they make at most ``max_rate`` control calls per second (0: never scaled)."""

    heartbeat_interval: float
    pull_wait: float
    heartbeat_timeout: float
    max_rate: float = DEFAULT_MAX_CONTROL_RATE

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval", "pull_wait", "heartbeat_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.max_rate >= 0:
            raise ValueError(f"max_rate must be >= 0, got {self.max_rate!r}")

    def scale(self, clients: int) -> float:
        """The factor both intervals grow by with ``clients`` connected (1 up to the budget)."""
        if self.max_rate == 0 or clients <= 0:
            return 1.0
        return max(1.0, clients * (1.0 / self.heartbeat_interval + 1.0 / self.pull_wait) / self.max_rate)

    def intervals(self, clients: int) -> tuple[float, float]:
        """``(heartbeat_interval, pull_wait)`` to advertise with ``clients`` connected."""
        s = self.scale(clients)
        heartbeat = min(self.heartbeat_interval * s, max(self.heartbeat_interval, self.heartbeat_timeout / 3.0))
        pull_wait = min(self.pull_wait * s, max(self.pull_wait, MAX_PULL_WAIT))
        return heartbeat, pull_wait

    def rate(self, clients: int, *, idle_heartbeats: bool = True) -> float:
        """Control calls per second ``clients`` idle clients make at the advertised intervals
        (``idle_heartbeats`` False: clients that do not heartbeat while they long-poll)."""
        heartbeat, pull_wait = self.intervals(clients)
        return clients / pull_wait + (clients / heartbeat if idle_heartbeats else 0.0)
