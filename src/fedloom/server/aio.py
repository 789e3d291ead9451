"""The asyncio runtime of the Fleet server: one event loop in a thread of its own, a bounded pool, decoder slots.

The round loop, the :class:`~fedloom.engines.coordinator.Coordinator` and the
:class:`~fedloom.engines.remote.RemoteEngine` are synchronous and run in the caller's
thread. The service's handlers are coroutines of a ``grpc.aio`` server whose event loop runs
in a dedicated thread (:class:`FleetServer`, :func:`server_loop`): a call that waits — a long poll, an upload
waiting for a decoder slot, a stream trickling in — holds a coroutine and its HTTP/2 stream,
not a thread, so a connected client costs a small constant, whatever their number.

* :func:`offload` runs blocking or CPU-heavy work (decoding and checking a result, handing
  it to the round) on the server's bounded thread pool, so the loop is never blocked for
  long; a cancelled call waits for its work to end before it lets go of what the work uses.
* :class:`Slots` bounds the results decoded at once (each holds a model-sized buffer).
* :func:`wait_for_task` is the long poll: it watches the coordinator, which wakes it from
  the posting thread through ``loop.call_soon_threadsafe``.
* :func:`thread_safe_cancel` lets the limits' watchdog thread cut a call off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from fedloom.core.errors import FedloomError
from fedloom.engines.coordinator import Coordinator, Task

__all__ = ["FleetServer", "Slots", "offload", "server_loop", "thread_safe_cancel", "wait_for_task"]

log = logging.getLogger("fedloom.server")

T = TypeVar("T")


async def offload(pool: Executor, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on ``pool``, awaited from the event loop.

    If the awaiting call is cancelled, the work still runs to its end (a thread cannot be
    interrupted); the cancellation is raised only once it has, so the caller releases what
    the work uses (a decoder slot) only when nothing uses it any more.
    """
    fut = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({fut})
        if not fut.cancelled():
            fut.exception()  # retrieved: it belongs to the cancelled call
        raise


class Slots:
    """A counting semaphore of one event loop that stays exact under cancellation.

    ``acquire`` calls ``waiting`` every ``every`` seconds while it waits (a sign of life for
    the client whose upload waits, which is the server's doing, not the client's). A waiter
    cancelled after it was handed a slot gives the slot to the next one.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self._free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def free(self) -> int:
        """Slots nobody holds now."""
        return self._free

    async def acquire(self, *, every: float = 0.5, waiting: Callable[[], Any] | None = None) -> None:
        while self._waiters and self._waiters[0].done():  # waiters cancelled before their turn
            self._waiters.popleft()
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=every)
                if done:
                    return
                if waiting is not None:
                    waiting()
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # handed a slot this waiter will not use
            else:
                fut.cancel()
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next waiter
                return
        if self._free >= self.size:
            raise RuntimeError("released a slot nobody held")
        self._free += 1


async def wait_for_task(coordinator: Coordinator, client_id: str, wait: float) -> Task | None:
    """The client's outstanding task, waiting up to ``wait`` seconds for one without holding a thread.

    None when the time is up or the run is over. The coordinator wakes the wait from the
    thread that posts the task (or ends the run) through ``loop.call_soon_threadsafe``. A
    waiting poll holds one future, one timer and the coordinator's watch: what 10,000
    idle clients cost the server (no task or event per poll).
    """
    task = coordinator.pull(client_id, 0.0)
    if task is not None or wait <= 0 or coordinator.is_shutdown:
        return task
    loop = asyncio.get_running_loop()
    waiter: list[asyncio.Future[None]] = []  # the one future the poll awaits now
    expired = [False]

    def wake() -> None:  # on the loop
        if waiter and not waiter[0].done():
            waiter[0].set_result(None)

    def expire() -> None:
        expired[0] = True
        wake()

    unwatch = coordinator.watch(client_id, lambda: loop.call_soon_threadsafe(wake))
    timer = loop.call_later(wait, expire)
    try:
        while True:
            waiter[:] = [loop.create_future()]  # before looking: a task posted after this look wakes it
            task = coordinator.pull(client_id, 0.0)
            if task is not None or coordinator.is_shutdown or expired[0]:
                return task
            await waiter[0]
    finally:
        timer.cancel()
        unwatch()


def thread_safe_cancel() -> Callable[[], None]:
    """A function that cancels the current task from any thread (the watchdog's way to cut a call off)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def cancel() -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)

    return cancel


_LOOP_LOCK = threading.Lock()
_LOOP: asyncio.AbstractEventLoop | None = None


def server_loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for gRPC servers, running in a daemon thread ``fleet-loop`` (started once).

    ``grpc.aio`` keeps process-wide state bound to the loops it has served; every server of
    the process (an edge's, a test's many) shares this one loop rather than each starting
    and closing its own.
    """
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP.is_closed():
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=run, name="fleet-loop", daemon=True).start()
            ready.wait()
            _LOOP = loop
        return _LOOP


class FleetServer:
    """A ``grpc.aio`` server on the process's server loop (:func:`server_loop`), with the pool its handlers offload to.

    :meth:`start` binds ``address`` (raises :class:`FedloomError` if it cannot) and returns
    once the server accepts calls; :meth:`stop` ends it, like ``grpc.Server.stop``: calls
    still open after ``grace`` seconds are cancelled, and the returned event is set once
    the server and its pool are done.
    """

    def __init__(
        self,
        register: Callable[[grpc.aio.Server], None],
        address: str,
        *,
        credentials: grpc.ServerCredentials | None,
        options: Sequence[tuple[str, Any]],
        pool: ThreadPoolExecutor,
    ) -> None:
        self._register = register
        self._address = address
        self._credentials = credentials
        self._options = list(options)
        self.pool = pool
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._done = threading.Event()
        self._server: grpc.aio.Server | None = None
        self._stopping = False

    def start(self) -> FleetServer:
        self.loop = server_loop()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()
        except BaseException:
            self._finish()
            raise
        return self

    def stop(self, grace: float | None = None) -> threading.Event:
        """Stop accepting calls; cancel those still open after ``grace`` seconds. Idempotent."""
        if self.loop is not None and self._server is not None and not self._stopping:
            self._stopping = True
            asyncio.run_coroutine_threadsafe(self._stop(grace), self.loop)
        elif self._server is None:
            self._finish()
        return self._done

    def _finish(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._done.set()

    async def _stop(self, grace: float | None) -> None:
        try:
            assert self._server is not None
            await self._server.stop(grace)
        except Exception:  # noqa: BLE001 - stopping must end in the event being set
            log.exception("stopping the gRPC server failed")
        finally:
            self._finish()

    async def _start(self) -> None:
        server = grpc.aio.server(options=self._options)
        self._register(server)
        error: FedloomError | None = None
        try:
            if self._credentials is None:
                port = server.add_insecure_port(self._address)
            else:
                port = server.add_secure_port(self._address, self._credentials)
        except RuntimeError as exc:
            port, error = 0, FedloomError(f"cannot listen on {self._address}: {exc}")
        if port == 0:
            await server.stop(None)  # shut down on its loop, not whenever it is collected
            del server
            raise error or FedloomError(f"cannot listen on {self._address} (address in use or invalid)")
        self.port = port
        await server.start()
        self._server = server
