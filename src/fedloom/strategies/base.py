"""The Strategy interface, its explicit server state, and the streaming Aggregator.

A round, seen from the server (DESIGN.md):

    cohort = strategy.select(rnd, available)
    instr  = strategy.client_config(state, rnd, cid)      for each cid in cohort
    agg    = strategy.aggregator(state, rnd)
    agg.add(update)                                        for each streamed, decoded update
    state  = strategy.apply(state, finalize(agg.result())) (the pipeline's finalize halves)

A strategy's weighting is a pipeline stage (:meth:`Strategy.stages`): clients send weighted
deltas, the :class:`SumAggregator` sums them plainly, the weighting stage's finalize divides
by the total weight.

:class:`ServerState` is a frozen value: the global vector, the number of completed rounds
and named optimizer tensors (momentum, Adam moments, SCAFFOLD's control variate). It
round-trips through :meth:`ServerState.to_tensors` for checkpoints.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, ClassVar

import torch

from fedloom.core.errors import ConfigError, StrategyError
from fedloom.core.seeding import derive_seed
from fedloom.core.types import Aggregate, ClientInstruction, ClientUpdate, Partial, TrainConfig
from fedloom.pipeline.base import Stage
from fedloom.pipeline.weighting import ExampleWeighting
from fedloom.strategies._checks import check_real, set_fields, state_tensor
from fedloom.strategies.optimizers import SGD, ServerOptimizer
from fedloom.strategies.selection import ClientSampler, SamplingName

__all__ = [
    "Aggregator",
    "BufferingAggregator",
    "ServerState",
    "Strategy",
    "SumAggregator",
]


@dataclass(frozen=True)
class ServerState:
    """Explicit, checkpointable server state.

    ``round`` counts completed rounds; ``params`` is the global flat vector; ``tensors``
    holds the server optimizer's and the pipeline stages' named tensor state (empty for plain
    FedAvg); ``meta`` their state that is not a tensor (an accountant's history, a stage's
    settings), JSON-serializable, saved in a checkpoint's metadata (:meth:`meta_json`).
    """

    params: torch.Tensor
    round: int = 0
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def meta_json(self) -> str:
        """``meta`` as JSON text (raises :class:`StrategyError` if it is not JSON-serializable)."""
        try:
            return json.dumps(dict(self.meta), sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StrategyError(f"server state meta is not JSON-serializable: {exc}") from None

    def with_meta_json(self, text: str | None) -> ServerState:
        """This state with ``meta`` read from :meth:`meta_json`'s text (None or empty: no meta)."""
        if not text:
            return replace(self, meta={})
        try:
            meta = json.loads(text)
        except ValueError as exc:
            raise StrategyError(f"server state meta is not valid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise StrategyError("server state meta must be a JSON object")
        return replace(self, meta=meta)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping (for safetensors); ``round`` is stored as a tensor too."""
        out = {"params": self.params, "round": torch.tensor([self.round], dtype=torch.int64)}
        out.update({f"state.{k}": v for k, v in self.tensors.items()})
        return {k: v.detach().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, data: Mapping[str, torch.Tensor]) -> ServerState:
        try:
            params, rnd = data["params"], int(data["round"].item())
        except KeyError as exc:
            raise StrategyError(f"checkpoint lacks {exc.args[0]!r}") from None
        tensors = {k[len("state.") :]: v for k, v in data.items() if k.startswith("state.")}
        return cls(params=params, round=rnd, tensors=tensors)


class Aggregator(ABC):
    """Consumes client updates one at a time (``add``), then yields an :class:`Aggregate`.

    The base class tracks ids, example counts, example-weighted training metrics and the
    unweighted mean of ``extras``; subclasses decide how the deltas combine.
    """

    def __init__(self) -> None:
        self.client_ids: list[str] = []
        self._dtype: torch.dtype | None = None
        self._seen: set[str] = set()
        self.num_examples = 0
        self.client_examples: list[int] = []
        self._metric_sums: dict[str, float] = {}
        self._metric_weights: dict[str, int] = {}
        self._extra_sums: dict[str, torch.Tensor] = {}
        self._extra_counts: dict[str, int] = {}

    partial_refusal: ClassVar[str] = "it does not keep a plain sum"
    """Why this aggregator cannot emit or merge a :class:`Partial` (empty: it can)."""

    def partial(self, source: str, rnd: int, model_version: int) -> Partial:
        """What was added so far as a :class:`Partial` (for another aggregator to :meth:`merge`)."""
        if self.partial_refusal:
            raise StrategyError(f"{type(self).__name__} cannot emit a partial aggregate: {self.partial_refusal}")
        if not self.client_ids:
            raise StrategyError("no updates to emit as a partial")
        return Partial(
            source=source,
            round=rnd,
            model_version=model_version,
            delta_sum=self._partial_sum(),
            weight=float(self._weight() or 0.0),
            client_ids=tuple(self.client_ids),
            client_examples=tuple(self.client_examples),
            metric_sums=dict(self._metric_sums),
            metric_weights=dict(self._metric_weights),
            extra_sums={k: v.clone() for k, v in self._extra_sums.items()},
            extra_counts=dict(self._extra_counts),
        )

    def merge(self, partial: Partial, *, dtype: torch.dtype) -> None:
        """Fold a validated :class:`Partial` in, as if each of its updates (of ``dtype``) had been added here."""
        if self.partial_refusal:
            raise StrategyError(f"{type(self).__name__} cannot merge a partial aggregate: {self.partial_refusal}")
        dup = self._seen.intersection(partial.client_ids)
        if dup:
            raise StrategyError(f"partial from {partial.source!r} repeats client(s) {sorted(dup)}")
        self._merge(partial)
        if self._dtype is None:
            self._dtype = dtype
        self.client_ids.extend(partial.client_ids)
        self._seen.update(partial.client_ids)
        self.num_examples += partial.num_examples
        self.client_examples.extend(partial.client_examples)
        for k, v in partial.metric_sums.items():
            self._metric_sums[k] = self._metric_sums.get(k, 0.0) + float(v)
            self._metric_weights[k] = self._metric_weights.get(k, 0) + partial.metric_weights[k]
        for k, t in partial.extra_sums.items():
            acc = self._extra_sums.get(k)
            self._extra_sums[k] = t.to(torch.float64, copy=True) if acc is None else acc.add_(t.to(torch.float64))
            self._extra_counts[k] = self._extra_counts.get(k, 0) + partial.extra_counts[k]

    def _partial_sum(self) -> torch.Tensor:
        raise NotImplementedError

    def _merge(self, partial: Partial) -> None:
        raise NotImplementedError

    def add(self, update: ClientUpdate) -> None:
        """Fold one (already validated) update into the aggregate."""
        if update.client_id in self._seen:
            raise StrategyError(f"duplicate update from client {update.client_id!r}")
        self._add(update)
        if self._dtype is None and update.delta is not None:
            self._dtype = update.delta.dtype
        self.client_ids.append(update.client_id)
        self._seen.add(update.client_id)
        self.num_examples += update.num_examples
        self.client_examples.append(update.num_examples)
        for k, v in update.metrics.items():
            self._metric_sums[k] = self._metric_sums.get(k, 0.0) + float(v) * update.num_examples
            self._metric_weights[k] = self._metric_weights.get(k, 0) + update.num_examples
        for k, t in update.extras.items():
            acc = self._extra_sums.get(k)
            # copy=True: a float64 extra must not alias (and then be mutated as) the accumulator
            self._extra_sums[k] = t.to(torch.float64, copy=True) if acc is None else acc.add_(t.to(torch.float64))
            self._extra_counts[k] = self._extra_counts.get(k, 0) + 1

    def result(self) -> Aggregate:
        """The aggregate of everything added so far."""
        if not self.client_ids:
            raise StrategyError("no updates to aggregate")
        delta = self._result()
        dtype = self._dtype or delta.dtype
        extras = {k: (s / self._extra_counts[k]).to(dtype) for k, s in self._extra_sums.items()}
        metrics = {k: s / self._metric_weights[k] for k, s in self._metric_sums.items()}
        return Aggregate(
            delta=delta,
            num_clients=len(self.client_ids),
            num_examples=self.num_examples,
            extras=extras,
            metrics=metrics,
            client_ids=tuple(self.client_ids),
            weight=self._weight(),
            client_examples=tuple(self.client_examples),
        )

    @abstractmethod
    def _add(self, update: ClientUpdate) -> None: ...

    @abstractmethod
    def _result(self) -> torch.Tensor: ...

    def _weight(self) -> float | None:
        """The total weight of a sum (None: the result is final, no weighting stage divides it)."""
        return None


class SumAggregator(Aggregator):
    """Streaming plain sum Σ Δ_i (float64, O(model) memory) and the total weight Σ w_i.

    The weights are the ones a weighting stage applied on the client (``update.weight``; an
    update without one counts 1), so the deltas arrive already weighted and the sum is the
    plain sum secure aggregation and DP need; the weighting stage's finalize divides by the
    total (FedAvg's Σ n_i Δ_i / Σ n_i, McMahan et al. 2017). Accumulating in float64 makes
    the order of arrival matter only at float64 rounding.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sum: torch.Tensor | None = None
        self.total_weight = 0.0

    partial_refusal = ""

    def _partial_sum(self) -> torch.Tensor:
        assert self._sum is not None
        return self._sum.clone()

    def _merge(self, partial: Partial) -> None:
        if self._sum is None:
            self._sum = partial.delta_sum.to(torch.float64, copy=True)
        else:
            self._sum.add_(partial.delta_sum)
        self.total_weight += float(partial.weight)

    def _add(self, update: ClientUpdate) -> None:
        w = 1.0 if update.weight is None else float(update.weight)
        if not (w >= 0.0 and w < float("inf")):
            raise StrategyError(f"weight of client {update.client_id!r} is {w!r}")
        d = update.delta
        assert d is not None  # validated updates are dense
        if self._sum is None:
            self._sum = d.to(torch.float64, copy=True)
        else:
            self._sum.add_(d)  # float64 += d: each entry widened exactly inside the kernel, no model-sized temporary
        self.total_weight += w

    def _result(self) -> torch.Tensor:
        assert self._sum is not None
        return self._sum.clone()

    def _weight(self) -> float | None:
        return self.total_weight


class BufferingAggregator(Aggregator):
    """Keeps every delta (O(clients x model)); for robust rules such as median or Krum."""

    partial_refusal = "a robust rule needs every client's update, which a partial sum no longer holds"

    def __init__(self) -> None:
        super().__init__()
        self.deltas: list[torch.Tensor] = []
        self.weights: list[int] = []

    def _add(self, update: ClientUpdate) -> None:
        self.deltas.append(update.delta)
        self.weights.append(update.num_examples)

    def stacked(self) -> torch.Tensor:
        """The buffered deltas as a (clients, numel) matrix."""
        return torch.stack(self.deltas)


@dataclass(frozen=True, kw_only=True)
class Strategy:
    """Base of all strategies: FedAvg's selection, client configs, aggregation and server step.

    A frozen, keyword-only dataclass of the settings every strategy shares: ``train`` (the
    clients' :class:`TrainConfig`), ``fraction``, ``min_clients`` and ``seed`` (client
    selection, :class:`ClientSampler`, with ``sampling`` ``fixed`` or ``poisson``), ``server_lr`` (η in the server step) and
    ``server_optimizer`` (how the aggregate becomes the next global vector: plain
    :class:`~fedloom.strategies.optimizers.SGD`, ``x ← x + η · Δ``, by default). A subclass
    declares only its own fields, checks them in ``__post_init__`` (after
    ``super().__post_init__()``) and overrides the hook that makes it different. Nothing is
    kept on the object between rounds: all that changes lives in :class:`ServerState`.
    """

    name: ClassVar[str] = "strategy"
    update_extras: ClassVar[tuple[str, ...]] = ()
    """Names of the per-client vectors besides the delta this strategy's clients send (SCAFFOLD's)."""
    synchronous_only: ClassVar[str] = ""
    """Why this strategy cannot run buffered (asynchronous) rounds; empty: it can."""

    train: TrainConfig = field(default_factory=TrainConfig)
    fraction: float = 0.1
    min_clients: int = 1
    seed: int = 0
    sampling: SamplingName = "fixed"
    server_lr: float = 1.0
    server_optimizer: ServerOptimizer = field(default_factory=SGD, metadata={"param": False})

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"must be a TrainConfig, got {type(self.train).__name__}", key="strategy.train")
        _ = self.sampler  # checks fraction, min_clients and seed
        set_fields(self, server_lr=check_real(self.server_lr, key="server_lr", low=0.0, low_open=True))
        own = self._own_optimizer()
        if own is not None:
            set_fields(self, server_optimizer=own)
        elif not isinstance(self.server_optimizer, ServerOptimizer):
            got = type(self.server_optimizer).__name__
            raise ConfigError(f"must be a ServerOptimizer, got {got}", key="strategy.server_optimizer")

    @property
    def sampler(self) -> ClientSampler:
        """The client sampler of ``fraction``, ``min_clients`` and ``seed``."""
        return ClientSampler(fraction=self.fraction, min_clients=self.min_clients, seed=self.seed, mode=self.sampling)

    def _own_optimizer(self) -> ServerOptimizer | None:
        """The server optimizer a subclass derives from its own fields (FedAvgM, FedAdam, ...).

        Such a subclass also redeclares ``server_optimizer`` with ``init=False``; None (the
        default) keeps the ``server_optimizer`` field as given.
        """
        return None

    # ------------------------------------------------------------------ hooks
    def init(self, params: torch.Tensor) -> ServerState:
        """Initial server state around the initial global vector (and the optimizer's tensors)."""
        p = params.detach().clone()
        return ServerState(params=p, round=0, tensors=self.server_optimizer.init(p))

    def select(self, rnd: int, available: Sequence[str]) -> list[str]:
        """The cohort of round ``rnd`` among ``available`` client ids."""
        return self.sampler.sample(rnd, available)

    def client_config(self, state: ServerState, rnd: int, client_id: str) -> ClientInstruction:
        """What client ``client_id`` receives in round ``rnd`` (besides the global vector)."""
        return ClientInstruction(
            round=rnd,
            client_id=client_id,
            train=self.train,
            seed=derive_seed(self.seed, "client", rnd, client_id),
        )

    def stages(self) -> tuple[Stage, ...]:
        """The pipeline stages this strategy needs before the run's own: its weighting.

        The default weights by example counts (FedAvg); robust rules, which must see raw
        deltas, return none.
        """
        return (ExampleWeighting(),)

    def aggregator(self, state: ServerState, rnd: int) -> Aggregator:
        """A fresh aggregator for round ``rnd`` (the default: a streaming sum)."""
        return SumAggregator()

    def apply(self, state: ServerState, aggregate: Aggregate) -> ServerState:
        """The next server state given this round's aggregate: one server-optimizer step."""
        return self._step(state, aggregate.delta)

    # ---------------------------------------------------------------- helpers
    def _step(self, state: ServerState, delta: torch.Tensor, **tensors: torch.Tensor) -> ServerState:
        """``state`` after one ``server_optimizer`` step with ``delta`` (η = ``server_lr``).

        ``tensors`` are further state tensors of the strategy's own (SCAFFOLD's control variate);
        every other tensor in ``state`` is carried over.
        """
        opt = self.server_optimizer
        who = type(self).__name__
        current = {k: state_tensor(state.tensors, k, state.params, strategy=who) for k in opt.state_keys}
        params, updated = opt.step(state.params, delta, current, lr=self.server_lr)
        merged = dict(state.tensors)
        merged.update(updated)
        merged.update(tensors)
        return replace(state, params=params, round=state.round + 1, tensors=merged)
