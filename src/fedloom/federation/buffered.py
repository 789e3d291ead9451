"""Buffered asynchronous closing (FedBuff, Nguyen et al. 2022): a closing policy of the one round loop.

A synchronous round dispatches a cohort and closes when all of it answered (or, with
over-selection, the first m). A *buffered* round keeps ``concurrency`` clients training at
all times and closes as soon as ``size`` (K) valid updates are in; the clients still
training go on across the server's apply and their updates land in a later buffer. Each
dispatch is stamped with the model version it started from; at the apply of version v an
update started from version b has staleness τ = v − b, and its delta is scaled by
s(τ) before it is summed (the weights are not, so a buffer of uniform weights applies
(1/K) Σ s(τ_i) Δ_i, the paper's Algorithm 1):

* ``polynomial``: s(τ) = (1 + τ)^(−a) (FedBuff uses a = 0.5; Xie et al. 2019's FedAsync family),
* ``hinge``: s(τ) = 1 for τ ≤ b, else 1 / (a (τ − b) + 1) (Xie et al. 2019),
* ``constant``: s(τ) = 1.

An update staler than ``max_staleness`` is refused with the reason.

Where the work runs is the :class:`Flights` object's business, with the same interface for
both: :class:`SimulatedFlights` (simulation engines) runs a simulated clock — each dispatch
gets a duration from the :class:`~fedloom.federation.timing.LatencyModel`, arrivals come in
order of simulated time, and the training itself is done lazily, one ``run_cohort`` call per
group of clients that share a base version (so the vectorized engine trains them in
lockstep); :class:`LiveFlights` (the remote engine) dispatches real tasks and takes updates as
client processes push them, in real time. Both can say what is in flight (client, base
version, dispatch serial, due time), which the loop checkpoints with the base models still
referenced, so a resumed run re-dispatches the interrupted work.
"""

from __future__ import annotations

import heapq
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from fedloom.core.errors import ConfigError
from fedloom.core.types import ClientInstruction, ClientUpdate, Payload
from fedloom.engines.base import Engine
from fedloom.federation.timing import LatencyModel

__all__ = [
    "BufferPolicy",
    "Flight",
    "Flights",
    "LiveFlights",
    "SimulatedFlights",
    "StalenessName",
]

StalenessName = Literal["polynomial", "hinge", "constant"]


@dataclass(frozen=True)
class BufferPolicy:
    """FedBuff's settings: ``size`` K, ``concurrency`` (clients in flight), staleness weighting and bound."""

    size: int
    concurrency: int
    max_staleness: int = 100
    staleness: StalenessName = "polynomial"
    exponent: float = 0.5
    hinge: int = 10

    def __post_init__(self) -> None:
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(msg, key=f"buffer.{key}")

        for key in ("size", "concurrency", "hinge"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "hinge" else 1):
                raise bad(key, f"must be an integer >= {0 if key == 'hinge' else 1}, got {v!r}")
        if isinstance(self.max_staleness, bool) or not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise bad("max_staleness", f"must be an integer >= 0, got {self.max_staleness!r}")
        if self.concurrency < self.size:
            raise bad("concurrency", f"must be >= size ({self.size}): a buffer of K updates needs K clients in flight, got {self.concurrency}")
        if self.staleness not in ("polynomial", "hinge", "constant"):
            raise bad("staleness", f"must be 'polynomial', 'hinge' or 'constant', got {self.staleness!r}")
        if not (isinstance(self.exponent, (int, float)) and math.isfinite(self.exponent) and self.exponent >= 0):
            raise bad("exponent", f"must be a finite number >= 0, got {self.exponent!r}")

    def weight(self, tau: int) -> float:
        """s(τ), the factor on the delta of an update of staleness ``tau``."""
        if tau < 0:
            raise ValueError(f"staleness must be >= 0, got {tau}")
        if self.staleness == "polynomial":
            return float((1.0 + tau) ** (-self.exponent))
        if self.staleness == "hinge":
            return 1.0 if tau <= self.hinge else 1.0 / (self.exponent * (tau - self.hinge) + 1.0)
        return 1.0


@dataclass(frozen=True)
class Flight:
    """One dispatch: who, from which model version, its instruction and when it is due (simulated)."""

    client_id: str
    version: int
    serial: int
    instruction: ClientInstruction
    due: float = 0.0

    @property
    def round(self) -> int:
        return self.instruction.round

    def to_json(self) -> list[Any]:
        return [self.client_id, self.version, self.serial, self.instruction.seed, self.due]


Arrival = tuple[Flight, ClientUpdate | None, str]
"""A flight that ended: its update, or None and the reason it brought none."""


class Flights(Protocol):
    """Work in flight across applies (see the module docstring)."""

    def now(self) -> float: ...
    def dispatch(self, version: int, base: torch.Tensor, broadcast: Payload | None, flights: Sequence[Flight]) -> None: ...
    def in_flight(self) -> list[Flight]: ...
    def ready(self) -> bool: ...
    def next(self) -> Arrival | None: ...
    def bases(self) -> dict[int, torch.Tensor]: ...
    def close(self) -> None: ...


class SimulatedFlights:
    """Flights on a simulated clock (``latency``), trained lazily by a simulation ``engine``.

    ``intercept(stream, round)`` (optional) wraps each group's update stream (a robustness
    experiment's adversary).
    """

    def __init__(
        self,
        engine: Engine,
        latency: LatencyModel,
        *,
        clock: float = 0.0,
        intercept: Callable[[Iterator[ClientUpdate], int], Iterator[ClientUpdate]] | None = None,
    ) -> None:
        self.engine = engine
        self.latency = latency
        self._now = clock
        self._intercept = intercept
        self._heap: list[tuple[float, int, Flight]] = []
        self._bases: dict[int, torch.Tensor] = {}
        self._untrained: dict[int, list[Flight]] = {}
        self._results: dict[int, tuple[ClientUpdate | None, str]] = {}  # serial -> result

    def now(self) -> float:
        return self._now

    def due(self, client_id: str, serial: int) -> float:
        """When a dispatch made now would arrive."""
        return self._now + self.latency.duration(client_id, serial)

    def dispatch(self, version: int, base: torch.Tensor, broadcast: Payload | None, flights: Sequence[Flight]) -> None:
        if not flights:
            return
        self._bases.setdefault(version, base)
        for f in flights:
            heapq.heappush(self._heap, (f.due, f.serial, f))
            self._untrained.setdefault(version, []).append(f)

    def in_flight(self) -> list[Flight]:
        return [f for _, _, f in sorted(self._heap)]

    def ready(self) -> bool:
        """Whether another arrival is due at the current instant (ties close together)."""
        return bool(self._heap) and self._heap[0][0] <= self._now

    def _train(self, version: int) -> None:
        group = self._untrained.pop(version, [])
        if not group:
            return
        by_client = {f.client_id: f for f in group}
        stream = self.engine.run_cohort(self._bases[version], [f.instruction for f in group])
        if self._intercept is not None:
            stream = self._intercept(stream, version + 1)
        for up in stream:
            f = by_client.pop(up.client_id, None)
            if f is not None:
                self._results[f.serial] = (up, "")
        for f in by_client.values():
            self._results[f.serial] = (None, "the engine returned no update")

    def next(self) -> Arrival | None:
        if not self._heap:
            return None
        due, serial, f = heapq.heappop(self._heap)
        self._now = max(self._now, due)
        if serial not in self._results:
            self._train(f.version)
        up, why = self._results.pop(serial)
        if not any(g.version == f.version for _, _, g in self._heap):
            self._bases.pop(f.version, None)
        return f, up, why

    def bases(self) -> dict[int, torch.Tensor]:
        live = {f.version for _, _, f in self._heap}
        return {v: t for v, t in self._bases.items() if v in live}

    def close(self) -> None:
        self._heap.clear()
        self._bases.clear()
        self._untrained.clear()
        self._results.clear()


class LiveFlights:
    """Flights of real client processes (the remote engine), in real time.

    Each dispatch's tasks are posted at once; a thread per dispatch feeds the updates (or the
    clients' failures) into one queue as they arrive. ``clock`` is the time already spent
    before (a resumed run).
    """

    def __init__(self, engine: Engine, *, clock: float = 0.0) -> None:
        self.engine = engine
        self._t0 = time.monotonic() - clock
        self._queue: queue.Queue[Arrival] = queue.Queue()
        self._flights: dict[int, Flight] = {}
        self._bases: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def now(self) -> float:
        return time.monotonic() - self._t0

    def due(self, client_id: str, serial: int) -> float:
        return self.now()

    def dispatch(self, version: int, base: torch.Tensor, broadcast: Payload | None, flights: Sequence[Flight]) -> None:
        if not flights:
            return
        with self._lock:
            self._bases.setdefault(version, base)
            for f in flights:
                self._flights[f.serial] = f
        t = threading.Thread(target=self._run, args=(base, broadcast, list(flights)), daemon=True, name=f"flights-v{version}")
        self._threads = [th for th in self._threads if th.is_alive()]
        self._threads.append(t)
        t.start()

    def _run(self, base: torch.Tensor, broadcast: Payload | None, flights: list[Flight]) -> None:
        by_client = {f.client_id: f for f in flights}
        extra = {} if broadcast is None else {"broadcast": broadcast}
        try:
            stream = self.engine.run_cohort(base, [f.instruction for f in flights], cancel=self._stop, **extra)  # type: ignore[call-arg]
            for up in stream:
                f = by_client.pop(up.client_id, None)
                if f is not None:
                    self._queue.put((f, up, ""))
        except Exception as exc:  # noqa: BLE001 - a failed dispatch ends its flights, not the run
            why = f"dispatch failed: {type(exc).__name__}: {exc}"
        else:
            why = "no update (dropped, timed out or refused)"
        for f in by_client.values():
            self._queue.put((f, None, why))

    def in_flight(self) -> list[Flight]:
        with self._lock:
            return sorted(self._flights.values(), key=lambda f: f.serial)

    def ready(self) -> bool:
        return False  # real time has no ties: top up before every wait

    def next(self) -> Arrival | None:
        while True:
            with self._lock:
                if not self._flights:
                    return None
            try:
                f, up, why = self._queue.get(timeout=1.0)
            except queue.Empty:
                continue
            with self._lock:
                self._flights.pop(f.serial, None)
                if not any(g.version == f.version for g in self._flights.values()):
                    self._bases.pop(f.version, None)
            return f, up, why

    def bases(self) -> dict[int, torch.Tensor]:
        with self._lock:
            return dict(self._bases)

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        with self._lock:
            self._flights.clear()
            self._bases.clear()
