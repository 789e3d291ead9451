"""Checking and summing a shard of updates where it was trained: one :class:`Partial` per shard.

The round loop checks each update (its cohort and round, the stages' server halves,
:meth:`~fedloom.pipeline.Pipeline.check`) and adds it to the round's aggregator. An engine
that trains a shard of the cohort away from the round loop — a Ray worker (another process),
a vectorized engine's chunk thread — can do exactly that where the shard was trained, into a
fresh copy of the round's empty aggregator, and hand the loop one partial sum instead of one
update per client (:meth:`~fedloom.engines.base.Engine.run_partials`). :func:`sum_checked` is
that check-and-add, the one place both engines run it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fedloom.core.errors import InvalidUpdateError, StrategyError
from fedloom.core.types import ClientUpdate, Partial
from fedloom.pipeline import Pipeline, StageContext
from fedloom.strategies.base import Aggregator

__all__ = ["ShardSum", "sum_checked"]


@dataclass
class ShardSum:
    """A shard's checked updates as one partial (None if none was accepted), its refusals, its bytes."""

    partial: Partial | None
    rejected: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0
    """The bytes the shard's updates took (accepted or not), as the round loop counts them."""


def sum_checked(
    updates: Iterable[ClientUpdate],
    *,
    expected: set[str],
    aggregator: Aggregator,
    pipe: Pipeline,
    ctx: StageContext,
    max_examples: int | None,
    source: str,
    model_version: int,
    prepare: Callable[[ClientUpdate], ClientUpdate] | None = None,
) -> ShardSum:
    """Check each update as the round loop does and add it to ``aggregator`` (an empty copy of the round's).

    ``expected``: the shard's clients (an update from anyone else, or a second one from the
    same client, is refused); ``prepare`` runs on each update before its check (e.g. moving
    it to the CPU). Refused updates are recorded with their reason, never raised.
    """
    waiting = set(expected)
    out = ShardSum(None)
    for update in updates:
        cid = update.client_id
        out.nbytes += update.nbytes
        try:
            if cid not in waiting:
                raise InvalidUpdateError("client not in this shard (or already answered)", client_id=cid)
            if update.round != ctx.round:
                raise InvalidUpdateError(f"update is for round {update.round}, not {ctx.round}", client_id=cid)
            aggregator.add(pipe.check(update if prepare is None else prepare(update), ctx, max_examples=max_examples))
        except (InvalidUpdateError, StrategyError) as exc:
            out.rejected[cid] = getattr(exc, "reason", str(exc))
            continue
        waiting.discard(cid)
    if aggregator.client_ids:
        out.partial = aggregator.partial(source, ctx.round, model_version)
    return out
