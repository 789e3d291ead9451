"""A fault-injecting TCP proxy for network tests (stdlib only).

:class:`FaultProxy` listens on ``listen`` and forwards every accepted connection to
``target``, byte for byte, injecting the faults of its current :class:`Faults` (which may be
replaced at any time; live connections see the change at their next chunk):

* ``delay`` (+ uniform ``jitter``): one-way latency added to every forwarded chunk. Chunks
  are time-stamped when read and written when due, so latency does not cost throughput.
* ``cut_prob``: probability, per chunk read, that the connection is cut. TCP cannot lose
  bytes silently, so "loss" here is a reset: both sides are closed abortively (RST).
* ``rate``: a bandwidth cap in bytes per second, per direction of each connection.

:meth:`FaultProxy.cut_all` resets every live connection at once (a link going down). The
random draws come from one seeded RNG (their interleaving across connections still depends
on thread scheduling). :meth:`FaultProxy.stats` counts connections, bytes each way and cuts.

As a context manager it starts and stops itself::

    with FaultProxy(("127.0.0.1", 0), ("127.0.0.1", 8765), faults=Faults(delay=0.02)) as proxy:
        host, port = proxy.address

It also runs as a script, e.g. inside a network namespace with ``ip netns exec``::

    python tests/server/faultproxy.py --listen 10.77.0.2:9001 --target 10.77.0.1:8765 \\
        --delay 0.05 --cut-prob 0.001 --stats stats.json

It prints ``faultproxy listening on HOST:PORT`` once ready and keeps ``--stats`` (JSON)
up to date. Signals: SIGUSR1 cuts all connections, SIGHUP re-reads ``--faults FILE``
(JSON with any of ``delay``, ``jitter``, ``cut_prob``, ``rate``), SIGTERM/SIGINT stop it.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from types import TracebackType
from typing import Any

__all__ = ["FaultProxy", "Faults", "ProxyStats", "main"]

_POLL = 0.25  # seconds a blocked thread waits before it re-checks whether to stop
_EOF = None


@dataclass(frozen=True)
class Faults:
    """What a proxy does to the traffic it forwards (see the module docstring)."""

    delay: float = 0.0
    jitter: float = 0.0
    cut_prob: float = 0.0
    rate: float | None = None  # bytes per second, per direction of each connection; None: unlimited

    def __post_init__(self) -> None:
        if self.delay < 0 or self.jitter < 0:
            raise ValueError(f"delay and jitter must be >= 0, got {self.delay}, {self.jitter}")
        if not 0.0 <= self.cut_prob <= 1.0:
            raise ValueError(f"cut_prob must be in [0, 1], got {self.cut_prob}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be > 0 bytes/s (or None), got {self.rate}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Faults:
        unknown = set(data) - {"delay", "jitter", "cut_prob", "rate"}
        if unknown:
            raise ValueError(f"unknown fault settings {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class ProxyStats:
    """Counters of a proxy since it started."""

    connections: int = 0  # accepted and connected to the target
    active: int = 0  # open now
    refused: int = 0  # accepted, but the target could not be reached
    bytes_up: int = 0  # client -> target, forwarded
    bytes_down: int = 0  # target -> client, forwarded
    cuts: int = 0  # connections reset by ``cut_prob``
    forced_cuts: int = 0  # connections reset by ``cut_all``
    cut_all_calls: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _Link:
    """One proxied connection: two directions, each a reader and a writer thread."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.socks = (client, upstream)
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._threads_left = 4
        self._eof_done = 0
        for s in self.socks:
            s.settimeout(_POLL)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def start(self) -> None:
        client, upstream = self.socks
        for src, dst, up in ((client, upstream, True), (upstream, client, False)):
            q: queue.Queue[tuple[float, bytes] | None] = queue.Queue()
            name = "up" if up else "down"
            threading.Thread(target=self._read, args=(src, q), name=f"faultproxy-{name}-r", daemon=True).start()
            threading.Thread(target=self._write, args=(dst, q, up), name=f"faultproxy-{name}-w", daemon=True).start()

    # ---------------------------------------------------------------- closing
    def abort(self, counter: str | None = None) -> bool:
        """Reset both sides (RST), counting it in ``counter``; False if the link was already closing."""
        with self._lock:
            if self.closed.is_set():
                return False
            self.closed.set()
        if counter is not None:  # counted before the peers can see the reset
            self.proxy._count(**{counter: 1})
        for s in self.socks:
            try:  # linger 0: close() sends RST, not FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)  # wakes a blocked reader and sends nothing
            except OSError:
                pass
        return True

    def _direction_finished(self) -> None:
        with self._lock:
            self._eof_done += 1
            if self._eof_done == 2:
                self.closed.set()  # both ways ended cleanly

    def _thread_done(self) -> None:
        with self._lock:
            self._threads_left -= 1
            last = self._threads_left == 0
        if last:  # no thread uses the sockets any more: close them (RST if aborted)
            self.closed.set()
            for s in self.socks:
                try:
                    s.close()
                except OSError:
                    pass
            self.proxy._forget(self)

    # ---------------------------------------------------------------- pumps
    def _read(self, src: socket.socket, q: queue.Queue[tuple[float, bytes] | None]) -> None:
        try:
            while not self.closed.is_set():
                try:
                    data = src.recv(self.proxy.chunk_size)
                except TimeoutError:
                    continue
                except OSError:
                    self.abort()
                    break
                if not data:
                    q.put(_EOF)
                    break
                faults = self.proxy.faults
                if faults.cut_prob and self.proxy._draw() < faults.cut_prob:
                    self.abort("cuts")
                    break
                due = time.monotonic() + faults.delay
                if faults.jitter:
                    due += faults.jitter * self.proxy._draw()
                q.put((due, data))
        finally:
            self._thread_done()

    def _write(self, dst: socket.socket, q: queue.Queue[tuple[float, bytes] | None], up: bool) -> None:
        next_free = [0.0]  # rate limiting: when the next byte may go
        try:
            while not self.closed.is_set():
                try:
                    item = q.get(timeout=_POLL)
                except queue.Empty:
                    continue
                if item is _EOF:
                    try:
                        dst.shutdown(socket.SHUT_WR)  # pass the half-close on
                    except OSError:
                        pass
                    self._direction_finished()
                    break
                due, data = item
                wait = due - time.monotonic()
                if wait > 0 and self.closed.wait(wait):
                    break
                if not self._send(dst, data, up, next_free):
                    self.abort()
                    break
        finally:
            self._thread_done()

    def _send(self, dst: socket.socket, data: bytes, up: bool, next_free: list[float]) -> bool:
        """Send ``data`` (capped to the current rate); False if the socket failed or the link closed."""
        view = memoryview(data)
        while view:
            rate = self.proxy.faults.rate
            piece = view if rate is None else view[: max(1, int(rate / 50))]
            if rate is not None:
                now = time.monotonic()
                if next_free[0] > now and self.closed.wait(next_free[0] - now):
                    return False
            try:
                n = dst.send(piece)
            except TimeoutError:
                if self.closed.is_set():
                    return False
                continue
            except OSError:
                return False
            if rate is not None:
                next_free[0] = max(next_free[0], time.monotonic()) + n / rate
            self.proxy._count(**{"bytes_up" if up else "bytes_down": n})
            view = view[n:]
        return True


class FaultProxy:
    """A TCP proxy from ``listen`` to ``target`` that injects :class:`Faults` (see the module docstring)."""

    def __init__(
        self,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        target: tuple[str, int] = ("127.0.0.1", 0),
        *,
        faults: Faults | None = None,
        seed: int = 0,
        chunk_size: int = 16384,
        connect_timeout: float = 10.0,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.listen = listen
        self.target = target
        self.faults = faults or Faults()
        self.chunk_size = chunk_size
        self.connect_timeout = connect_timeout
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._stats = ProxyStats()
        self._sock: socket.socket | None = None
        self._stopping = threading.Event()
        self._accepter: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle
    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) it listens on (the real port when ``listen`` asked for port 0)."""
        if self._sock is None:
            raise RuntimeError("the proxy is not started")
        host, port = self._sock.getsockname()[:2]
        return host, port

    def start(self) -> FaultProxy:
        if self._sock is not None:
            raise RuntimeError("the proxy is already started")
        sock = socket.socket(_family(self.listen[0]), socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(self.listen)
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        sock.settimeout(_POLL)
        self._sock = sock
        self._accepter = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._accepter.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, reset every live connection and wait (up to ``timeout``) for their threads."""
        if self._sock is None or self._stopping.is_set():
            return
        self._stopping.set()
        if self._accepter is not None:
            self._accepter.join(timeout)
        self._sock.close()
        for link in self._live():
            link.abort()
        end = time.monotonic() + timeout
        while self._live() and time.monotonic() < end:
            time.sleep(0.02)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ---------------------------------------------------------------- faults
    def set_faults(self, **changes: Any) -> Faults:
        """Change some fault settings (e.g. ``set_faults(delay=0.1)``); return the new ones."""
        self.faults = replace(self.faults, **changes)
        return self.faults

    def cut_all(self) -> int:
        """Reset every live connection (new ones are still accepted); return how many were cut."""
        self._count(cut_all_calls=1)
        return sum(link.abort("forced_cuts") for link in self._live())

    # ---------------------------------------------------------------- counters
    def stats(self) -> ProxyStats:
        with self._lock:
            return replace(self._stats, active=len(self._links))

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> bool:
        """Wait until ``predicate(self.stats())`` holds; False if ``timeout`` passed first."""
        end = time.monotonic() + timeout
        while not predicate(self.stats()):
            if time.monotonic() >= end:
                return False
            time.sleep(0.01)
        return True

    def _count(self, **deltas: int) -> None:
        with self._lock:
            self._stats = replace(self._stats, **{k: getattr(self._stats, k) + v for k, v in deltas.items()})

    def _draw(self) -> float:
        with self._rng_lock:
            return self._rng.random()

    def _live(self) -> list[_Link]:
        with self._lock:
            return list(self._links)

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    # ---------------------------------------------------------------- accepting
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            threading.Thread(target=self._open, args=(client,), name="faultproxy-connect", daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=self.connect_timeout)
        except OSError:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            self._count(refused=1)
            return
        link = _Link(self, client, upstream)
        with self._lock:
            stopping = self._stopping.is_set()
            if not stopping:
                self._links.add(link)
                self._stats = replace(self._stats, connections=self._stats.connections + 1)
        if stopping:
            client.close()
            upstream.close()
            return
        link.start()


# -------------------------------------------------------------------- script
def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A fault-injecting TCP proxy (see the module docstring).")
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on (port 0: any)")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to every forwarded chunk")
    parser.add_argument("--jitter", type=float, default=0.0, help="extra uniform random delay, up to this many seconds")
    parser.add_argument("--cut-prob", type=float, default=0.0, help="probability per chunk of resetting the connection")
    parser.add_argument("--rate", type=float, default=None, help="bandwidth cap, bytes/s per direction per connection")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-size", type=int, default=16384)
    parser.add_argument("--stats", default=None, help="keep the counters in this JSON file")
    parser.add_argument("--faults", default=None, help="JSON file of fault settings, re-read on SIGHUP")
    args = parser.parse_args(argv)

    faults = Faults(delay=args.delay, jitter=args.jitter, cut_prob=args.cut_prob, rate=args.rate)
    if args.faults:
        with open(args.faults) as f:
            faults = replace(faults, **asdict(Faults.from_dict(json.load(f))))
    proxy = FaultProxy(
        _parse_hostport(args.listen), _parse_hostport(args.target), faults=faults, seed=args.seed, chunk_size=args.chunk_size
    )
    pending: list[int] = []
    wake = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        pending.append(signum)
        wake.set()

    for sig in (signal.SIGUSR1, signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    proxy.start()
    host, port = proxy.address
    print(f"faultproxy listening on {host}:{port} -> {args.target} ({faults})", flush=True)
    last: dict[str, Any] | None = None
    running = True
    while running:
        wake.wait(_POLL)
        wake.clear()
        while pending:
            signum = pending.pop(0)
            if signum == signal.SIGUSR1:
                n = proxy.cut_all()
                print(f"faultproxy: cut {n} connection(s)", flush=True)
            elif signum == signal.SIGHUP and args.faults:
                try:
                    with open(args.faults) as f:
                        proxy.faults = Faults.from_dict(json.load(f))
                    print(f"faultproxy: faults now {proxy.faults}", flush=True)
                except (OSError, ValueError, TypeError) as exc:
                    print(f"faultproxy: cannot read {args.faults}: {exc}", file=sys.stderr, flush=True)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                running = False
        if not running:
            proxy.stop()
        if args.stats:
            now = {**proxy.stats().to_dict(), "faults": asdict(proxy.faults), "running": running}
            if now != last:
                _write_json(args.stats, now)
                last = now
    print(f"faultproxy stopped: {proxy.stats().to_dict()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
