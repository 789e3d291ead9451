"""Where trained models come from: a run store or a run's output directory, read only.

The model service (``fedloom serve``), the dashboard and ``fedloom export`` all read models
through :func:`open_source`:

* a **store** (the SQLite file of ``run.store``): every run in it; a run's *versions* are its
  checkpoints (version N = the global model after round N; the newest ``keep_checkpoints``
  survive), and a run still training gains versions while it is read. The store is opened
  read-only (:meth:`fedloom.store.Store.open` with ``read_only``): reading never writes to it
  and never blocks the training process.
* a **run directory** (``fedloom run --out DIR``: ``config.json``, ``model.safetensors``,
  ``history.json``): one run with one version, the final model (its round is the last one in
  ``history.json``).

A run's model is rebuilt from the config it was started with: the model registry builds
the architecture, the dataset registry gives the task (input shape, feature names, kind),
and the checkpoint's :class:`~fedloom.core.params.ParamSpec` must match the rebuilt model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedloom.core.config import RunConfig, parse_config
from fedloom.core.errors import ConfigError, FedloomError, StoreError
from fedloom.core.history import History
from fedloom.core.params import ParamSpec
from fedloom.data.base import FederatedDataset, TaskSpec
from fedloom.data.registry import load_dataset
from fedloom.models.registry import build_model
from fedloom.store import RunHandle, RunInfo, Store

__all__ = ["ModelSource", "ModelVersion", "RunDirSource", "RunModels", "SourceError", "StoreSource", "open_source"]


class SourceError(FedloomError):
    """A run, version or path that does not exist or cannot be read (the service answers 404)."""


@dataclass(frozen=True)
class ModelVersion:
    """One servable model of a run: ``version`` is the round it was saved after."""

    version: int
    metrics: dict[str, float] = field(default_factory=dict)
    created: float | None = None


class RunModels:
    """One run's task, architecture and way to load any of its versions.

    ``dataset`` is built lazily (generated scenarios take a second or two): only the task is
    needed to serve; export's int8 calibration and benchmarks use its test split.
    """

    def __init__(self, name: str, config: RunConfig, loader: Callable[[int], torch.Tensor], spec_of: Callable[[int], ParamSpec]):
        self.name = name
        self.config = config
        self._loader = loader
        self._spec_of = spec_of
        self._dataset: FederatedDataset | None = None
        self._lock = threading.Lock()

    @property
    def dataset(self) -> FederatedDataset:
        with self._lock:
            if self._dataset is None:
                cfg = self.config
                self._dataset = load_dataset(cfg.data.name, seed=cfg.run.seed, **cfg.data.options())
            return self._dataset

    @property
    def task(self) -> TaskSpec:
        return self.dataset.task

    def new_model(self) -> nn.Module:
        """A fresh module of the run's architecture (random weights)."""
        return build_model(self.config.model.name, self.task, **self.config.model.options())

    def load(self, version: int) -> nn.Module:
        """The model of ``version`` in eval mode; :class:`SourceError` if it is gone or unreadable."""
        vec = self._loader(version)
        model = self.new_model()
        spec = ParamSpec.from_module(model)
        stored = self._spec_of(version)
        if stored != spec:
            raise SourceError(f"run {self.name!r} version {version}: the stored model does not match {self.config.model.name!r}")
        spec.load_into(model, vec.detach().cpu())
        return model.eval()


class ModelSource:
    """Runs and their model versions, read only (base of :class:`StoreSource` and :class:`RunDirSource`)."""

    path: Path

    def runs(self) -> list[RunInfo]:
        """Every run, oldest first."""
        raise NotImplementedError

    def run(self, name: str) -> RunModels:
        """Run ``name``; :class:`SourceError` if there is none."""
        raise NotImplementedError

    def versions(self, name: str) -> list[ModelVersion]:
        """The run's servable versions, oldest first (may grow while the run trains)."""
        raise NotImplementedError

    def history(self, name: str) -> History:
        """The run's recorded rounds."""
        raise NotImplementedError

    def status(self, name: str) -> str:
        """``running``, ``completed``, ``failed``, ``interrupted`` or ``budget_exhausted``."""
        raise NotImplementedError

    def planned_rounds(self, name: str) -> int | None:
        """How many rounds the run was started for, where known (a store keeps only its identity: None)."""
        return None

    def default_run(self) -> str:
        """The run a request without a run name means: the newest one."""
        runs = self.runs()
        if not runs:
            raise SourceError(f"{self.path} holds no run yet")
        return runs[-1].name

    def close(self) -> None:
        """Release the source's files (idempotent)."""


def _run_config(data: dict[str, Any], where: str) -> RunConfig:
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise SourceError(f"{where}: the stored config is not usable by this fedloom: {exc}") from None


class StoreSource(ModelSource):
    """The runs of a :class:`~fedloom.store.Store`, opened read-only."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.store = Store.open(self.path, read_only=True)
        except StoreError as exc:
            raise SourceError(str(exc)) from None
        self._runs: dict[str, tuple[RunHandle, RunModels]] = {}
        self._lock = threading.Lock()

    def _handle(self, name: str) -> RunHandle:
        handle = self.store.find_run(name)
        if handle is None:
            raise SourceError(f"no run {name!r} in {self.path}")
        return handle

    def runs(self) -> list[RunInfo]:
        return self.store.list_runs()

    def run(self, name: str) -> RunModels:
        handle = self._handle(name)
        with self._lock:
            cached = self._runs.get(name)
            if cached is not None and cached[0] == handle:
                return cached[1]
        cfg = _run_config(self.store.run_config(handle), f"{self.path} run {name!r}")

        def load(version: int) -> torch.Tensor:
            try:
                ckpt, _ = self.store.load_checkpoint(handle, version)
            except StoreError as exc:
                raise SourceError(str(exc)) from None
            return ckpt.state.params

        def spec_of(version: int) -> ParamSpec:
            try:
                return self.store.load_checkpoint(handle, version)[1]
            except StoreError as exc:
                raise SourceError(str(exc)) from None

        models = RunModels(name, cfg, load, spec_of)
        with self._lock:
            self._runs[name] = (handle, models)
        return models

    def versions(self, name: str) -> list[ModelVersion]:
        handle = self._handle(name)
        metrics = {r.round: r.metrics for r in self.store.history(handle)}
        return [ModelVersion(c.round, metrics.get(c.round, {}), c.created) for c in self.store.checkpoints(handle)]

    def history(self, name: str) -> History:
        return self.store.history(self._handle(name))

    def status(self, name: str) -> str:
        return self.store.run_status(self._handle(name))

    def close(self) -> None:
        self.store.close()


class RunDirSource(ModelSource):
    """A ``fedloom run --out DIR`` directory: one run, one version (the final model)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        for f in ("config.json", "model.safetensors"):
            if not (self.path / f).is_file():
                raise SourceError(f"{self.path} is not a run directory (no {f})")
        try:
            data = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise SourceError(f"{self.path / 'config.json'}: {exc}") from None
        self.config = _run_config(data, str(self.path / "config.json"))
        self.name = self.config.run.name

    def _history(self) -> History:
        f = self.path / "history.json"
        return History.load_json(f) if f.is_file() else History()

    def _version(self) -> int:
        hist = self._history()
        return hist.records[-1].round if hist.records else 0

    def runs(self) -> list[RunInfo]:
        hist = self._history()
        last = hist.records[-1] if hist.records else None
        created = (self.path / "model.safetensors").stat().st_mtime
        return [
            RunInfo(
                name=self.name,
                status="completed",
                created=created,
                config_hash="",
                rounds_done=last.round if last else 0,
                last_checkpoint=last.round if last else 0,
                latest_metrics=dict(last.metrics) if last else {},
            )
        ]

    def _check(self, name: str) -> None:
        if name != self.name:
            raise SourceError(f"no run {name!r} in {self.path} (it holds run {self.name!r})")

    def run(self, name: str) -> RunModels:
        self._check(name)
        from safetensors.torch import load_file

        def state() -> dict[str, torch.Tensor]:
            try:
                return load_file(str(self.path / "model.safetensors"))
            except Exception as exc:  # noqa: BLE001 - a damaged file is a clear error, not a traceback
                raise SourceError(f"{self.path / 'model.safetensors'}: {exc}") from None

        models: RunModels

        def load(version: int) -> torch.Tensor:
            if version != self._version():
                raise SourceError(f"run {self.name!r} has only version {self._version()}")
            module = models.new_model()
            try:
                module.load_state_dict(state(), strict=True)
            except RuntimeError as exc:
                raise SourceError(f"{self.path / 'model.safetensors'} does not fit the config's model: {exc}") from None
            return ParamSpec.from_module(module).module_vector(module)

        def spec_of(version: int) -> ParamSpec:
            return ParamSpec.from_module(models.new_model())

        models = RunModels(self.name, self.config, load, spec_of)
        return models

    def versions(self, name: str) -> list[ModelVersion]:
        self._check(name)
        hist = self._history()
        last = hist.records[-1] if hist.records else None
        created = (self.path / "model.safetensors").stat().st_mtime
        return [ModelVersion(last.round if last else 0, dict(last.metrics) if last else {}, created)]

    def history(self, name: str) -> History:
        self._check(name)
        return self._history()

    def status(self, name: str) -> str:
        self._check(name)
        return "completed"

    def planned_rounds(self, name: str) -> int | None:
        self._check(name)
        return self.config.run.rounds


def open_source(path: str | Path) -> ModelSource:
    """A :class:`StoreSource` for a store file, a :class:`RunDirSource` for a run directory."""
    p = Path(path)
    if p.is_dir():
        return RunDirSource(p)
    if p.is_file():
        return StoreSource(p)
    raise SourceError(f"{p}: no such store file or run directory")
