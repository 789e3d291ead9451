"""The model service's cache: which model answers a request, swapped without a failed request.

:class:`ModelCache` resolves ``(run, version)`` — ``version`` a round number or ``latest`` — to a
:class:`Served` model: an immutable bundle of the eval-mode module, its version, its task and
input spec. A request holds its :class:`Served` for its whole life, so a newer checkpoint
arriving (the run still training into the store) never changes the model under a request
that already started.

Each run's version list is re-read from the source at most every ``refresh`` seconds. When
it shows a newer version than the one ``latest`` serves, one request loads it (others arriving
meanwhile are answered at once by the current model, not made to wait) and the new
:class:`Served` replaces the old one by one reference assignment. If loading fails (the file
was pruned between listing and loading, a torn read), the previous latest keeps answering
and the load is retried on the next refresh; a pinned version whose file is gone is a
:class:`~fedloom.serve.source.SourceError` (the service's 404). Loaded models are kept in a
small LRU (``capacity``) so pinned versions do not reload on every request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from fedloom.data.base import TaskSpec
from fedloom.serve.schemas import InputSpec, input_spec
from fedloom.serve.source import ModelSource, ModelVersion, RunModels, SourceError

__all__ = ["ModelCache", "Served"]

log = logging.getLogger("fedloom.serve")


@dataclass(frozen=True)
class Served:
    """A model as one request uses it."""

    run: str
    version: int
    model: nn.Module
    task: TaskSpec
    spec: InputSpec


class ModelCache:
    """Loaded models by (run, version), each run's current ``latest``, and its input spec."""

    def __init__(self, source: ModelSource, *, capacity: int = 4, refresh: float = 0.5) -> None:
        self.source = source
        self.capacity = capacity
        self.refresh = refresh
        self.swaps = 0
        self._loaded: OrderedDict[tuple[str, int], Served] = OrderedDict()
        self._latest: dict[str, Served] = {}
        self._listed: dict[str, tuple[float, list[ModelVersion]]] = {}
        self._specs: dict[str, tuple[RunModels, InputSpec]] = {}
        self._lock = threading.Lock()
        self._refreshing: dict[str, threading.Lock] = {}
        self._checked: dict[str, float] = {}

    def spec(self, run: str) -> InputSpec:
        """What requests for ``run`` take (:class:`SourceError` if there is no such run)."""
        models = self.source.run(run)
        with self._lock:
            hit = self._specs.get(run)
        if hit is not None and hit[0] is models:
            return hit[1]
        spec = input_spec(models)
        with self._lock:
            self._specs[run] = (models, spec)
        return spec

    def versions(self, run: str, *, fresh: bool = False) -> list[ModelVersion]:
        """The run's versions, re-read from the source at most every ``refresh`` seconds (or now: ``fresh``)."""
        now = time.monotonic()
        hit = self._listed.get(run)
        if hit is not None and not fresh and now - hit[0] < self.refresh:
            return hit[1]
        versions = self.source.versions(run)
        self._listed[run] = (now, versions)
        return versions

    def _load(self, run: str, version: int) -> Served:
        key = (run, version)
        with self._lock:
            hit = self._loaded.get(key)
            if hit is not None:
                self._loaded.move_to_end(key)
                return hit
        models = self.source.run(run)
        served = Served(run, version, models.load(version), models.task, self.spec(run))
        with self._lock:
            self._loaded[key] = served
            while len(self._loaded) > self.capacity:
                self._loaded.popitem(last=False)
        return served

    def get(self, run: str, version: int | str) -> Served:
        """The model for ``version`` of ``run`` (:class:`SourceError` if there is none)."""
        if version == "latest":
            return self.latest(run)
        assert isinstance(version, int)
        known = {v.version for v in self.versions(run)}
        if version not in known and version > max(known, default=-1):
            known = {v.version for v in self.versions(run, fresh=True)}  # newer than the cached list
        if version not in known:
            raise SourceError(f"run {run!r} has no version {version}; it has {sorted(known)}")
        return self._load(run, version)

    def latest(self, run: str) -> Served:
        """The newest loadable version of ``run``; moves forward as the run trains."""
        current = self._latest.get(run)
        if current is not None and time.monotonic() - self._checked.get(run, -1e18) < self.refresh:
            return current
        with self._lock:
            gate = self._refreshing.setdefault(run, threading.Lock())
        if not gate.acquire(blocking=current is None):
            return current  # type: ignore[return-value]  # another request is refreshing: answer with what serves now
        try:
            return self._refresh(run)
        finally:
            gate.release()

    def _refresh(self, run: str) -> Served:
        current = self._latest.get(run)
        self._checked[run] = time.monotonic()
        versions = self.versions(run, fresh=True)
        if not versions:
            if current is not None:
                return current
            raise SourceError(f"run {run!r} has no checkpoint yet")
        if current is not None and current.version == versions[-1].version:
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
