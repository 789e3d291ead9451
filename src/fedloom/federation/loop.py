"""The federated round loop, identical for every engine.

Each round: select a cohort, build each client's instruction (with the pipeline's client
stages as recipes), encode the global model for the broadcast if the pipeline says so, stream
the engine's updates through the stages' server halves and validation into the strategy's
aggregator, run the stages' finalize halves on the aggregate, apply it, evaluate, record.
``bytes_down`` / ``bytes_up`` are the bytes of the tensors as encoded (payloads, not the
dense vectors they stand for).
A malformed update (wrong shape, NaN, unknown or duplicate client) is rejected with a
logged reason and the round goes on; a round with fewer valid updates than
``min_updates`` is retried up to ``round_retries`` times (a fresh selection among the
clients available then); if it still falls short the global model is left unchanged and the
round is recorded as ``insufficient``: the run goes on either way.

Over-selection (``over_selection`` > 0, for deployments with dropouts) asks
``ceil(m * over_selection)`` extra clients besides the ``m`` selected, and closes the round
once ``m`` valid updates are in; the engine cancels the remaining clients' work.

Buffered asynchronous closing (``buffer``, a :class:`~fedloom.federation.buffered.BufferPolicy`:
FedBuff) is the third closing policy: a "round" is then one server apply, closed once K valid
updates are in while ``concurrency`` clients keep training across applies; each update's
delta is scaled by its staleness weight, and an update staler than the bound is rejected
with the reason. Simulation engines run it on a simulated clock (``latency``, a
:class:`~fedloom.federation.timing.LatencyModel`; with a latency model a synchronous round
also advances that clock by its slowest client), the remote engine in real time; the metric
``clock_s`` is the time since the run started. What is in flight is part of the checkpoint
(server state ``meta["schedule"]`` and the base models still referenced), so a resumed run
re-dispatches it.

Hierarchical rounds (``hierarchy``, :mod:`fedloom.federation.hierarchy`: HierFAVG) send the
model to every edge; each edge runs :meth:`Federation.edge_round` (in simulation here, on the
simulation engine; deployed, in its own ``fedloom edge`` process) and returns one
:class:`~fedloom.core.types.Partial`, which the root checks (its edge, round, model version,
roster) and merges into its aggregator.

An ``adversary`` (:class:`~fedloom.attacks.Adversary`, robustness experiments in simulation)
sits on the engine's update stream and replaces the attacking clients' updates before the
server's checks, the same way for every engine.

A stage may refuse to start a round (:meth:`~fedloom.pipeline.Stage.admit`: a privacy budget
the round would exceed): the run then stops before that round with the reason in
:attr:`Federation.stop_reason`, its model checkpointed, and the store's status
``budget_exhausted``. A stage that sets aggregation weights itself (differential privacy's
uniform weighting) replaces the strategy's weighting stage. A round with no valid update
still runs the stages' finalize when a stage asks for it (central DP noises an empty sum, so
that skipping a round never depends on who was sampled).

With a ``pruner`` (:class:`~fedloom.cutting.magnitude.MagnitudePruner`), every round ends by
pruning the new global model to the schedule's sparsity (metric ``sparsity``); the mask is
server state, and each instruction carries it with the transform that keeps pruned weights
at zero during local training.

After each round, every callback (:mod:`fedloom.federation.callbacks`) gets the round's
event, and at the end the run's status. With a :class:`~fedloom.store.Store`, construction
resumes from the run's latest valid checkpoint (server state, client states, history up to
it; later records are dropped and those rounds rerun), and the first callback is a
:class:`~fedloom.federation.callbacks.StoreRecorder`: each round is recorded, then
checkpointed every ``checkpoint_every`` rounds and after the last one. Record before
checkpoint: a checkpoint at round k therefore always has records for rounds 1..k.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedloom.core.keys import DITTO
from fedloom.core.errors import BudgetExhausted, ConfigError, InvalidUpdateError, ProtocolAbort, ProtocolError, StrategyError
from fedloom.core.params import ParamSpec
from fedloom.core.seeding import derive_seed
from fedloom.core.types import Aggregate, ClientInstruction, ClientUpdate, Partial, PersonalEval, tensor_bytes
from fedloom.cutting.magnitude import MagnitudePruner
from fedloom.engines.base import Engine
from fedloom.core.history import History, RoundRecord
from fedloom.federation.attempt import Attempt
from fedloom.federation.buffered import BufferPolicy, BufferedRounds, Flights
from fedloom.federation.callbacks import Callback, FunctionCallback, RoundEvent, StoreRecorder
from fedloom.federation.hierarchy import HierarchicalRounds, Hierarchy
from fedloom.federation.timing import LatencyModel
from fedloom.pipeline import Pipeline, StageContext
from fedloom.strategies.base import Aggregator, ServerState, Strategy

if TYPE_CHECKING:  # the loop only calls the store; secure aggregation loads on first use
    from fedloom.attacks import Adversary
    from fedloom.secure.host import SecureConfig, SecureServer
    from fedloom.store import RunHandle, Store

__all__ = ["Evaluator", "Federation", "RoundCallback"]

log = logging.getLogger("fedloom.federation")

Evaluator = Callable[[torch.Tensor], dict[str, float]]
RoundCallback = Callable[[RoundRecord, ServerState], None]


class Federation(BufferedRounds, HierarchicalRounds):
    """Drives ``strategy`` over ``engine`` for a number of rounds.

    ``evaluate`` (optional) maps the global vector to server-side metrics (prefixed
    ``test_``); ``federated_eval_every`` > 0 runs federated evaluation on the clients' own
    test splits every that many rounds (metrics prefixed ``fed_``, example-weighted).

    ``store`` and ``run_handle`` (from ``store.start_or_resume_run``) go together: the
    federation resumes from the run's latest valid checkpoint (``resumed_from`` is its
    round, 0 if none), records every round and checkpoints every ``checkpoint_every``.
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
        store: Store | None = None,
        run_handle: RunHandle | None = None,
        checkpoint_every: int = 1,
        over_selection: float = 0.0,
        round_retries: int = 0,
        pipeline: Pipeline | None = None,
        pruner: MagnitudePruner | None = None,
        callbacks: Sequence[Callback] = (),
        secure: SecureConfig | None = None,
        adversary: Adversary | None = None,
        buffer: BufferPolicy | None = None,
        latency: LatencyModel | None = None,
        hierarchy: Hierarchy | None = None,
        personal: PersonalEval | None = None,
        personal_eval_every: int = 0,
    ) -> None:
        if (store is None) != (run_handle is None):
            raise ValueError("store and run_handle go together: run_handle = store.start_or_resume_run(...)")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if not (0.0 <= over_selection <= 10.0):
            raise ValueError(f"over_selection must be in [0, 10], got {over_selection}")
        if round_retries < 0:
            raise ValueError(f"round_retries must be >= 0, got {round_retries}")
        if buffer is not None:
            if secure is not None:
                raise ConfigError(
                    "buffered (asynchronous) rounds cannot run under secure aggregation: the server must scale each "
                    "update by its staleness, and masked inputs only sum",
                    key="buffer",
                )
            if strategy.synchronous_only:
                raise ConfigError(f"strategy {strategy.name!r} needs synchronous rounds: {strategy.synchronous_only}", key="buffer")
            if over_selection > 0.0:
                raise ConfigError("over-selection is the first-m closing policy; buffered rounds close on their own", key="buffer")
        if latency is not None and engine.live:
            raise ConfigError("a latency model is for simulation; deployed clients take the time they take", key="latency")
        if hierarchy is not None:
            self._check_hierarchy(hierarchy, strategy, secure=secure, buffer=buffer, adversary=adversary)
        if personal_eval_every < 0:
            raise ConfigError(f"must be >= 0, got {personal_eval_every}", key="personalization.eval_every")
        self.personal = personal
        self.personal_eval_every = personal_eval_every
        self.hierarchy = hierarchy
        self.buffer = buffer
        self.latency = latency
        self._flights: Flights | None = None
        self.over_selection = over_selection
        self.round_retries = round_retries
        self.pruner = pruner
        self.secure = secure
        self.adversary = adversary
        self.strategy = strategy
        self.engine = engine
        self.spec = spec
        user = pipeline or Pipeline()
        own = strategy.stages()
        if any(st.weighting for st in user.stages):
            other = [st.name for st in own if not (st.weighting and st.runs_on_client)]  # data-dependent weights stay
            if other:
                theirs = next(st.name for st in user.stages if st.weighting)
                raise ConfigError(
                    f"stage {theirs!r} sets the aggregation weights, but strategy {strategy.name!r} weights updates "
                    f"its own way (stage {other[0]!r})",
                    key="pipeline",
                )
            own = ()  # the pipeline's weighting replaces the strategy's
        self.pipeline = Pipeline((*own, *user.stages), broadcast_stage=user.broadcast_stage)
        self.stop_reason: str | None = None
        self.state = initial if isinstance(initial, ServerState) else strategy.init(initial)
        spec.check_vector(self.state.params)
        tensors, meta = self.pipeline.init_state(spec)
        missing = {k: v for k, v in tensors.items() if k not in self.state.tensors}
        missing_meta = {k: v for k, v in meta.items() if k not in self.state.meta}
        if missing or missing_meta:
            self.state = replace(
                self.state, tensors={**self.state.tensors, **missing}, meta={**self.state.meta, **missing_meta}
            )
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.federated_eval_every = federated_eval_every
        self.min_updates = min_updates
        self.max_examples = max_examples
        self.history = History()
        self.store = store
        self.run_handle = run_handle
        self.checkpoint_every = checkpoint_every
        self.resumed_from = 0
        self.callbacks: list[Callback] = list(callbacks)
        if store is not None and run_handle is not None:
            self._resume(store, run_handle)
            self.callbacks.insert(0, StoreRecorder(store, run_handle, checkpoint_every=checkpoint_every))

    def _resume(self, store: Store, run: RunHandle) -> None:
        ckpt = store.latest_checkpoint(run, spec=self.spec)
        if ckpt is not None:
            self.state = ckpt.state
            self.engine.client_states.load_tensors(ckpt.client_states)
            self.resumed_from = ckpt.state.round
        store.truncate(run, after_round=self.state.round)
        self.history = store.history(run)

    # ----------------------------------------------------------------- rounds
    def run(self, rounds: int, *, callback: RoundCallback | None = None) -> History:
        """Run until ``rounds`` rounds have completed in total (a resumed state counts).

        ``callback(record, state)`` is called after each round, after the federation's own
        callbacks. With a store, the last round is always checkpointed and the run marked
        ``completed`` (``failed`` or ``interrupted`` if an exception or Ctrl-C stops it).
        """
        extra = FunctionCallback(callback) if callback is not None else None
        if extra is not None:
            self.callbacks.append(extra)
        try:
            while self.state.round < rounds:
                try:
                    self.step(checkpoint=self.state.round + 1 >= rounds)
                except BudgetExhausted as exc:
                    self._stop(str(exc))
                    return self.history
        except BaseException as exc:
            self._end("interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", quiet=True)
            raise
        finally:
            if extra is not None:
                self.callbacks.remove(extra)
            if self._flights is not None:  # work still in flight is in the last checkpoint
                self._flights.close()
                self._flights = None
        self._end("completed")
        return self.history

    def _event(self, record: RoundRecord | None, *, last: bool = False) -> RoundEvent:
        return RoundEvent(record, self.state, self.spec, self.engine.client_states.to_tensors, last=last)

    def _end(self, status: str, *, quiet: bool = False) -> None:
        """Tell every callback the run ended with ``status`` (``quiet``: never raise, an error is in flight)."""
        event = self._event(self.history.records[-1] if self.history.records else None, last=True)
        for cb in list(self.callbacks):
            if not quiet:
                cb.on_end(status, event)
                continue
            try:
                cb.on_end(status, event)
            except Exception:  # noqa: BLE001 - never mask the original error
                log.exception("callback %s failed while the run ended %s", type(cb).__name__, status)

    def _stop(self, reason: str) -> None:
        """Stop before the next round: log why; the callbacks (the store: a checkpoint, the status) hear of it."""
        self.stop_reason = reason
        log.warning("stopping before round %d: %s", self.state.round + 1, reason)
        self._end("budget_exhausted")

    def step(self, *, checkpoint: bool = False) -> RoundRecord:
        """Run one round and return its record.

        Every callback then gets the round's event: with a store, the record is committed
        first, then a checkpoint is saved if this round is a multiple of ``checkpoint_every``
        or ``checkpoint`` is set (``checkpoint``: this is the run's last round). Raises
        :class:`~fedloom.core.errors.BudgetExhausted` (nothing run) if a stage refuses the round.
        """
        t0 = time.perf_counter()
        rnd = self.state.round + 1
        self.pipeline.admit(rnd, self.state.tensors, self.state.meta)
        pipe = self.pipeline.for_round(self.state.tensors, self.state.meta)
        bytes_down = bytes_up = 0
        rejected: dict[str, str] = {}
        attempt = 0
        while True:
            if self.buffer is not None:  # buffered closing: waiting longer is the retry
                tried = self._attempt_buffered(rnd, rejected, pipe)
            elif self.hierarchy is not None:
                tried = self._attempt_hierarchical(rnd, attempt, rejected, pipe)
            else:
                tried = self._attempt(rnd, attempt, rejected, pipe)
            aggregator, accepted, num_available = tried.aggregator, tried.accepted, tried.available
            bytes_down += tried.bytes_down
            bytes_up += tried.bytes_up
            if len(accepted) >= self.min_updates or attempt >= self.round_retries or self.buffer is not None:
                break
            attempt += 1
            log.warning(
                "round %d: %d valid updates < min_updates %d; retrying (attempt %d of %d)",
                rnd, len(accepted), self.min_updates, attempt + 1, self.round_retries + 1,
            )  # fmt: skip

        metrics: dict[str, float] = dict(tried.metrics)
        status = "ok"
        reason = tried.aborted
        aggregate: Aggregate | None = None
        empty = aggregator is not None and not accepted and pipe.aggregates_empty and tried.protocol is None
        if aggregator is not None and (len(accepted) >= self.min_updates or empty):
            # the population this aggregate's cohort was selected from (SCAFFOLD's N)
            if empty:
                zero = torch.zeros(self.spec.numel, dtype=torch.float64, device=self.state.params.device)
                aggregate = Aggregate(delta=zero, num_clients=0, num_examples=0, weight=0.0, num_available=num_available)
            else:
                try:
                    aggregate = replace(aggregator.result(), num_available=num_available)
                except ProtocolAbort as exc:  # the masked inputs are discarded: nobody contributed
                    status, reason, accepted = "aborted", str(exc), []
                except StrategyError as exc:  # e.g. Krum after rejections left n <= 2f + 2
                    status, reason = "insufficient", str(exc)
                finally:
                    if tried.protocol is not None:
                        bytes_down += tried.protocol.bytes_down
                        bytes_up += tried.protocol.bytes_up
                        rejected.update({c: r for c, r in tried.protocol.rejected.items() if c not in rejected})
        elif reason:
            status = "aborted"
        else:
            status = "insufficient"
            reason = f"{len(accepted)} valid updates < min_updates {self.min_updates}"
        if aggregate is not None:
            aggregate, tensors, meta, stage_metrics = pipe.finalize(
                aggregate, self._ctx(rnd), self.state.tensors, self.state.meta
            )
            metrics.update(stage_metrics)
            self.state = self.strategy.apply(replace(self.state, tensors=tensors, meta=meta), aggregate)
            metrics.update({f"train_{k}" if not k.startswith("train_") else k: v for k, v in aggregate.metrics.items()})
            num_examples = aggregate.num_examples
        else:
            log.warning("round %d %s: %s; model unchanged", rnd, status, reason)
            self.state = replace(self.state, round=rnd)
            num_examples = 0
        if self.secure is not None:
            self.engine.protocol_clients.end_round()  # in-process sessions: fresh keys next round
        if self.pruner is not None:
            self.state, prune_metrics = self.pruner.apply(self.state, self.spec, rnd)
            metrics.update(prune_metrics)
        if self.evaluate is not None and (rnd % self.eval_every == 0):
            metrics.update({f"test_{k}": v for k, v in self.evaluate(self.state.params).items()})
        per_client: dict[str, dict[str, float]] = {}
        personal_due = self.personal is not None and (
            checkpoint or (self.personal_eval_every > 0 and rnd % self.personal_eval_every == 0)
        )
        if personal_due or (self.federated_eval_every > 0 and rnd % self.federated_eval_every == 0):
            metrics.update(self.federated_evaluation(per_client=per_client))
        if personal_due:
            metrics.update(self.federated_evaluation(personal=self.personal, per_client=per_client))
        if self.buffer is not None or self.latency is not None:
            metrics["clock_s"] = self._schedule_snapshot(tried.dispatched)
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
            reason=reason if status != "ok" else "",
            client_metrics=per_client,
        )
        self.history.append(record)
        event = self._event(record, last=checkpoint)
        for cb in list(self.callbacks):
            cb.on_round(event)
        return record

    def _attempt(self, rnd: int, attempt: int, rejected: dict[str, str], pipe: Pipeline) -> Attempt:
        """One try at round ``rnd``: select, dispatch, stream the updates into a fresh aggregator.

        With secure aggregation, the protocol's setup exchanges run first and only the clients
        that completed them train; the aggregator then sums masked inputs.
        """
        try:
            available = self.engine.available_clients()
            cohort = self.strategy.select(rnd, available)
        except StrategyError as exc:
            if not self.round_retries:
                raise  # nothing will change: a configuration error, not a dropout
            log.warning("round %d: cannot select a cohort: %s", rnd, exc)
            return Attempt(None, [], 0, 0, 0)
        target = len(cohort)
        if self.over_selection > 0.0:
            rest = sorted(set(available) - set(cohort))
            extra = min(len(rest), math.ceil(target * self.over_selection))
            if extra:
                rng = np.random.default_rng([derive_seed(self.strategy.seed, "over-selection"), rnd, attempt])
                cohort = cohort + sorted(rest[i] for i in rng.choice(len(rest), size=extra, replace=False))
        proto: SecureServer | None = None
        if self.secure is not None:
            proto = self.secure.server(rnd, cohort, derive_seed(self.strategy.seed, "secagg", rnd, attempt))
            try:
                trained = set(proto.setup(self.engine.exchange))
            except ProtocolAbort as exc:
                rejected.update(proto.rejected)
                log.warning("round %d: %s", rnd, exc)
                return Attempt(None, [], proto.bytes_down, proto.bytes_up, len(set(available)), aborted=str(exc))
            rejected.update(proto.rejected)
            proto.rejected.clear()
            target = min(target, len(trained))
            cohort = [c for c in cohort if c in trained]
        instructions = self._instructions(rnd, cohort, pipe)
        if proto is not None:
            instructions = [replace(ins, protocol=proto.input_message(ins.client_id)) for ins in instructions]
        expected = set(cohort)
        aggregator = self.strategy.aggregator(self.state, rnd)
        if proto is not None:
            from fedloom.secure.aggregator import SecureSumAggregator

            aggregator = SecureSumAggregator(proto, self.engine.exchange, self.spec.numel, self.state.params.dtype)
        ctx = self._ctx(rnd)
        sent = pipe.broadcast(self.state.params, ctx, derive_seed(self.strategy.seed, "broadcast", rnd))
        bytes_down = sum(sent.nbytes + sum(tensor_bytes(t) for t in ins.payload.values()) for ins in instructions)
        bytes_up = 0
        accepted: list[str] = []
        extra = {} if sent.payload is None else {"broadcast": sent.payload}  # engines written before broadcasts still work
        if self._sums_where_trained(aggregator, proto):
            return self._attempt_partials(rnd, sent.vector, instructions, aggregator, pipe, rejected, bytes_down, len(set(available)))
        stream = self.engine.run_cohort(sent.vector, instructions, **extra)
        if self.adversary is not None:  # a robustness experiment: attackers' updates replaced on the way
            from fedloom.attacks import AttackContext

            weighting = next((st for st in pipe.stages if st.weighting and st.runs_on_client), None)
            stream = self.adversary.intercept(stream, AttackContext(self.spec, rnd, weighting))  # type: ignore[arg-type]
        try:
            for update in stream:
                bytes_up += update.nbytes
                if isinstance(update, Partial):  # an edge aggregator answering a flat round
                    rejected[update.source] = "a partial aggregate in a round without [hierarchy]"
                    log.warning("round %d: rejected a partial aggregate from %r: the run is not hierarchical", rnd, update.source)
                    continue
                if not self._fold(aggregator, update.client_id, rnd, rejected, lambda u=update: self._check(u, expected, rnd, ctx, pipe, proto)):
                    continue
                expected.discard(update.client_id)
                accepted.append(update.client_id)
                if self.over_selection > 0.0 and len(accepted) >= target:
                    break  # over-selection: enough updates, the engine cancels the rest
        finally:
            self._end_stream(stream, rejected)
        return Attempt(aggregator, accepted, bytes_down, bytes_up, len(set(available)), protocol=proto, dispatched=cohort)

    def _sums_where_trained(self, aggregator: Aggregator, proto: Any) -> bool:
        """Whether the engine's workers can sum their shards (nothing needs each update at the server)."""
        return (
            self.engine.partials
            and proto is None
            and self.adversary is None
            and self.over_selection == 0.0
            and not aggregator.partial_refusal
        )

    def _attempt_partials(
        self,
        rnd: int,
        params: torch.Tensor,
        instructions: Sequence[ClientInstruction],
        aggregator: Aggregator,
        pipe: Pipeline,
        rejected: dict[str, str],
        bytes_down: int,
        available: int,
    ) -> Attempt:
        """A synchronous round whose updates are checked and summed where they were trained (one partial per Ray worker or vectorized chunk)."""
        expected = {ins.client_id for ins in instructions}
        accepted: list[str] = []
        bytes_up = 0
        fresh = self.strategy.aggregator(self.state, rnd)
        try:
            for part, nbytes in self.engine.run_partials(
                params, instructions, aggregator=fresh, pipe=pipe, ctx=self._ctx(rnd), max_examples=self.max_examples
            ):
                bytes_up += nbytes
                strangers = [c for c in part.client_ids if c not in expected]
                if strangers:  # an engine bug, never a client's doing: stop the run
                    raise StrategyError(f"partial from {part.source!r} holds clients outside the cohort: {strangers[:3]}")
                aggregator.merge(part, dtype=self.state.params.dtype)
                expected.difference_update(part.client_ids)
                accepted.extend(part.client_ids)
        finally:
            for cid, reason in self.engine.take_rejections().items():
                rejected[cid] = reason
                log.warning("round %d: rejected update from %r: %s", rnd, cid, reason)
        dispatched = [ins.client_id for ins in instructions]
        return Attempt(aggregator, accepted, bytes_down, bytes_up, available, dispatched=dispatched)

    # ------------------------------------------------------------- shared
    def _instructions(self, rnd: int, cohort: Sequence[str], pipe: Pipeline) -> list[ClientInstruction]:
        """The cohort's instructions for round ``rnd``: the strategy's, with the stages' recipes and the pruning mask."""
        instructions = [self.strategy.client_config(self.state, rnd, cid) for cid in cohort]
        if self.personal is not None and self.personal.transforms:
            own = tuple(t for t in self.personal.transforms if t.name != DITTO)  # personal layers stay on each client
            ditto = tuple(t for t in self.personal.transforms if t.name == DITTO)  # Ditto: a personal run after the usual one
            instructions = [replace(ins, transforms=(*ins.transforms, *own), personal=ditto) for ins in instructions]
        if pipe.recipes:
            instructions = [replace(ins, stages=pipe.recipes) for ins in instructions]
        pruning = self.pruner.for_clients(self.state, self.spec) if self.pruner is not None else None
        if pruning is not None:
            recipe, payload = pruning
            instructions = [
                replace(ins, transforms=(*ins.transforms, recipe), payload={**ins.payload, **payload}) for ins in instructions
            ]
        return instructions

    def _end_stream(self, stream: Any, rejected: dict[str, str]) -> None:
        """Close an engine's stream (the engine cancels what is left) and collect what it refused at the door."""
        close = getattr(stream, "close", None)
        if close is not None:
            close()
        rejected.update(self.engine.take_rejections())

    @staticmethod
    def _fold(
        aggregator: Aggregator, cid: str, rnd: int, rejected: dict[str, str], check: Callable[[], ClientUpdate], *, at: str = "the server"
    ) -> bool:
        """Add the update ``check()`` returns; if it refuses it (or the aggregator does), record and log why. True if added."""
        try:
            aggregator.add(check())
        except (InvalidUpdateError, StrategyError, ProtocolError) as exc:
            reason = getattr(exc, "reason", str(exc))
            rejected[cid] = reason
            log.warning("round %d: %s rejected the update of %r: %s", rnd, at, cid, reason)
            return False
        return True

    def federated_evaluation(
        self, *, personal: PersonalEval | None = None, per_client: dict[str, dict[str, float]] | None = None
    ) -> dict[str, float]:
        """Example-weighted mean of every client's metrics on its own test split (``fed_*``).

        With ``personal``, each client evaluates its own model (its personal layers, fine-tuned:
        ``pers_*``). ``per_client`` (optional) receives each client's metrics under the same names.
        """
        prefix = "fed" if personal is None else "pers"
        sums: dict[str, float] = {}
        total = 0
        extra = {} if personal is None else {"personal": personal}
        for cid, n, m in self.engine.evaluate_clients(self.state.params, self.engine.available_clients(), **extra):
            total += n
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v * n
            if per_client is not None:
                per_client.setdefault(cid, {}).update({f"{prefix}_{k}": float(v) for k, v in m.items()})
        return {f"{prefix}_{k}": v / total for k, v in sums.items()} if total else {}

    def _ctx(self, rnd: int) -> StageContext:
        return StageContext(self.spec, rnd, self.state.params.dtype)

    def _check(
        self,
        update: ClientUpdate,
        expected: set[str],
        rnd: int,
        ctx: StageContext,
        pipe: Pipeline,
        proto: SecureServer | None = None,
    ) -> ClientUpdate:
        """The update decoded by the stages' server halves and validated, or InvalidUpdateError."""
        cid = update.client_id
        if cid not in expected:
            raise InvalidUpdateError("client not in this round's cohort (or already answered)", client_id=cid)
        if update.round != rnd:
            raise InvalidUpdateError(f"update is for round {update.round}, not {rnd}", client_id=cid)
        update.validate_header(max_examples=self.max_examples)
        if proto is not None:  # a masked input: the protocol checks it, the server halves check its header
            try:
                proto.check(update)
            except ProtocolError as exc:
                raise InvalidUpdateError(f"{self.secure.name if self.secure else 'secure'}: {exc}", client_id=cid) from None
            return pipe.decode(update, ctx)
        return pipe.check(update, ctx, max_examples=self.max_examples)
