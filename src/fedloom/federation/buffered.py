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
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.core.seeding import derive_seed
from fedloom.core.types import ClientInstruction, ClientUpdate, Payload, tensor_bytes
from fedloom.engines.base import Engine
from fedloom.federation.attempt import Attempt
from fedloom.federation.timing import LatencyModel
from fedloom.pipeline import Pipeline

if TYPE_CHECKING:
    from fedloom.federation.loop import Federation

log = logging.getLogger("fedloom.federation")

__all__ = [
    "BufferPolicy",
    "BufferedRounds",
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


class BufferedRounds:
    """The round loop's buffered closing (a mixin of :class:`~fedloom.federation.loop.Federation`)."""

    def _open_flights(self: Federation) -> Flights:
        """The flights of a buffered run: restored from the state's schedule (a resumed run re-dispatches them)."""
        sched = dict(self.state.meta.get("schedule") or {})
        clock = float(sched.get("clock", 0.0))
        if self.engine.live:
            self.engine.available_clients()  # wait for min_clients first: the clock counts from the first dispatch
            flights: Flights = LiveFlights(self.engine, clock=clock)
        else:
            intercept = None
            if self.adversary is not None:
                from fedloom.attacks import AttackContext

                adversary = self.adversary
                weighting = next((st for st in self.pipeline.stages if st.weighting and st.runs_on_client), None)

                def intercept(stream: Iterator[ClientUpdate], rnd: int) -> Iterator[ClientUpdate]:
                    return adversary.intercept(stream, AttackContext(self.spec, rnd, weighting))  # type: ignore[arg-type]

            flights = SimulatedFlights(self.engine, self.latency or LatencyModel(seed=self.strategy.seed), clock=clock, intercept=intercept)
        self._serial = int(sched.get("serial", 0))
        bases = {int(k.rsplit(".", 1)[1]): t for k, t in self.state.tensors.items() if k.startswith("schedule.base.")}
        pending = [f for f in sched.get("flights", []) if int(f[1]) in bases]
        available = set(self.engine.available_clients()) if pending else set()
        by_version: dict[int, list[Flight]] = {}
        for cid, version, serial, seed, due in pending:
            if cid not in available:
                log.warning("resume: %r was training from version %d and is gone; not re-dispatched", cid, version)
                continue
            ins = replace(self._instructions(int(version) + 1, [cid], self.pipeline.for_round(self.state.tensors, self.state.meta))[0], seed=int(seed), model_version=int(version))
            by_version.setdefault(int(version), []).append(Flight(cid, int(version), int(serial), ins, float(due)))
        for version, group in sorted(by_version.items()):
            log.info("resume: re-dispatching %d client(s) that were training from version %d", len(group), version)
            flights.dispatch(version, bases[version], None, group)
        return flights

    def _attempt_buffered(self: Federation, rnd: int, rejected: dict[str, str], pipe: Pipeline) -> Attempt:
        """One buffered round: keep ``concurrency`` clients in flight, close at ``size`` valid updates.

        Arrivals due at the same (simulated) instant are taken together before anyone new is
        dispatched, so equal latencies with K = concurrency replay synchronous rounds exactly.
        """
        assert self.buffer is not None
        if self._flights is None:
            self._flights = self._open_flights()
        fl = self._flights
        version = self.state.round
        aggregator = self.strategy.aggregator(self.state, rnd)
        ctx = self._ctx(rnd)
        sent = pipe.broadcast(self.state.params, ctx, derive_seed(self.strategy.seed, "broadcast", rnd))
        accepted: list[str] = []
        staleness: list[int] = []
        dispatched: list[str] = []
        bytes_down = bytes_up = 0
        available: list[str] = []
        draws = 0
        again: dict[str, int] = {}
        failures = 0  # arrivals in a row that brought no usable update
        patience = self.buffer.concurrency * (self.round_retries + 1)
        while len(accepted) < self.buffer.size:
            if not fl.ready():  # nothing else due now: top up the clients in flight
                flying = fl.in_flight()
                want = self.buffer.concurrency - len(flying)
                if want > 0:  # with work in flight, top up from whoever is there now rather than wait
                    available = self.engine.clients_now() if flying else self.engine.available_clients()
                    busy = {f.client_id for f in flying} | set(accepted)
                    idle = sorted(set(available) - busy)
                    chosen = self.strategy.sampler.draw(rnd, idle, want, salt=draws) if idle else []
                    draws += 1
                    if chosen:
                        instructions = self._instructions(rnd, chosen, pipe)
                        new = []
                        for ins in instructions:
                            k = again.get(ins.client_id, 0)  # dispatched before at this version: a fresh seed
                            again[ins.client_id] = k + 1
                            if k:
                                ins = replace(ins, seed=derive_seed(ins.seed, "again", k))
                            self._serial += 1
                            new.append(Flight(ins.client_id, version, self._serial, ins, fl.due(ins.client_id, self._serial)))
                        fl.dispatch(version, sent.vector, sent.payload, new)
                        dispatched.extend(chosen)
                        bytes_down += sum(sent.nbytes + sum(tensor_bytes(t) for t in ins.payload.values()) for ins in instructions)
            arrival = fl.next()
            if arrival is None:
                log.warning("round %d: no client in flight and none idle to dispatch", rnd)
                break
            f, update, why = arrival
            if update is None:
                rejected[f.client_id] = why
                log.warning("round %d: %r (from version %d) brought no update: %s", rnd, f.client_id, f.version, why)
            else:
                bytes_up += update.nbytes
            if update is None or not self._fold(
                aggregator, f.client_id, rnd, rejected, lambda f=f, u=update: self._check_flight(f, u, version, pipe)
            ):
                failures += 1
                if failures >= patience:  # every dispatch failing (a broken client fleet, a bug): close, do not spin
                    log.warning("round %d: %d arrivals in a row brought nothing usable; closing with %d update(s)", rnd, failures, len(accepted))
                    break
                continue
            failures = 0
            accepted.append(f.client_id)
            staleness.append(version - f.version)
        for cid, reason in self.engine.take_rejections().items():
            rejected[cid] = reason
        metrics: dict[str, float] = {"in_flight": float(len(fl.in_flight()))}
        if staleness:
            metrics["staleness_mean"] = sum(staleness) / len(staleness)
            metrics["staleness_max"] = float(max(staleness))
        return Attempt(
            aggregator, accepted, bytes_down, bytes_up, len(set(available)), dispatched=dispatched, metrics=metrics
        )

    def _check_flight(self: Federation, f: Flight, update: ClientUpdate, version: int, pipe: Pipeline) -> ClientUpdate:
        """A buffered arrival checked against its dispatch and scaled by its staleness weight."""
        assert self.buffer is not None
        cid = f.client_id
        if update.model_version != f.version:
            raise InvalidUpdateError(
                f"update says it started from model version {update.model_version}, it was sent version {f.version}",
                client_id=cid,
            )
        tau = version - f.version
        if tau > self.buffer.max_staleness:
            raise InvalidUpdateError(f"staleness {tau} is beyond max_staleness {self.buffer.max_staleness}", client_id=cid)
        update = self._check(update, {cid}, f.round, self._ctx(f.round), pipe)
        s = self.buffer.weight(tau)
        if s != 1.0:
            assert update.delta is not None
            update = replace(update, delta=update.delta * s)
        return update

    def _schedule_snapshot(self: Federation, dispatched: Sequence[str]) -> float:
        """Advance a synchronous run's simulated clock; put the schedule in the state; return the clock."""
        sched = dict(self.state.meta.get("schedule") or {})
        tensors = {k: v for k, v in self.state.tensors.items() if not k.startswith("schedule.base.")}
        if self._flights is not None:
            clock = self._flights.now()
            sched = {"clock": clock, "serial": self._serial, "flights": [f.to_json() for f in self._flights.in_flight()]}
            tensors.update({f"schedule.base.{v}": t for v, t in self._flights.bases().items()})
        else:  # synchronous: the round lasts as long as its slowest client
            assert self.latency is not None
            serial = int(sched.get("serial", 0))
            durations = []
            for cid in dispatched:
                serial += 1
                durations.append(self.latency.duration(cid, serial))
            clock = float(sched.get("clock", 0.0)) + max(durations, default=0.0)
            sched = {"clock": clock, "serial": serial}
        self.state = replace(self.state, tensors=tensors, meta={**self.state.meta, "schedule": sched})
        return clock
