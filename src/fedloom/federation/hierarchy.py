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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from fedloom.core.errors import ConfigError

__all__ = ["Hierarchy", "edges_of"]


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
