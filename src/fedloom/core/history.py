"""Per-round history of a run: metrics, participating clients, traffic, timing."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["History", "RoundRecord"]


@dataclass(frozen=True)
class RoundRecord:
    """What happened in one round.

    ``metrics`` holds server-side evaluation (``test_*``), the example-weighted training
    metrics of the cohort (``train_*``) and federated evaluation (``fed_*``) when run.
    ``bytes_down``/``bytes_up`` count the tensors sent to / received from clients.
    ``rejected`` maps client ids to the reason their update was refused. ``status`` is
    ``ok``, ``insufficient`` (too few valid updates for the rule: the model is unchanged) or
    ``aborted`` (a secure-aggregation round that could not finish: unchanged, nothing
    unmasked); ``reason`` says why when it is not ``ok``.
    """

    round: int
    metrics: dict[str, float]
    clients: list[str]
    num_examples: int
    bytes_down: int
    bytes_up: int
    seconds: float
    rejected: dict[str, str] = field(default_factory=dict)
    status: str = "ok"
    reason: str = ""
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each client's own evaluation this round (``fed_*`` of the global model, ``pers_*`` of its
    personalized one), when federated or personalized evaluation ran."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.metrics.items()}
        d["client_metrics"] = {
            c: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
            for c, m in self.client_metrics.items()
        }
        d["bytes"] = {"down": self.bytes_down, "up": self.bytes_up}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundRecord:
        """The record :meth:`to_dict` wrote (a ``null`` metric reads back as NaN)."""
        return cls(
            round=int(d["round"]),
            metrics={k: (math.nan if v is None else float(v)) for k, v in d.get("metrics", {}).items()},
            clients=list(d.get("clients", [])),
            num_examples=int(d.get("num_examples", 0)),
            bytes_down=int(d.get("bytes_down", 0)),
            bytes_up=int(d.get("bytes_up", 0)),
            seconds=float(d.get("seconds", 0.0)),
            rejected=dict(d.get("rejected", {})),
            status=str(d.get("status", "ok")),
            reason=str(d.get("reason", "")),
            client_metrics={
                str(c): {k: (math.nan if v is None else float(v)) for k, v in m.items()}
                for c, m in (d.get("client_metrics") or {}).items()
            },
        )


class History:
    """An append-only list of :class:`RoundRecord` with JSON output and metric series."""

    def __init__(self, records: list[RoundRecord] | None = None) -> None:
        self.records: list[RoundRecord] = list(records or [])

    def append(self, record: RoundRecord) -> None:
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[RoundRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> RoundRecord:
        return self.records[i]

    def series(self, metric: str) -> list[tuple[int, float]]:
        """(round, value) pairs of ``metric`` over the rounds that recorded it."""
        return [(r.round, r.metrics[metric]) for r in self.records if metric in r.metrics]

    def metric_names(self) -> list[str]:
        names: dict[str, None] = {}
        for r in self.records:
            names.update(dict.fromkeys(r.metrics))
        return list(names)

    def first_round_reaching(self, metric: str, target: float, *, higher_is_better: bool = True) -> int | None:
        """The first round whose ``metric`` reaches ``target`` (None if never)."""
        for rnd, v in self.series(metric):
            if (v >= target) if higher_is_better else (v <= target):
                return rnd
        return None

    def to_list(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.records]

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_list(), indent=1))

    @classmethod
    def load_json(cls, path: str | Path) -> History:
        """A history written by :meth:`save_json`."""
        data = json.loads(Path(path).read_text())
        rows = data["rounds"] if isinstance(data, dict) else data
        return cls([RoundRecord.from_dict(r) for r in rows])
