"""Per-participant resource limits of the Fleet service: no one client can stall a round or starve the server.

The gRPC server runs each call as a coroutine on one event loop (:mod:`fedloom.server.aio`);
a call costs its HTTP/2 stream and a little memory, a result being decoded a buffer of the
model's size and a decoder slot, and the blocking work a thread of a bounded pool. Streams,
decoder slots and memory are what a hostile participant would exhaust. :class:`Guard`
bounds each of them per participant:

* **streams**: at most ``max_streams_per_client`` streaming calls (task pulls and result
  pushes) open at once per client identity (the certificate's CN under mutual TLS; the
  session's client in insecure mode). An honest agent needs two.
* **uploads**: at most one upload in flight per task; a second push for the same task is
  refused at its header, before any data is read.
* **idle and trickling streams**: a push or a task download that moves no data for
  ``stream_idle_timeout`` seconds is cancelled (its call and decoder slot released), and
  so is an upload whose task was closed (deadline passed, superseded). Progress is counted
  per gRPC message, so a link must carry one chunk (the agent sends 256 KiB) per timeout.
  An upload holding a decoder slot must also average ``min_upload_rate`` bytes/s once it
  has held it for ``stream_idle_timeout`` (a drip of one byte a second would otherwise keep
  the slot for the whole round); an upload cut off for either reason fails its task, so
  the client is dropped from that round instead of trickling again.
* **long polls**: at most ``max_long_polls`` task pulls wait on the server at once and at
  most one per client; beyond that a pull without a task answers at once with ``idle`` and
  a ``retry_after`` hint. A waiting pull holds no thread (it waits on the event loop), only
  a few kB, so the default (:data:`DEFAULT_MAX_LONG_POLLS`) lets every client of a
  10,000-client deployment wait; the bound keeps a flood of identities from growing memory.
* **registrations and pulls**: token buckets per identity (``register_rate`` and
  ``pull_rate`` per second, bursts of ``register_burst`` / ``pull_burst``); a call past its
  bucket is refused with the time to wait. A task may be downloaded at most
  ``max_task_downloads`` times.
* **logs**: refusals are logged at most once per ``log_every`` seconds per client and
  kind, with the number suppressed, so a hammering client cannot fill the disk.

Everything refused here is refused with a reason the caller sees (``RESOURCE_EXHAUSTED``
or a refused push) and a warning in the server's log; the round goes on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_MAX_LONG_POLLS", "Guard", "Limits", "LimitExceeded", "Stream"]

log = logging.getLogger("fedloom.server")

MAX_TRACKED_IDENTITIES = 100_000  # registration buckets kept (least recently used dropped first)

DEFAULT_MAX_LONG_POLLS = 16_384
"""Task pulls that may wait at once by default: one per client up to 16,384 clients (a few kB each)."""


@dataclass(frozen=True)
class Limits:
    """The service's per-participant limits (``[deploy]`` keys of the same names)."""

    max_streams_per_client: int = 4
    stream_idle_timeout: float = 60.0
    max_long_polls: int = DEFAULT_MAX_LONG_POLLS
    idle_retry_after: float = 2.0  # seconds a client told "no long poll for you" waits before pulling again
    register_rate: float = 1.0  # registrations per second per identity, sustained
    register_burst: int = 10
    pull_rate: float = 10.0  # task pulls per second per identity, sustained
    pull_burst: int = 20
    min_upload_rate: float = 8192.0  # bytes/s an upload holding a decoder slot must average
    max_task_downloads: int = 3
    log_every: float = 10.0  # seconds between two logged refusals of one kind for one client

    def __post_init__(self) -> None:
        if self.max_streams_per_client < 2:
            raise ValueError("max_streams_per_client must be at least 2 (an agent pulls and pushes at once)")
        positive = ("stream_idle_timeout", "idle_retry_after", "register_rate", "pull_rate", "min_upload_rate")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_long_polls < 0 or self.register_burst < 1 or self.pull_burst < 1 or self.max_task_downloads < 1:
            raise ValueError("max_long_polls must be >= 0; register_burst, pull_burst, max_task_downloads >= 1")
        if self.log_every < 0:
            raise ValueError("log_every must be >= 0")


class LimitExceeded(Exception):
    """A call refused by a limit; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)
class Stream:
    """One open streaming call, watched for progress while ``watched``."""

    who: str | None
    kind: str
    cancel: Callable[[], Any]
    last_progress: float = field(default_factory=time.monotonic)
    watched: bool = False
    alive: Callable[[], bool] | None = None  # False once the stream's purpose is gone (its task closed)
    on_abort: Callable[[str], Any] | None = None  # told why, when the watchdog cuts the stream (fails its task)
    aborted: str | None = None  # why the watchdog cancelled it
    received: int = 0  # data bytes since the decoder slot was taken
    slot_since: float | None = None  # when it took a decoder slot

    def progress(self, nbytes: int = 0) -> None:
        self.last_progress = time.monotonic()
        if self.slot_since is not None:
            self.received += nbytes

    def took_slot(self) -> None:
        self.slot_since = time.monotonic()
        self.received = 0

    def watch(self, on: bool = True) -> None:
        self.last_progress = time.monotonic()
        self.watched = on


class Guard:
    """Counts what each participant holds and enforces :class:`Limits` (thread-safe)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        self._streams: dict[str, int] = {}
        self._active: set[Stream] = set()
        self._uploads: dict[str, Stream] = {}
        self._polls = 0
        self._polling: set[str] = set()
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()
        self._logged: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.refusals: dict[str, int] = {}  # kind -> count, for logs and tests

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the watchdog thread that cancels idle streams."""
        if self._watchdog is None:
            self._watchdog = threading.Thread(target=self._watch_loop, name="fleet-watchdog", daemon=True)
            self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)

    def _refuse(self, kind: str, reason: str) -> LimitExceeded:
        with self._lock:
            self.refusals[kind] = self.refusals.get(kind, 0) + 1
        return LimitExceeded(reason)

    # ------------------------------------------------------------ streams
    @contextmanager
    def stream(self, kind: str, cancel: Callable[[], Any], who: str | None = None) -> Iterator[Stream]:
        """Register an open streaming call (counted against ``who`` if known)."""
        s = Stream(who=None, kind=kind, cancel=cancel)
        with self._lock:
            self._active.add(s)
        try:
            if who is not None:
                self.assign(s, who)
            yield s
        finally:
            with self._lock:
                self._active.discard(s)
                if s.who is not None:
                    left = self._streams.get(s.who, 1) - 1
                    if left > 0:
                        self._streams[s.who] = left
                    else:
                        self._streams.pop(s.who, None)

    def assign(self, s: Stream, who: str) -> None:
        """Count ``s`` against ``who`` (once the caller's identity is known); refuse past the limit."""
        limit = self.limits.max_streams_per_client
        with self._lock:
            if s.who is not None:
                return
            n = self._streams.get(who, 0)
            if n < limit:
                self._streams[who] = n + 1
                s.who = who
                return
        raise self._refuse(
            "streams", f"{who!r} already has {n} calls open (deploy.max_streams_per_client = {limit})"
        )

    def open_streams(self, who: str) -> int:
        with self._lock:
            return self._streams.get(who, 0)

    # ------------------------------------------------------------ uploads
    def claim_upload(self, task_id: str, s: Stream) -> None:
        """``s`` uploads the result of ``task_id``; refused if another upload of it is in flight."""
        with self._lock:
            if task_id not in self._uploads:
                self._uploads[task_id] = s
                return
        raise self._refuse("uploads", "an upload for this task is already in progress")

    def release_upload(self, task_id: str, s: Stream) -> None:
        with self._lock:
            if self._uploads.get(task_id) is s:
                del self._uploads[task_id]

    # ------------------------------------------------------------ long polls
    @contextmanager
    def long_poll(self, client_id: str) -> Iterator[bool]:
        """Whether this pull may wait on the server (a slot is held until the block ends)."""
        with self._lock:
            ok = client_id not in self._polling and self._polls < self.limits.max_long_polls
            if ok:
                self._polls += 1
                self._polling.add(client_id)
        try:
            yield ok
        finally:
            if ok:
                with self._lock:
                    self._polls -= 1
                    self._polling.discard(client_id)

    @property
    def long_polls(self) -> int:
        with self._lock:
            return self._polls

    # ------------------------------------------------------------ registration
    def admit_registration(self, who: str) -> None:
        """Take one token from ``who``'s registration bucket; refuse with the time to wait if it is empty."""
        self._take("registrations", who, self.limits.register_rate, self.limits.register_burst, "registers", "register_rate")

    def admit_pull(self, who: str) -> None:
        """Take one token from ``who``'s pull bucket; refuse with the time to wait if it is empty."""
        self._take("pulls", who, self.limits.pull_rate, self.limits.pull_burst, "pulls tasks", "pull_rate")

    def _take(self, kind: str, who: str, rate: float, burst: int, verb: str, key: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.pop((kind, who), (float(burst), now))
            tokens = min(float(burst), tokens + (now - then) * rate)
            ok = tokens >= 1.0
            self._buckets[(kind, who)] = (tokens - 1.0 if ok else tokens, now)
            while len(self._buckets) > MAX_TRACKED_IDENTITIES:
                self._buckets.popitem(last=False)
        if not ok:
            wait = (1.0 - tokens) / rate
            raise self._refuse(kind, f"{who!r} {verb} too often (deploy.{key} = {rate:g}/s): retry in {wait:.1f} s")

    # ------------------------------------------------------------ logs
    def warn(self, who: str, kind: str, msg: str, *args: Any) -> None:
        """``log.warning(msg, *args)``, at most once per ``log_every`` seconds per (client, kind)."""
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._logged.pop((who, kind), (-math.inf, 0))
            show = now - last >= self.limits.log_every
            self._logged[(who, kind)] = (now, 0) if show else (last, suppressed + 1)
            while len(self._logged) > MAX_TRACKED_IDENTITIES:
                self._logged.popitem(last=False)
        if show:
            if suppressed:
                msg += f" (and {suppressed} more like it since the last report)"
            log.warning(msg, *args)

    # ------------------------------------------------------------ watchdog
    def _watch_loop(self) -> None:
        period = min(1.0, self.limits.stream_idle_timeout / 4)
        while not self._stop.wait(period):
            self.sweep()

    def sweep(self) -> list[Stream]:
        """Cancel the watched streams that made no progress in time or lost their purpose; return them."""
        timeout, min_rate = self.limits.stream_idle_timeout, self.limits.min_upload_rate
        now = time.monotonic()
        with self._lock:
            candidates = [s for s in self._active if s.watched and s.aborted is None]
        cancelled = []
        for s in candidates:
            held = now - s.slot_since if s.slot_since is not None else 0.0
            if now - s.last_progress > timeout:
                s.aborted = f"no data for {timeout:g} s (deploy.stream_idle_timeout)"
            elif held > timeout and s.received / held < min_rate:
                s.aborted = f"uploading at {s.received / held:.0f} B/s, below deploy.min_upload_rate ({min_rate:g} B/s)"
            elif s.alive is not None and not s.alive():
                s.aborted = "its task was closed"
            else:
                continue
            log.warning("cancelled a %s stream of %r: %s", s.kind, s.who or "?", s.aborted)
            with self._lock:
                self.refusals["idle"] = self.refusals.get("idle", 0) + 1
            try:
                s.cancel()
            except Exception:  # noqa: BLE001 - a stream that already ended cannot be cancelled
                pass
            if s.on_abort is not None:
                s.on_abort(s.aborted)
            cancelled.append(s)
        return cancelled
