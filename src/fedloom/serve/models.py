"""The model service's cache: which model answers a request, swapped without a failed request.

:class:`ModelCache` resolves ``(run, version)`` — ``version`` a round number or ``latest`` — to a
:class:`Served` model: an immutable bundle of the eval-mode module, its version and its task.
A request holds its :class:`Served` for its whole life, so a newer checkpoint arriving (the
run still training into the store) never changes the model under a request that already
started. ``latest`` is re-read from the store at most every ``refresh`` seconds; a new newest
version is loaded once (under a lock; other requests keep being answered by the previous
one meanwhile) and then swapped in by replacing one reference. If loading it fails (its
file was pruned between listing and loading, a torn read), the previous latest keeps
answering and the load is retried on the next refresh. Loaded models are kept in a small
LRU (``capacity``) so pinned versions do not reload on every request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from fedloom.data.base import TaskSpec
from fedloom.serve.source import ModelSource, SourceError

__all__ = ["ModelCache", "Served"]

log = logging.getLogger("fedloom.serve")


@dataclass(frozen=True)
class Served:
    """A model as one request uses it."""

    run: str
    version: int
    model: nn.Module
    task: TaskSpec


class ModelCache:
    """Loaded models by (run, version), and each run's current ``latest``."""

    def __init__(self, source: ModelSource, *, capacity: int = 4, refresh: float = 0.5) -> None:
        self.source = source
        self.capacity = capacity
        self.refresh = refresh
        self.swaps = 0
        self._loaded: OrderedDict[tuple[str, int], Served] = OrderedDict()
        self._latest: dict[str, Served] = {}
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()
        self._load_lock = threading.Lock()

    def _load(self, run: str, version: int) -> Served:
        key = (run, version)
        with self._lock:
            hit = self._loaded.get(key)
            if hit is not None:
                self._loaded.move_to_end(key)
                return hit
        models = self.source.run(run)
        served = Served(run, version, models.load(version), models.task)
        with self._lock:
            self._loaded[key] = served
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)
        return served

    def get(self, run: str, version: int | str) -> Served:
        """The model for ``version`` of ``run`` (:class:`SourceError` if there is none)."""
        if version != "latest":
            assert isinstance(version, int)
            if version not in {v.version for v in self.source.versions(run)}:
                raise SourceError(f"run {run!r} has no version {version}")
            return self._load(run, version)
        return self.latest(run)

    def latest(self, run: str) -> Served:
        now = time.monotonic()
        current = self._latest.get(run)
        if current is not None and now - self._checked.get(run, 0.0) < self.refresh:
            return current
        with self._load_lock:
            current = self._latest.get(run)
            if current is not None and now - self._checked.get(run, 0.0) < self.refresh:
                return current
            versions = self.source.versions(run)
            self._checked[run] = now
            if not versions:
                if current is not None:
                    return current
                raise SourceError(f"run {run!r} has no checkpoint yet")
            newest = versions[-1].version
            if current is not None and current.version == newest:
                return current
            for v in reversed(versions):
                if current is not None and v.version <= current.version:
                    break
                try:
                    served = self._load(run, v.version)
                except SourceError as exc:  # pruned or torn: keep what answers now
                    log.warning("run %r: cannot load version %d yet: %s", run, v.version, exc)
                    continue
                if current is not None:
                    self.swaps += 1
                    log.info("run %r: serving version %d (was %d)", run, served.version, current.version)
                self._latest[run] = served
                return served
            if current is not None:
                return current
            raise SourceError(f"run {run!r}: no loadable checkpoint")
