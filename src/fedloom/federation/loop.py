"""The federated round loop, identical for every engine.

Each round: select a cohort, build each client's instruction, stream the engine's updates
through validation into the strategy's aggregator, apply the aggregate, evaluate, record.
A malformed update (wrong shape, NaN, unknown or duplicate client) is rejected with a
logged reason and the round goes on; a round with fewer valid updates than
``min_updates`` leaves the global model unchanged and is recorded as ``insufficient``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from fedloom.core.errors import InvalidUpdateError, StrategyError
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientUpdate
from fedloom.engines.base import Engine
from fedloom.federation.history import History, RoundRecord
from fedloom.strategies.base import ServerState, Strategy

__all__ = ["Evaluator", "Federation", "RoundCallback"]

log = logging.getLogger("fedloom.federation")

Evaluator = Callable[[torch.Tensor], dict[str, float]]
RoundCallback = Callable[[RoundRecord, ServerState], None]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Federation:
    """Drives ``strategy`` over ``engine`` for a number of rounds.

    ``evaluate`` (optional) maps the global vector to server-side metrics (prefixed
    ``test_``); ``federated_eval_every`` > 0 runs federated evaluation on the clients' own
    test splits every that many rounds (metrics prefixed ``fed_``, example-weighted).
    """

    def __init__(
        self,
        *,
        strategy: Strategy,
        engine: Engine,
        spec: ParamSpec,
        initial: torch.Tensor | ServerState,
        evaluate: Evaluator | None = None,
        eval_every: int = 1,
        federated_eval_every: int = 0,
        min_updates: int = 1,
        max_examples: int | None = None,
    ) -> None:
        self.strategy = strategy
        self.engine = engine
        self.spec = spec
        self.state = initial if isinstance(initial, ServerState) else strategy.init(initial)
        spec.check_vector(self.state.params)
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.federated_eval_every = federated_eval_every
        self.min_updates = min_updates
        self.max_examples = max_examples
        self.history = History()

    # ----------------------------------------------------------------- rounds
    def run(self, rounds: int, *, callback: RoundCallback | None = None) -> History:
        """Run until ``rounds`` rounds have completed in total (a resumed state counts)."""
        while self.state.round < rounds:
            record = self.step()
            if callback is not None:
                callback(record, self.state)
        return self.history

    def step(self) -> RoundRecord:
        """Run one round and return its record."""
        t0 = time.perf_counter()
        rnd = self.state.round + 1
        cohort = self.strategy.select(rnd, self.engine.available_clients())
        instructions = [self.strategy.client_config(self.state, rnd, cid) for cid in cohort]
        expected = set(cohort)
        aggregator = self.strategy.aggregator(self.state, rnd)
        params_bytes = _nbytes(self.state.params)
        bytes_down = sum(params_bytes + sum(_nbytes(t) for t in ins.payload.values()) for ins in instructions)
        bytes_up = 0
        accepted: list[str] = []
        rejected: dict[str, str] = {}
        for update in self.engine.run_cohort(self.state.params, instructions):
            bytes_up += _nbytes(update.delta) + sum(_nbytes(t) for t in update.extras.values())
            try:
                self._check(update, expected, rnd)
                aggregator.add(update)
            except (InvalidUpdateError, StrategyError) as exc:
                reason = getattr(exc, "reason", str(exc))
                rejected[update.client_id] = reason
                log.warning("round %d: rejected update from %r: %s", rnd, update.client_id, reason)
                continue
            expected.discard(update.client_id)
            accepted.append(update.client_id)

        metrics: dict[str, float] = {}
        status = "ok"
        if len(accepted) >= self.min_updates:
            aggregate = aggregator.result()
            self.state = self.strategy.apply(self.state, aggregate)
            metrics.update({f"train_{k}" if not k.startswith("train_") else k: v for k, v in aggregate.metrics.items()})
            num_examples = aggregate.num_examples
        else:
            status = "insufficient"
            log.warning("round %d: %d valid updates < min_updates %d; model unchanged", rnd, len(accepted), self.min_updates)
            self.state = replace(self.state, round=rnd)
            num_examples = 0
        if self.evaluate is not None and (rnd % self.eval_every == 0):
            metrics.update({f"test_{k}": v for k, v in self.evaluate(self.state.params).items()})
        if self.federated_eval_every > 0 and rnd % self.federated_eval_every == 0:
            metrics.update(self.federated_evaluation())
        record = RoundRecord(
            round=rnd,
            metrics=metrics,
            clients=accepted,
            num_examples=num_examples,
            bytes_down=bytes_down,
            bytes_up=bytes_up,
            seconds=time.perf_counter() - t0,
            rejected=rejected,
            status=status,
        )
        self.history.append(record)
        return record

    def federated_evaluation(self) -> dict[str, float]:
        """Example-weighted mean of every client's metrics on its own test split (``fed_*``)."""
        sums: dict[str, float] = {}
        total = 0
        for _cid, n, m in self.engine.evaluate_clients(self.state.params, self.engine.available_clients()):
            total += n
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v * n
        return {f"fed_{k}": v / total for k, v in sums.items()} if total else {}

    def _check(self, update: ClientUpdate, expected: set[str], rnd: int) -> None:
        if update.client_id not in expected:
            raise InvalidUpdateError("client not in this round's cohort (or already answered)", client_id=update.client_id)
        if update.round != rnd:
            raise InvalidUpdateError(f"update is for round {update.round}, not {rnd}", client_id=update.client_id)
        update.validate(numel=self.spec.numel, dtype=self.state.params.dtype, max_examples=self.max_examples)
