"""Hierarchical FL (HierFAVG, Liu et al. 2020): edge aggregators between the clients and the root.

Clients are grouped into edges. Each root round, every edge runs ``kappa`` edge rounds with
its own clients — select a cohort among them (the strategy's sampling), train it from the
edge's model, average (the edge's FedAvg step) — and then forwards one
:class:`~fedloom.core.types.Partial` to the root: for ``kappa`` = 1 the plain sum of its
clients' weighted deltas and their total weight (so any grouping gives exactly flat FedAvg,
up to float64 rounding), for ``kappa`` > 1 the edge's model change times its mean per-round
weight. The root merges the partials and applies them as one aggregate.

The same :meth:`~fedloom.federation.loop.Federation.edge_round` runs in simulation (the
root's loop calls it for each edge on the simulation engine) and in a deployment (an edge
process, ``fedloom edge``, is a client of the root and runs it over its own gRPC server and
clients), so a deployed two-level run equals its simulation. Rules that need every update
(median, Krum, centered clipping) cannot merge partials and refuse to run hierarchically.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from fedloom.core.errors import ConfigError, InvalidUpdateError, StrategyError
from fedloom.core.seeding import derive_seed
from fedloom.core.types import ClientInstruction, Partial, tensor_bytes
from fedloom.federation.attempt import Attempt
from fedloom.pipeline import Pipeline
from fedloom.strategies.base import Strategy

if TYPE_CHECKING:
    from fedloom.federation.loop import Federation

__all__ = ["HierarchicalRounds", "Hierarchy", "edges_of"]

log = logging.getLogger("fedloom.federation")


@dataclass(frozen=True)
class Hierarchy:
    """Edge id -> its clients (its roster), and ``kappa`` edge rounds per root round."""

    edges: Mapping[str, tuple[str, ...]]
    kappa: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.kappa, bool) or not isinstance(self.kappa, int) or self.kappa < 1:
            raise ConfigError(f"must be an integer >= 1, got {self.kappa!r}", key="hierarchy.kappa")
        if not self.edges:
            raise ConfigError("needs at least one edge", key="hierarchy.edges")
        seen: dict[str, str] = {}
        for edge, roster in self.edges.items():
            if not roster:
                raise ConfigError(f"edge {edge!r} has no clients", key="hierarchy.edges")
            for cid in roster:
                if cid in seen:
                    raise ConfigError(f"client {cid!r} is in edges {seen[cid]!r} and {edge!r}", key="hierarchy.edges")
                seen[cid] = edge
        object.__setattr__(self, "edges", MappingProxyType({e: tuple(r) for e, r in sorted(self.edges.items())}))

    def edge_of(self, client_id: str) -> str | None:
        for edge, roster in self.edges.items():
            if client_id in roster:
                return edge
        return None


def edges_of(spec: int | Mapping[str, Sequence[str]], clients: Sequence[str] | None, kappa: int = 1) -> Hierarchy:
    """The hierarchy ``[hierarchy] edges`` describes: a number of edges (contiguous groups of the
    sorted client ids, named ``edge-0``, ``edge-1``, ...) or an explicit edge -> clients table.

    ``clients`` (the population, when known: in simulation) must each be in exactly one edge.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        if clients is None:
            raise ConfigError("a deployment names each edge's clients: edges = { edge-id = [client ids] }", key="hierarchy.edges")
        ids = sorted(clients)
        if not 1 <= spec <= len(ids):
            raise ConfigError(f"must be between 1 and the {len(ids)} clients, got {spec}", key="hierarchy.edges")
        size, extra = divmod(len(ids), spec)
        table: dict[str, tuple[str, ...]] = {}
        start = 0
        for i in range(spec):
            end = start + size + (1 if i < extra else 0)
            table[f"edge-{i}"] = tuple(ids[start:end])
            start = end
        return Hierarchy(table, kappa)
    h = Hierarchy({str(e): tuple(str(c) for c in r) for e, r in spec.items()}, kappa)
    if clients is not None:
        known = set(clients)
        grouped = {c for r in h.edges.values() for c in r}
        unknown = sorted(grouped - known)
        if unknown:
            raise ConfigError(f"unknown client(s) {unknown[:5]}", key="hierarchy.edges")
        left = sorted(known - grouped)
        if left:
            raise ConfigError(f"client(s) {left[:5]} belong to no edge", key="hierarchy.edges")
    return h


class HierarchicalRounds:
    """The round loop's hierarchical closing (a mixin of :class:`~fedloom.federation.loop.Federation`)."""

    @staticmethod
    def _check_hierarchy(h: Hierarchy, strategy: Strategy, *, secure: Any, buffer: Any, adversary: Any) -> None:
        probe = strategy.aggregator(strategy.init(torch.zeros(1)), 1)
        if probe.partial_refusal:
            raise ConfigError(
                f"strategy {strategy.name!r} cannot run hierarchically: {probe.partial_refusal}", key="hierarchy"
            )
        if secure is not None:
            raise ConfigError("hierarchical rounds cannot run under secure aggregation: edges would see their clients' sums", key="hierarchy")
        if buffer is not None:
            raise ConfigError("choose one of [buffer] and [hierarchy]", key="hierarchy")
        if adversary is not None:
            raise ConfigError("attacks run on flat rounds; remove [hierarchy] or [attack]", key="hierarchy")
        if h.kappa > 1 and (strategy.update_extras or strategy.synchronous_only):
            raise ConfigError(
                f"strategy {strategy.name!r} keeps per-round server state its edges would not see; it needs kappa = 1",
                key="hierarchy.kappa",
            )

    def _attempt_hierarchical(self: Federation, rnd: int, attempt: int, rejected: dict[str, str], pipe: Pipeline) -> Attempt:
        """One root round: every edge returns a partial (its clients' sum, or ``kappa`` edge rounds' progress)."""
        h = self.hierarchy
        assert h is not None
        live = self.engine.live
        available = self.engine.available_clients()
        edges = sorted(set(available) & set(h.edges)) if live else list(h.edges)
        instructions = self._instructions(rnd, edges, pipe)
        ctx = self._ctx(rnd)
        sent = pipe.broadcast(self.state.params, ctx, derive_seed(self.strategy.seed, "broadcast", rnd))
        bytes_down = sum(sent.nbytes + sum(tensor_bytes(t) for t in ins.payload.values()) for ins in instructions)
        aggregator = self.strategy.aggregator(self.state, rnd)
        accepted: list[str] = []
        merged = 0
        bytes_up = 0
        if live:  # each edge is a process of its own: its partial comes back as its result
            extra = {} if sent.payload is None else {"broadcast": sent.payload}
            stream: Iterator[Any] = self.engine.run_cohort(sent.vector, instructions, **extra)
        else:
            stream = (self.edge_round(sent.vector, ins, h.edges[ins.client_id], pipe, rejected) for ins in instructions)
        expected = set(edges)
        try:
            for part in stream:
                if part is None:
                    continue
                bytes_up += part.nbytes
                source = getattr(part, "source", getattr(part, "client_id", "?"))
                try:
                    self._check_partial(part, expected, rnd)
                    aggregator.merge(part, dtype=self.state.params.dtype)
                except (InvalidUpdateError, StrategyError) as exc:
                    reason = getattr(exc, "reason", str(exc))
                    rejected[source] = reason
                    log.warning("round %d: rejected the partial of edge %r: %s", rnd, source, reason)
                    continue
                expected.discard(part.source)
                accepted.extend(part.client_ids)
                merged += 1
        finally:
            self._end_stream(stream, rejected)
        return Attempt(
            aggregator if merged else None, accepted, bytes_down, bytes_up, len(set(available)),
            dispatched=edges, metrics={"edges": float(merged)},
        )  # fmt: skip

    def _check_partial(self: Federation, part: Any, expected: set[str], rnd: int) -> None:
        """A partial from an edge of this round, for this round's model, from its own clients; else InvalidUpdateError."""
        from fedloom.core.types import Partial

        if not isinstance(part, Partial):
            raise InvalidUpdateError("a hierarchical round takes a partial aggregate from each edge, got a client update", client_id=getattr(part, "client_id", "?"))
        src = part.source
        if src not in expected:
            raise InvalidUpdateError("not an edge of this round (or it already answered)", client_id=src)
        if part.round != rnd:
            raise InvalidUpdateError(f"partial is for round {part.round}, not {rnd}", client_id=src)
        if part.model_version != self.state.round:
            raise InvalidUpdateError(f"partial starts from model version {part.model_version}, not {self.state.round}", client_id=src)
        part.validate(numel=self.spec.numel)
        assert self.hierarchy is not None
        roster = set(self.hierarchy.edges.get(src, ()))
        strangers = [c for c in part.client_ids if c not in roster]
        if strangers:
            raise InvalidUpdateError(f"client(s) {strangers[:3]} are not in edge {src!r}'s roster", client_id=src)
        if self.max_examples is not None and max(part.client_examples) > self.max_examples:
            raise InvalidUpdateError(f"a client declares more than the limit of {self.max_examples} examples", client_id=src)

    def edge_round(
        self: Federation,
        params: torch.Tensor,
        edge: ClientInstruction,
        roster: Sequence[str],
        pipe: Pipeline | None = None,
        rejected: dict[str, str] | None = None,
    ) -> Partial | None:
        """An edge's share of root round ``edge.round``: ``kappa`` edge rounds with its clients, as one partial.

        Each edge round selects a cohort among the roster's available clients (the strategy's
        sampling; edge round k > 0 draws with salt k), instructs them as the root instructed the
        edge (its own seed per client) and checks and sums their updates; with ``kappa`` > 1 the
        edge moves its model by each round's weighted mean. None if no client answered.
        """
        h = self.hierarchy
        kappa = h.kappa if h is not None else 1
        pipe = pipe if pipe is not None else self.pipeline.for_round(self.state.tensors, self.state.meta)
        rejected = rejected if rejected is not None else {}
        rnd, version = edge.round, edge.model_version
        assert version is not None
        ctx = self._ctx(rnd)
        members = set(roster)
        clients = sorted(c for c in self.engine.available_clients() if c in members)
        x = params
        parts = []
        for k in range(kappa):
            if k == 0:
                cohort = self.strategy.select(rnd, clients) if clients else []
            else:
                cohort = self.strategy.sampler.draw(rnd, clients, self.strategy.sampler.cohort_size(len(clients)), salt=k)
            if not cohort:
                continue
            seed = (lambda cid: derive_seed(self.strategy.seed, "client", rnd, cid)) if k == 0 else (
                lambda cid: derive_seed(self.strategy.seed, "client", rnd, cid, "edge-round", k)
            )  # fmt: skip
            instructions = [replace(edge, client_id=cid, seed=seed(cid)) for cid in cohort]
            aggregator = self.strategy.aggregator(self.state, rnd)
            expected = set(cohort)
            stream = self.engine.run_cohort(x, instructions)
            try:
                for update in stream:
                    check = lambda u=update: self._check(u, expected, rnd, ctx, pipe)  # noqa: E731
                    if self._fold(aggregator, update.client_id, rnd, rejected, check, at=f"edge {edge.client_id!r}"):
                        expected.discard(update.client_id)
            finally:
                self._end_stream(stream, rejected)
            if not aggregator.client_ids:
                continue
            part = aggregator.partial(edge.client_id, rnd, version)
            if kappa == 1:
                return part
            parts.append(part)
            if part.weight > 0:  # the edge's FedAvg step
                x = x + (part.delta_sum / part.weight).to(x.dtype)
        if not parts:
            return None
        weight = sum(p.weight for p in parts) / len(parts)
        examples: dict[str, int] = {}
        metric_sums: dict[str, float] = {}
        metric_weights: dict[str, int] = {}
        for p in parts:
            examples.update(zip(p.client_ids, p.client_examples, strict=True))
            for key, v in p.metric_sums.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + v
                metric_weights[key] = metric_weights.get(key, 0) + p.metric_weights[key]
        return Partial(
            source=edge.client_id,
            round=rnd,
            model_version=version,
            delta_sum=(x.to(torch.float64) - params.to(torch.float64)) * weight,
            weight=weight,
            client_ids=tuple(examples),
            client_examples=tuple(examples.values()),
            metric_sums=metric_sums,
            metric_weights=metric_weights,
        )
