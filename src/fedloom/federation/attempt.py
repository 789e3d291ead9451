"""What one try at a round produced: shared by the closing policies of the round loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedloom.strategies.base import Aggregator

__all__ = ["Attempt"]


@dataclass
class Attempt:
    """What one try at a round produced: the filled aggregator (None: nothing to aggregate), who
    was accepted, the traffic, how many clients were available, the round protocol's server,
    why it aborted, who was asked, and the closing policy's own metrics."""

    aggregator: Aggregator | None
    accepted: list[str]
    bytes_down: int
    bytes_up: int
    available: int
    protocol: Any = None
    aborted: str = ""
    dispatched: Sequence[str] = ()
    metrics: dict[str, float] = field(default_factory=dict)
