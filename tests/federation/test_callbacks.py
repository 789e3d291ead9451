"""Round callbacks as equals: order, end status, the store recorder, TensorBoard and MLflow loggers read back."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedloom.core.config import parse_config
from fedloom.core.errors import ConfigError
from fedloom.federation.callbacks import Callback, RoundEvent
from fedloom.federation.loggers import round_scalars
from fedloom.run import build_run


def _cfg(tmp_path: Path, **extra: object) -> dict:
    return {
        "run": {"name": "tracked", "seed": 2, "rounds": 3, "engine": "sequential"},
        "data": {"name": "hospital"},
        "model": {"name": "mlp", "hidden": [8]},
        "strategy": {"name": "fedavg", "fraction": 1.0},
        "client": {"epochs": 1, "batch_size": 64, "lr": 0.01, "max_steps": 5},
        **extra,
    }


class _Spy(Callback):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def on_round(self, event: RoundEvent) -> None:
        assert event.record is not None
        self.log.append(f"{self.name}:{event.record.round}:{'last' if event.last else ''}")

    def on_end(self, status: str, event: RoundEvent | None) -> None:
        self.log.append(f"{self.name}:end:{status}")


def test_callbacks_run_in_order_and_hear_the_end(tmp_path: Path) -> None:
    r = build_run(parse_config(_cfg(tmp_path, run={"name": "t", "rounds": 2, "engine": "sequential", "store": str(tmp_path / "s.db")})))
    log: list[str] = []
    r.federation.callbacks += [_Spy("a", log), _Spy("b", log)]
    r.federation.run(2, callback=lambda rec, st: log.append(f"fn:{rec.round}"))
    assert log == ["a:1:", "b:1:", "fn:1", "a:2:last", "b:2:last", "fn:2", "a:end:completed", "b:end:completed"]
    # the store recorder came first: both rounds recorded, the last checkpointed, the run completed
    store, handle = r.federation.store, r.federation.run_handle
    assert store is not None and handle is not None
    assert [rec.round for rec in store.history(handle)] == [1, 2]
    assert store.list_runs()[0].status == "completed" and store.list_runs()[0].last_checkpoint == 2


def test_a_failing_round_tells_every_callback(tmp_path: Path) -> None:
    r = build_run(parse_config(_cfg(tmp_path)))
    log: list[str] = []
    r.federation.callbacks.append(_Spy("a", log))

    def boom(rec, st):  # type: ignore[no-untyped-def]
        raise RuntimeError("callback broke")

    with pytest.raises(RuntimeError, match="callback broke"):
        r.federation.run(3, callback=boom)
    assert log == ["a:1:", "a:end:failed"]


def test_tensorboard_logger_writes_every_round(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = build_run(parse_config(_cfg(tmp_path, tracking={"tensorboard": str(tmp_path / "tb")})))
    hist = r.federation.run(3)
    ea = EventAccumulator(str(tmp_path / "tb" / "tracked"))
    ea.Reload()
    for name in ("test_mae", "train_loss", "bytes_up", "clients"):
        got = [(e.step, e.value) for e in ea.Scalars(name)]
        want = [(rec.round, round_scalars(rec)[name]) for rec in hist]
        assert [s for s, _ in got] == [1, 2, 3]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # stored as float32
    assert ea.Scalars("clients")[0].value == 3.0


def test_mlflow_logger_records_params_metrics_and_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store: no server needed in a test
    uri = (tmp_path / "mlruns").as_uri()
    r = build_run(parse_config(_cfg(tmp_path, tracking={"mlflow_uri": uri, "mlflow_experiment": "fl"})))
    hist = r.federation.run(3)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fl")
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["fedloom.status"] == "completed"
    assert run.data.params["strategy.name"] == "fedavg" and run.data.params["model.hidden"] == "[8]"
    series = client.get_metric_history(run.info.run_id, "test_mae")
    assert [(m.step, m.value) for m in sorted(series, key=lambda m: m.step)] == [
        (rec.round, rec.metrics["test_mae"]) for rec in hist
    ]


def test_an_unreachable_mlflow_server_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tracking.mlflow_uri"):
        build_run(parse_config(_cfg(tmp_path, tracking={"mlflow_uri": "http://127.0.0.1:9"})))


def test_round_scalars_skip_nan() -> None:
    from fedloom.core.history import RoundRecord

    rec = RoundRecord(round=1, metrics={"a": 1.5, "b": math.nan}, clients=["x", "y"], num_examples=3,
                      bytes_down=10, bytes_up=20, seconds=0.5, rejected={"z": "bad"})  # fmt: skip
    assert round_scalars(rec) == {"a": 1.5, "clients": 2.0, "rejected": 1.0, "bytes_down": 10.0, "bytes_up": 20.0, "seconds": 0.5}
