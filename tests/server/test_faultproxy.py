"""tests/server/faultproxy.py: the fault-injecting TCP proxy, on loopback against an echo server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from faultproxy import FaultProxy, Faults, ProxyStats  # noqa: E402

pytestmark = pytest.mark.timeout(60)

SCRIPT = Path(__file__).parent / "faultproxy.py"


@pytest.fixture()
def echo() -> Iterator[tuple[str, int]]:
    """A threaded echo server on loopback: sends back every byte, half-closes after the client does."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.1)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield srv.getsockname()
    finally:
        stop.set()
        t.join(2)
        srv.close()
        for c in conns:
            try:
                c.close()
            except OSError:
                pass


def _dial(addr: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(addr, timeout=10)
    s.settimeout(10)
    return s


def _exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` (from a thread, so large payloads cannot deadlock), half-close, read until EOF."""

    def send() -> None:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    got = bytearray()
    while chunk := sock.recv(65536):
        got += chunk
    sender.join(10)
    return bytes(got)


def _cut_by_peer(sock: socket.socket) -> bool:
    """True if the connection is (or gets, within the socket's timeout) closed by the other side."""
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_bytes_arrive_intact_with_delay(echo: tuple[str, int]) -> None:
    payload = os.urandom(300_000)
    with FaultProxy(("127.0.0.1", 0), echo, faults=Faults(delay=0.1, jitter=0.02), seed=1) as proxy:
        with _dial(proxy.address) as s:
            t0 = time.monotonic()
            got = _exchange(s, payload)
            elapsed = time.monotonic() - t0
        assert got == payload
        assert elapsed >= 0.19  # at least the delay each way (an upper bound would be a flaky timing test)
        assert proxy.wait_for(lambda st: st.active == 0, timeout=10)
        st = proxy.stats()
    assert st.connections == 1 and st.cuts == 0 and st.forced_cuts == 0 and st.refused == 0
    assert st.bytes_up == st.bytes_down == len(payload)


def test_delay_is_latency_not_a_throughput_cap(echo: tuple[str, int]) -> None:
    # 64 chunks of 1 kB sent back to back with 0.2 s per chunk: pipelined, not 64 x 0.2 s.
    with FaultProxy(("127.0.0.1", 0), echo, faults=Faults(delay=0.2), chunk_size=1024) as proxy:
        with _dial(proxy.address) as s:
            t0 = time.monotonic()
            assert _exchange(s, b"z" * 65536) == b"z" * 65536
            assert time.monotonic() - t0 < 10.0  # serialized delays would take >= 12.8 s


def test_rate_cap_slows_the_transfer(echo: tuple[str, int]) -> None:
    payload = os.urandom(60_000)
    with FaultProxy(("127.0.0.1", 0), echo, faults=Faults(rate=100_000)) as proxy:
        with _dial(proxy.address) as s:
            t0 = time.monotonic()
            assert _exchange(s, payload) == payload
            assert time.monotonic() - t0 >= 0.5  # 60 kB at 100 kB/s is 0.6 s
        st = proxy.stats()
    assert st.bytes_up == st.bytes_down == len(payload)


def test_cut_all_resets_live_connections_and_keeps_accepting(echo: tuple[str, int]) -> None:
    with FaultProxy(("127.0.0.1", 0), echo) as proxy:
        a, b = _dial(proxy.address), _dial(proxy.address)
        with a, b:
            for s in (a, b):
                s.sendall(b"ping")
                assert s.recv(16) == b"ping"
            assert proxy.wait_for(lambda st: st.active == 2)
            assert proxy.cut_all() == 2
            assert _cut_by_peer(a) and _cut_by_peer(b)
        assert proxy.wait_for(lambda st: st.active == 0)
        with _dial(proxy.address) as c:  # the link is up again
            assert _exchange(c, b"after the cut") == b"after the cut"
        st = proxy.stats()
    assert (st.connections, st.forced_cuts, st.cut_all_calls, st.cuts) == (3, 2, 1, 0)


def test_cut_probability_one_cuts_at_the_first_chunk(echo: tuple[str, int]) -> None:
    with FaultProxy(("127.0.0.1", 0), echo, faults=Faults(cut_prob=1.0)) as proxy:
        with _dial(proxy.address) as s:
            s.sendall(b"hello")
            assert _cut_by_peer(s)
        assert proxy.wait_for(lambda st: st.cuts == 1 and st.active == 0)
        st = proxy.stats()
    assert st.bytes_up == 0 and st.bytes_down == 0


def test_faults_change_at_runtime_on_a_live_connection(echo: tuple[str, int]) -> None:
    with FaultProxy(("127.0.0.1", 0), echo) as proxy:
        with _dial(proxy.address) as s:
            s.sendall(b"one")
            assert s.recv(16) == b"one"
            proxy.set_faults(cut_prob=1.0)
            s.sendall(b"two")
            assert _cut_by_peer(s)
        assert proxy.stats().cuts == 1


def _cut_pattern(echo: tuple[str, int], seed: int) -> list[bool]:
    """Which of 24 sequential one-byte round trips get cut at cut_prob 0.3 (the draws happen in a fixed order)."""
    pattern = []
    with FaultProxy(("127.0.0.1", 0), echo, faults=Faults(cut_prob=0.3), seed=seed) as proxy:
        for _ in range(24):
            with _dial(proxy.address) as s:
                s.sendall(b"x")
                try:
                    cut = s.recv(1) != b"x"
                except (ConnectionResetError, ConnectionAbortedError):
                    cut = True
                pattern.append(cut)
            assert proxy.wait_for(lambda st: st.active == 0)
    return pattern


def test_cuts_are_reproducible_with_a_seed(echo: tuple[str, int]) -> None:
    first = _cut_pattern(echo, seed=7)
    assert _cut_pattern(echo, seed=7) == first
    assert any(first) and not all(first)


def test_unreachable_target_is_refused() -> None:
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    target = free.getsockname()
    free.close()  # nothing listens there now
    with FaultProxy(("127.0.0.1", 0), target) as proxy:
        try:
            with _dial(proxy.address) as s:
                assert _cut_by_peer(s)
        except ConnectionResetError:
            pass  # the proxy's reset arrived before connect() returned (a race on loopback): refused all the same
        assert proxy.wait_for(lambda st: st.refused == 1)
        assert proxy.stats().connections == 0


def test_bad_faults_are_refused() -> None:
    for bad in ({"delay": -1.0}, {"cut_prob": 1.5}, {"rate": 0.0}, {"jitter": -0.1}):
        with pytest.raises(ValueError):
            Faults(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown"):
        Faults.from_dict({"latency": 1.0})
    assert ProxyStats().to_dict()["connections"] == 0


def _read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _wait(cond, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_runs_as_a_script_with_signals(echo: tuple[str, int], tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"delay": 0.01}))
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--listen", "127.0.0.1:0", "--target", f"{echo[0]}:{echo[1]}",
         "--delay", "0.01", "--seed", "3", "--stats", str(stats), "--faults", str(faults)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("faultproxy listening on 127.0.0.1:"), line
        port = int(line.split()[3].rsplit(":", 1)[1])
        with _dial(("127.0.0.1", port)) as s:
            s.sendall(b"through the script")
            assert s.recv(64) == b"through the script"
            assert _wait(lambda: _read_stats(stats).get("active") == 1)
            proc.send_signal(signal.SIGUSR1)  # cut all
            assert _cut_by_peer(s)
        assert _wait(lambda: _read_stats(stats).get("forced_cuts") == 1)
        faults.write_text(json.dumps({"cut_prob": 1.0}))
        proc.send_signal(signal.SIGHUP)  # re-read the faults
        assert _wait(lambda: _read_stats(stats).get("faults", {}).get("cut_prob") == 1.0)
        with _dial(("127.0.0.1", port)) as s:
            s.sendall(b"x")
            assert _cut_by_peer(s)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        final = _read_stats(stats)
        assert final["running"] is False and final["connections"] == 2 and final["cuts"] == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
