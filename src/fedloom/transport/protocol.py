"""What both ends of a connection agree on: message kinds, gRPC channel options, the model layout.

A server and a client of the same fedloom version exchange ``fedloom.v1.Fleet`` messages
(``proto/fedloom.proto``) whose header names a kind:

* server to client: :data:`TASK` (train), :data:`EVALUATE` (federated evaluation),
  :data:`PROTOCOL` (one stage of a round protocol: secure aggregation's key setup, shares,
  unmasking), :data:`IDLE` (nothing yet, pull again), :data:`SHUTDOWN` (the run is over);
* client to server: :data:`UPDATE` (a training result), :data:`PARTIAL` (an edge
  aggregator's training result: its clients' partial sum, hierarchical FL), :data:`EVAL_RESULT`,
  :data:`PROTOCOL_REPLY`, :data:`FAILURE` (the client could not do the task, with a reason).

:func:`spec_digest` is sent at registration: a client that built a different model layout
stops instead of training on the wrong one.
"""

from __future__ import annotations

import hashlib

from fedloom.core.params import ParamSpec

__all__ = [
    "CLIENT_KINDS",
    "EVALUATE",
    "EVAL_RESULT",
    "FAILURE",
    "GRPC_OPTIONS",
    "IDLE",
    "PARTIAL",
    "PROTOCOL",
    "PROTOCOL_REPLY",
    "SERVER_KINDS",
    "SHUTDOWN",
    "TASK",
    "UPDATE",
    "spec_digest",
]

TASK = "task"
EVALUATE = "evaluate"
IDLE = "idle"
SHUTDOWN = "shutdown"
UPDATE = "update"
PARTIAL = "partial"
EVAL_RESULT = "eval_result"
FAILURE = "failure"
PROTOCOL = "protocol"
PROTOCOL_REPLY = "protocol_reply"

SERVER_KINDS = frozenset({TASK, EVALUATE, PROTOCOL, IDLE, SHUTDOWN})
"""Kinds a client accepts from the server."""
CLIENT_KINDS = frozenset({UPDATE, PARTIAL, EVAL_RESULT, PROTOCOL_REPLY, FAILURE})
"""Kinds the server accepts from a client."""

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.max_send_message_length", 16 << 20),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
"""gRPC channel arguments of both ends (the server adds its own flow-control settings)."""


def spec_digest(spec: ParamSpec) -> str:
    """A short digest of a model's parameter layout: client and server must agree on it."""
    return hashlib.sha256(spec.to_json().encode()).hexdigest()[:32]
