"""An edge aggregator's process (``fedloom edge``): a client of the root and a server to its own clients.

Hierarchical FL deployed (:mod:`fedloom.federation.hierarchy`): the edge registers with the
root as a client under its own identity (its certificate, or ``--client-id`` in insecure
mode) and serves its roster's clients on its own gRPC server (its own server certificate;
clients outside the roster are refused at registration). For each training task from the
root it runs :meth:`~fedloom.federation.loop.Federation.edge_round` — the same code the
simulation runs for each edge — over its clients, and answers with one
:class:`~fedloom.core.types.Partial` (kind ``partial``). When the root ends the run, the edge
tells its clients and stops.

Federated evaluation through edges is not supported yet: an evaluation task is answered with
a failure that says so.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from fedloom.agent import AgentOptions, ClientAgent
from fedloom.agent.agent import AgentError, AgentReport
from fedloom.core.config import RunConfig
from fedloom.core.errors import ConfigError
from fedloom.run import Run, build_run
from fedloom.transport import codec
from fedloom.transport.protocol import EVALUATE, FAILURE, PARTIAL, PROTOCOL
from fedloom.transport.wire import Message

__all__ = ["EdgeAgent", "edge_config", "run_edge"]

log = logging.getLogger("fedloom.edge")


class EdgeAgent(ClientAgent):
    """The root-facing side of an edge: answers training tasks with its clients' partial."""

    def __init__(self, run: Run, edge: str, options: AgentOptions) -> None:
        super().__init__(None, options)
        if self.client_id != edge:
            raise AgentError(f"this edge is {edge!r} but its identity is {self.client_id!r}")
        h = run.federation.hierarchy
        assert h is not None
        self.run_ = run
        self.edge = edge
        self.roster = h.edges[edge]

    def _registration_counts(self) -> tuple[int, int]:
        return 1, 0  # an edge trains on no data of its own; its partials carry its clients' counts

    def _work(self, msg: Message) -> tuple[str, dict[str, Any], dict[str, Any]]:
        if msg.kind == EVALUATE:
            return FAILURE, codec.encode_failure(f"edge {self.edge!r}: federated evaluation through edges is not supported"), {}
        if msg.kind == PROTOCOL:
            return FAILURE, codec.encode_failure(f"edge {self.edge!r}: no round protocol runs through edges"), {}
        task = codec.decode_instruction(msg.meta, msg.tensors)
        ins = replace(task.instruction, client_id=self.edge)
        params = task.params if task.broadcast is None else self._received(task.broadcast, ins.round)
        fed = self.run_.federation
        fed.spec.check_vector(params)
        part = fed.edge_round(params, ins, self.roster)
        if part is None:
            raise AgentError(f"edge {self.edge!r}: none of its clients answered round {ins.round}")
        self.report.tasks += 1
        log.info("round %d: edge %r forwards the partial of %d client(s)", ins.round, self.edge, len(part.client_ids))
        meta, tensors = codec.encode_partial(part)
        return PARTIAL, meta, tensors


def edge_config(
    cfg: RunConfig,
    edge: str,
    *,
    listen: str,
    credentials: str | None = None,
    insecure: bool = False,
    min_clients: int | None = None,
) -> RunConfig:
    """``cfg`` as edge ``edge`` runs it: its own server on ``listen`` for its roster, no run store."""
    if cfg.hierarchy is None or not isinstance(cfg.hierarchy.edges, dict) or edge not in cfg.hierarchy.edges:
        raise ConfigError(f"{edge!r} is not an edge named in [hierarchy] edges", key="hierarchy.edges")
    roster = cfg.hierarchy.edges[edge]
    deploy = cfg.deploy.model_copy(
        update={
            "address": listen,
            "credentials": credentials,
            "insecure": insecure,
            "min_clients": min_clients if min_clients is not None else len(roster),
            "client_max_examples": {},
        }
    )
    return cfg.model_copy(update={"deploy": deploy, "run": cfg.run.model_copy(update={"store": None})})


def run_edge(cfg: RunConfig, edge: str, options: AgentOptions, *, listen: str, credentials: str | None = None,
             insecure: bool = False, min_clients: int | None = None) -> AgentReport:  # fmt: skip
    """Serve edge ``edge`` until the root ends the run; then tell its clients and stop its server."""
    run = build_run(
        edge_config(cfg, edge, listen=listen, credentials=credentials, insecure=insecure, min_clients=min_clients),
        engine="remote",
        edge=edge,
    )
    try:
        return EdgeAgent(run, edge, options).run()
    finally:
        run.engine.close()
