"""The server's view of its clients: registry, liveness, tasks and the results they return.

Thread-safe; the gRPC service (:mod:`fedloom.server.service`) calls into it from its event
loop and its decoding threads, the :class:`~fedloom.engines.remote.RemoteEngine` from the
round loop. It holds no gRPC itself (and no asyncio): tasks carry an already encoded tensor
body, results arrive decoded.

* A client **registers** (a new session; a re-registration after a crash replaces the old
  one), **heartbeats** (any call counts), and **leaves** at any time. It is *live* while it
  was seen within ``heartbeat_timeout`` seconds.
* The engine **posts** a batch of tasks (one per client, each with a fresh random
  ``task_id``) and gets a :class:`Collector`. A client **pulls** its task (long poll; a
  client that reconnects pulls it again) and **delivers** the result, which must name an
  outstanding task of that very client: a result for an unknown, cancelled or already
  answered task (late, replayed or forged) is refused with a reason. A long poll that must
  not hold a thread (the asyncio service) watches its client instead (:meth:`~Coordinator.watch`):
  a callback is told when a task is posted for it or the run ends, and it pulls again.
* Results reach the round loop through the collector's bounded queue, so pushes wait
  (backpressure) instead of piling up decoded updates: server memory stays O(model x
  results decoded at once), whatever the number of clients.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedloom.core.errors import FedloomError

if TYPE_CHECKING:  # a task's body is encoded once by the engine and only passed through here
    from fedloom.transport.wire import Body

__all__ = ["ClientInfo", "Collector", "Coordinator", "RegistrationRefused", "Result", "Task"]

log = logging.getLogger("fedloom.server")


@dataclass
class ClientInfo:
    """A registered client."""

    client_id: str
    session: str
    num_examples: int
    num_test_examples: int
    registered_at: float
    last_seen: float
    peer: str = ""


@dataclass
class Task:
    """Work for one client: ``kind`` (``task`` = train, ``evaluate``), metadata and tensor body."""

    task_id: str
    client_id: str
    kind: str
    meta: dict[str, Any]
    body: Body
    collector: Collector
    pulled: int = 0


@dataclass(frozen=True)
class Result:
    """What came back for a task: a payload (a ``ClientUpdate``, or ``(num_examples, metrics)`` of an
    evaluation), or a failure reason (client error, rejected result, dropout)."""

    client_id: str
    task_id: str
    payload: Any = None
    failure: str = ""


@dataclass
class Collector:
    """The results of one posted batch of tasks, in arrival order."""

    task_ids: frozenset[str]
    deadline: float
    queue: queue.Queue[Result] = field(default_factory=lambda: queue.Queue(maxsize=4))
    closed: bool = False

    def get(self, timeout: float) -> Result | None:
        try:
            return self.queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None


class RegistrationRefused(FedloomError):
    """A registration that contradicts what the client declared earlier in the run."""


class Coordinator:
    """Registry of clients and the tasks they owe (see the module docstring)."""

    def __init__(self, *, heartbeat_timeout: float = 30.0, remember_closed: int = 100_000) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self._lock = threading.Condition()
        self._clients: dict[str, ClientInfo] = {}
        self._sessions: dict[str, str] = {}
        self._tasks: dict[str, Task] = {}  # outstanding, by task id
        self._by_client: dict[str, str] = {}  # client id -> its outstanding task id
        self._closed: OrderedDict[str, str] = OrderedDict()  # recently finished task id -> why
        self._remember = remember_closed
        self._shutdown = False
        self._told: set[str] = set()  # clients told that the run is over
        self._declared: dict[str, tuple[int, int]] = {}  # first (train, test) example counts per client
        self._watchers: dict[str, list[Callable[[], None]]] = {}  # client id -> told when it may have a task

    # ------------------------------------------------------------ registry
    def register(self, client_id: str, *, num_examples: int, num_test_examples: int = 0, peer: str = "") -> str:
        """Register (or re-register) ``client_id``; return its new session token.

        The example counts a client declares first bound it for the rest of the run: a
        re-registration (after leaving, or a reconnect) may not claim more, or a client could
        buy any aggregation weight by registering again (:class:`RegistrationRefused`).
        """
        now = time.monotonic()
        with self._lock:
            first = self._declared.setdefault(client_id, (num_examples, num_test_examples))
            if num_examples > first[0] or num_test_examples > first[1]:
                raise RegistrationRefused(
                    f"{client_id!r} first registered {first[0]} training / {first[1]} test examples in this run "
                    f"and may not claim more ({num_examples} / {num_test_examples})"
                )
            old = self._clients.get(client_id)
            if old is not None:
                self._sessions.pop(old.session, None)
                log.info("client %r registered again (new session)", client_id)
            else:
                log.info("client %r registered (%d examples)", client_id, num_examples)
            session = secrets.token_hex(16)
            self._clients[client_id] = ClientInfo(client_id, session, num_examples, num_test_examples, now, now, peer)
            self._sessions[session] = client_id
            self._lock.notify_all()
            return session

    def client_of(self, session: str) -> str | None:
        """The client a session belongs to (None if unknown); counts as a sign of life."""
        with self._lock:
            cid = self._sessions.get(session)
            if cid is not None:
                self._clients[cid].last_seen = time.monotonic()
            return cid

    def leave(self, session: str) -> None:
        """The client leaves: it is no longer live; its outstanding task fails now."""
        with self._lock:
            cid = self._sessions.pop(session, None)
            if cid is None:
                return
            self._clients.pop(cid, None)
            self._lock.notify_all()
            log.info("client %r left", cid)
            tid = self._by_client.get(cid)
        if tid is not None:
            self._fail(tid, "client left")

    def live_clients(self) -> list[str]:
        """Ids of the clients seen within ``heartbeat_timeout`` seconds."""
        cutoff = time.monotonic() - self.heartbeat_timeout
        with self._lock:
            return sorted(c.client_id for c in self._clients.values() if c.last_seen >= cutoff)

    def info(self, client_id: str) -> ClientInfo | None:
        """A copy of one client's record (None if not registered)."""
        with self._lock:
            c = self._clients.get(client_id)
            return ClientInfo(**vars(c)) if c is not None else None

    def touch(self, client_id: str) -> None:
        """A sign of life from ``client_id`` (e.g. each chunk of an upload in progress)."""
        with self._lock:
            c = self._clients.get(client_id)
            if c is not None:
                c.last_seen = time.monotonic()

    def clients(self) -> list[ClientInfo]:
        with self._lock:
            return [ClientInfo(**vars(c)) for c in self._clients.values()]

    def wait_for_clients(self, n: int, timeout: float) -> list[str]:
        """Block until ``n`` clients are live or ``timeout`` passes; return the live ones."""
        end = time.monotonic() + timeout
        while True:
            live = self.live_clients()
            left = end - time.monotonic()
            if len(live) >= n or left <= 0 or self._shutdown:
                return live
            with self._lock:
                self._lock.wait(timeout=min(left, 0.5))

    # ------------------------------------------------------------ tasks
    def post(self, tasks: list[tuple[str, str, dict[str, Any], Body]], *, deadline: float) -> Collector:
        """Post ``(client_id, kind, meta, body)`` tasks due by ``deadline`` (monotonic time)."""
        ids = [secrets.token_hex(16) for _ in tasks]
        collector = Collector(task_ids=frozenset(ids), deadline=deadline, queue=queue.Queue(maxsize=4))
        with self._lock:
            for tid, (cid, kind, meta, body) in zip(ids, tasks, strict=True):
                prev = self._by_client.get(cid)
                if prev is not None:
                    self._forget(prev, "superseded by a newer task")
                self._tasks[tid] = Task(tid, cid, kind, {**meta, "task_id": tid}, body, collector)
                self._by_client[cid] = tid
            self._lock.notify_all()
            told = [fn for cid, *_ in tasks for fn in self._watchers.get(cid, ())]
        self._tell(told)
        return collector

    def watch(self, client_id: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from the posting thread) whenever a task is posted for ``client_id`` or the run ends.

        Returns the function that stops watching. The callback must be quick and must not call
        back into the coordinator (an event loop's ``call_soon_threadsafe`` is the intended
        one); after it, :meth:`pull` with ``wait=0`` finds the task.
        """
        with self._lock:
            self._watchers.setdefault(client_id, []).append(callback)

        def unwatch() -> None:
            with self._lock:
                fns = self._watchers.get(client_id)
                if fns is not None and callback in fns:
                    fns.remove(callback)
                    if not fns:
                        del self._watchers[client_id]

        return unwatch

    @staticmethod
    def _tell(callbacks: list[Callable[[], None]]) -> None:
        for fn in callbacks:
            try:
                fn()
            except Exception:  # noqa: BLE001 - a watcher whose event loop has closed: nothing to wake
                log.debug("a task watcher could not be told", exc_info=True)

    def pull(self, client_id: str, wait: float) -> Task | None:
        """The client's outstanding task, waiting up to ``wait`` seconds for one."""
        end = time.monotonic() + wait
        with self._lock:
            while True:
                tid = self._by_client.get(client_id)
                if tid is not None:
                    task = self._tasks[tid]
                    task.pulled += 1
                    return task
                left = end - time.monotonic()
                if left <= 0 or self._shutdown:
                    return None
                self._lock.wait(timeout=min(left, 1.0))

    def outstanding(self, client_id: str, task_id: str) -> str | None:
        """None if ``task_id`` is ``client_id``'s outstanding task, else why a result for it is refused."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                why = self._closed.get(task_id)
                return f"task is closed ({why})" if why else "unknown task (forged or replayed?)"
            if task.client_id != client_id:
                return "task belongs to another client"
            return None

    def task(self, task_id: str) -> Task | None:
        with self._lock:
            return self._tasks.get(task_id)

    def deliver(self, client_id: str, task_id: str, payload: Any, failure: str = "") -> str | None:
        """Hand a result (or a failure) to its round; None if taken, else why it was refused."""
        with self._lock:
            why = self.outstanding(client_id, task_id)
            if why is not None:
                return why
            task = self._tasks[task_id]
            self._forget(task_id, "answered" if not failure else f"failed: {failure}")
            collector = task.collector
        result = Result(client_id, task_id, payload, failure)
        while True:  # backpressure: wait for the round loop, unless it has moved on
            if collector.closed:
                return "round closed before the result could be taken (deadline passed)"
            try:
                collector.queue.put(result, timeout=0.2)
                return None
            except queue.Full:
                continue

    def close(self, collector: Collector, reason: str) -> list[str]:
        """Cancel the collector's unanswered tasks (their late results will be refused); return their clients."""
        dropped = []
        with self._lock:
            collector.closed = True
            for tid in collector.task_ids:
                task = self._tasks.get(tid)
                if task is not None:
                    dropped.append(task.client_id)
                    self._forget(tid, reason)
        while True:  # unblock pushers waiting on a full queue
            try:
                collector.queue.get_nowait()
            except queue.Empty:
                break
        return sorted(dropped)

    def reap(self, collector: Collector) -> list[str]:
        """Fail the collector's tasks whose clients are no longer live (missed heartbeats)."""
        live = set(self.live_clients())
        with self._lock:
            dead = [t for t in self._tasks.values() if t.collector is collector and t.client_id not in live]
        for task in dead:
            self._fail(task.task_id, "client stopped answering heartbeats")
        return sorted(t.client_id for t in dead)

    def fail(self, task_id: str, reason: str) -> None:
        """Write off an outstanding task now (its round learns why; later results are refused)."""
        self._fail(task_id, reason)

    def shutdown(self) -> None:
        """The run is over: pulls return at once (clients are told to stop)."""
        with self._lock:
            self._shutdown = True
            self._lock.notify_all()
            told = [fn for fns in self._watchers.values() for fn in fns]
        self._tell(told)

    @property
    def is_shutdown(self) -> bool:
        return self._shutdown

    def told_shutdown(self, client_id: str) -> None:
        """Record that ``client_id`` was told the run is over."""
        with self._lock:
            self._told.add(client_id)
            self._lock.notify_all()

    def wait_all_told(self, timeout: float) -> bool:
        """After :meth:`shutdown`: wait until every live client was told (or ``timeout``)."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                missing = set(self.live_clients()) - self._told
                left = end - time.monotonic()
                if not missing or left <= 0:
                    return not missing
                self._lock.wait(timeout=min(left, 0.2))

    def _fail(self, task_id: str, reason: str) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return
            self._forget(task_id, reason)
        if not task.collector.closed:
            try:
                task.collector.queue.put(Result(task.client_id, task_id, None, reason), timeout=1.0)
            except queue.Full:
                pass  # the deadline will account for it

    def _forget(self, task_id: str, why: str) -> None:
        task = self._tasks.pop(task_id, None)
        if task is not None and self._by_client.get(task.client_id) == task_id:
            del self._by_client[task.client_id]
        self._closed[task_id] = why
        while len(self._closed) > self._remember:
            self._closed.popitem(last=False)
