"""Independent jobs on worker threads, each a single-threaded stream of kernels, results in order.

The vectorized engine trains a cohort as independent lockstep chunks. On a CPU, small
kernels (a chunk's batched products, grouped convolutions of a few clients) use several
cores better as several independent single-threaded streams than as one stream whose every
kernel is split over the cores: each core keeps its own chunk's weights in its own cache and
no kernel waits for its slowest thread. PyTorch releases the GIL inside its kernels, so
threads suffice (no copy of the data or the model per worker).

Determinism: every job runs with ONE intra-op thread, whichever thread runs it and however
many threads there are, and results are returned in job order. A job's result is therefore
the same bits for any ``threads``: torch's kernels are deterministic for a fixed thread count
but not across thread counts (a convolution's weight gradient split over two threads sums in
another order).

``torch.set_num_threads`` is per thread for the kernels (OpenMP / MKL settings are
thread-local) but also sets the default of threads started later; :meth:`ChunkPool.ordered`
puts the caller's value back when it is done.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

__all__ = ["ChunkPool", "default_threads"]

J = TypeVar("J")
R = TypeVar("R")


def default_threads() -> int:
    """The number of chunk threads when none is configured: torch's intra-op thread count."""
    return max(1, torch.get_num_threads())


class ChunkPool:
    """Runs jobs on ``threads`` worker threads (single-threaded kernels each), yielding results in order.

    At most ``threads`` jobs run at once and at most ``2 * threads`` are outstanding
    (running, queued or finished and waiting to be taken), so memory is bounded by about
    ``2 * threads`` jobs' results whatever the number of jobs. With ``threads == 1`` jobs run in the caller's thread (still with one
    intra-op thread). The pool's threads start on first use and live until :meth:`close`.
    """

    def __init__(self, threads: int) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="fedloom-chunk")
            return self._executor

    def ordered(self, fn: Callable[[J], R], jobs: Iterable[J], *, intra_threads: int = 1) -> Iterator[R]:
        """``fn(job)`` for each job, yielded in job order; an exception is raised at its job's turn.

        Each job runs with ``intra_threads`` intra-op threads (default 1; a caller lends more
        to fewer jobs than workers only where its kernels give the same bits either way). Jobs
        that take all the threads run one after another in the caller's thread (whose intra-op
        thread team exists already: a second team on a worker thread would compete with it).

        Jobs are submitted ahead of the consumer (``2 * threads`` outstanding: up to ``threads``
        running, the others queued or done), so the caller can work on one result while the
        next ones are computed, and a worker whose job finished early is not left idle while
        the job at the head of the order is still running. Closing the iterator early
        cancels the jobs not started and waits for the running ones.
        """
        caller_threads = torch.get_num_threads()
        if self.threads == 1 or intra_threads >= self.threads:
            try:
                for job in jobs:
                    torch.set_num_threads(intra_threads)
                    try:
                        result = fn(job)
                    finally:
                        torch.set_num_threads(caller_threads)
                    yield result
            finally:
                torch.set_num_threads(caller_threads)
            return

        def single_threaded(job: J) -> R:
            torch.set_num_threads(intra_threads)
            return fn(job)

        pool = self._pool()
        pending: deque[Future[R]] = deque()
        it = iter(jobs)

        def submit() -> None:
            for job in it:
                pending.append(pool.submit(single_threaded, job))
                return

        try:
            for _ in range(2 * self.threads):  # a worker that finishes early starts the next job at once
                submit()
            while pending:
                result = pending.popleft().result()
                submit()  # keep the workers busy while the caller takes this result
                yield result
        finally:
            for fut in pending:
                fut.cancel()
            for fut in pending:
                if not fut.cancelled():
                    fut.exception()  # wait; its error (if any) is dropped with the iterator
            torch.set_num_threads(caller_threads)  # the workers changed the default for new threads

    def close(self) -> None:
        """Stop the worker threads (after the running jobs)."""
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
