"""Experiment-tracking loggers as round callbacks: TensorBoard event files and MLflow runs.

Both are optional extras (``pip install 'fedloom[tracking]'``: ``tensorboard``, ``mlflow-skinny``)
imported when the logger is built, with an install hint if missing. Each round they log every
metric of the round record (``test_*``, ``train_*``, ``fed_*``, ``dp_epsilon``, ``sparsity``;
NaN skipped) with the round as the step, plus ``clients``, ``rejected``, ``bytes_down``,
``bytes_up`` and ``seconds``. A logger never stops a run: a failure to write is logged once
as a warning and the logger goes quiet.

Configured with ``[tracking]``: ``tensorboard = "DIR"`` (event files in ``DIR/<run name>``),
``mlflow_uri`` (a tracking server ``http://HOST:5000``, or a local store) and
``mlflow_experiment``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedloom.core.errors import ConfigError
from fedloom.core.history import RoundRecord
from fedloom.federation.callbacks import Callback, RoundEvent

__all__ = ["MLflowLogger", "TensorBoardLogger", "round_scalars"]

log = logging.getLogger("fedloom.tracking")


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """The numbers a logger records for one round (finite metrics and the round's counts)."""
    out = {k: float(v) for k, v in record.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    out.update(
        clients=float(len(record.clients)),
        rejected=float(len(record.rejected)),
        bytes_down=float(record.bytes_down),
        bytes_up=float(record.bytes_up),
        seconds=float(record.seconds),
    )
    return out


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{key}."))
        elif v is not None:
            out[key] = str(v)[:500]
    return out


@contextmanager
def _quick_http() -> Iterator[None]:
    """MLflow's HTTP retry settings made short (2 retries, 5 s timeout) unless the user set them."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    added = [k for k in quick if k not in os.environ]
    os.environ.update({k: quick[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


class _Quiet(Callback):
    """Shared failure handling: the first error is a warning, then the logger stops."""

    label = "logger"

    def __init__(self) -> None:
        self.failed = False

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self.failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a logger must never stop a run
            self.failed = True
            log.warning("%s: %s failed (%s: %s); no more logging for this run", self.label, what, type(exc).__name__, exc)


class TensorBoardLogger(_Quiet):
    """Scalars per round into TensorBoard event files under ``log_dir`` (via ``torch.utils.tensorboard``)."""

    label = "tensorboard"

    def __init__(self, log_dir: str | Path, *, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("needs the tensorboard package: pip install 'fedloom[tracking]'", key="tracking.tensorboard") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir))
        if config:
            text = "\n".join(f"    {k} = {v}" for k, v in sorted(_flatten(config).items()))
            self._guard("writing the config", self.writer.add_text, "config", text, 0)

    def on_round(self, event: RoundEvent) -> None:
        rec = event.record
        assert rec is not None

        def write() -> None:
            for k, v in round_scalars(rec).items():
                self.writer.add_scalar(k, v, rec.round)
            self.writer.flush()

        self._guard(f"round {rec.round}", write)

    def on_end(self, status: str, event: RoundEvent | None) -> None:
        self._guard("writing the status", self.writer.add_text, "status", status, event.state.round if event else 0)
        self.writer.close()


class MLflowLogger(_Quiet):
    """One MLflow run per fedloom run: the config as params, metrics per round (step = round), the end status."""

    label = "mlflow"
    _STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "budget_exhausted": "FINISHED"}

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str = "fedloom",
        run_name: str = "run",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("needs MLflow: pip install 'fedloom[tracking]'", key="tracking.mlflow_uri") from None
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            with _quick_http():  # an unreachable server fails the config in seconds, not after minutes of retries
                exp = self.client.get_experiment_by_name(experiment)
                exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
                self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        except Exception as exc:  # noqa: BLE001 - an unreachable tracking server is a config problem
            raise ConfigError(f"cannot start an MLflow run at {tracking_uri!r}: {type(exc).__name__}: {exc}", key="tracking.mlflow_uri") from None
        if config:
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in sorted(_flatten(config).items())]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self._guard("logging the config", self.client.log_batch, self.run_id, params=params[i : i + 100])

    def on_round(self, event: RoundEvent) -> None:
        rec = event.record
        assert rec is not None
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, rec.round) for k, v in round_scalars(rec).items()]
        self._guard(f"round {rec.round}", self.client.log_batch, self.run_id, metrics=metrics)

    def on_end(self, status: str, event: RoundEvent | None) -> None:
        self.failed = False  # always try to close the run
        self._guard("setting the status", self.client.set_tag, self.run_id, "fedloom.status", status)
        self._guard("ending the run", self.client.set_terminated, self.run_id, self._STATUS.get(status, "FINISHED"))
