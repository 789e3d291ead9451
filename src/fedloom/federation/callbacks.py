"""Round callbacks: everything that watches a run, as equals.

After every round the loop hands a :class:`RoundEvent` to each of its callbacks, in order;
when the run ends (completed, failed, interrupted, out of privacy budget) each gets
:meth:`Callback.on_end`. The run store (:class:`StoreRecorder`: the record, then the
checkpoint), the CLI's progress, the loggers (:mod:`fedloom.federation.loggers`: TensorBoard,
MLflow) and — through the store — the dashboard are all callbacks; none is special to the loop.

A callback that raises stops the run (a store that cannot write must not let the run go on
unrecorded); a logger that can fail without harm catches its own errors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fedloom.core.history import RoundRecord
from fedloom.core.params import ParamSpec
from fedloom.strategies.base import ServerState

if TYPE_CHECKING:
    from fedloom.store import RunHandle, Store

__all__ = ["Callback", "FunctionCallback", "RoundEvent", "StoreRecorder"]


@dataclass(frozen=True)
class RoundEvent:
    """One finished round: its record, the server state after it, and how to get the client states.

    ``last`` is True for the last round the run will do (the store checkpoints it whatever
    ``checkpoint_every`` says). ``record`` is None only in :meth:`Callback.on_end` of a run
    that stopped before any round ran in this process.
    """

    record: RoundRecord | None
    state: ServerState
    spec: ParamSpec
    client_states: Callable[[], Mapping[str, torch.Tensor]]
    last: bool = False


class Callback:
    """Base of the round callbacks (both hooks do nothing by default)."""

    def on_round(self, event: RoundEvent) -> None:
        """Called after each round, in the order the callbacks were given."""

    def on_end(self, status: str, event: RoundEvent | None) -> None:
        """Called once when the run stops: ``completed``, ``failed``, ``interrupted`` or ``budget_exhausted``.

        ``event`` describes the state the run stopped in.
        """


class FunctionCallback(Callback):
    """A plain ``fn(record, state)`` as a callback (the CLI's progress line)."""

    def __init__(self, fn: Callable[[RoundRecord, ServerState], None]) -> None:
        self.fn = fn

    def on_round(self, event: RoundEvent) -> None:
        assert event.record is not None
        self.fn(event.record, event.state)


class StoreRecorder(Callback):
    """Record every round in the :class:`~fedloom.store.Store`, then checkpoint it.

    A checkpoint is written every ``checkpoint_every`` rounds and for the last one; record
    before checkpoint, so a checkpoint at round k always has records for rounds 1..k. At the
    end the run's status is set; a run stopped by its budget is checkpointed where it stopped.
    """

    def __init__(self, store: Store, run: RunHandle, *, checkpoint_every: int = 1) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.store = store
        self.run = run
        self.checkpoint_every = checkpoint_every

    def on_round(self, event: RoundEvent) -> None:
        assert event.record is not None
        self.store.record_round(self.run, event.record)
        if event.last or event.record.round % self.checkpoint_every == 0:
            self.store.save_checkpoint(self.run, event.state, event.client_states(), event.spec)

    def on_end(self, status: str, event: RoundEvent | None) -> None:
        if status == "budget_exhausted" and event is not None:  # keep the model it stopped with
            latest = self.store.latest_checkpoint(self.run, spec=event.spec)
            if latest is None or latest.state.round != event.state.round:
                self.store.save_checkpoint(self.run, event.state, event.client_states(), event.spec)
        self.store.set_status(self.run, status)
