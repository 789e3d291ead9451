"""Contract keys: names shared by the two sides of a round, defined once.

A client and the server must spell these the same way, whether they run in one process
(simulation) or talk over the wire (deployment), so nothing else spells them.

SCAFFOLD (Karimireddy et al. 2020):

* :data:`SERVER_CONTROL` — instruction payload key of the server control variate c;
* :data:`CLIENT_CONTROL` — client-state key of a client's own control variate c_i;
* :data:`CONTROL_DELTA` — update extras key of a client's control-variate change Δc_i.

Gradient transforms (:mod:`fedloom.client.transforms`), named in instructions:
:data:`PROXIMAL` (FedProx), :data:`SCAFFOLD`, :data:`PRUNE` (magnitude pruning's mask, whose
bits travel in the instruction payload under :data:`PRUNE_MASK`), :data:`FEDDYN` (FedDyn's
regularizer, whose client keeps its g_i as client state under :data:`FEDDYN_GRAD`),
:data:`PERSONAL` (personal layers, FedPer: kept as client state under :data:`PERSONAL_PARAMS`),
:data:`DITTO` (Ditto's personal run, whose model v_k is client state under :data:`DITTO_MODEL`).

Tensor names on the wire (:mod:`fedloom.transport.codec`):

* :data:`PARAMS` — the dense global vector sent down; :data:`DELTA` — the dense delta sent up;
* :data:`PAYLOAD_PREFIX` + key — an instruction's payload tensors, and an update's encoded
  :class:`~fedloom.core.types.Payload` tensors;
* :data:`EXTRAS_PREFIX` + key — an update's extras;
* :data:`BROADCAST_PREFIX` + name — the tensors of an encoded broadcast (the global model
  as a :class:`~fedloom.core.types.Payload`, sent instead of :data:`PARAMS`);
* :data:`PROTOCOL_PREFIX` + name — the tensors of a round protocol's message carried by a
  training task (secure aggregation's masked-input stage).
"""

from __future__ import annotations

__all__ = [
    "BROADCAST_PREFIX",
    "CLIENT_CONTROL",
    "CONTROL_DELTA",
    "DELTA",
    "EXTRAS_PREFIX",
    "FEDDYN",
    "FEDDYN_GRAD",
    "PARAMS",
    "PAYLOAD_PREFIX",
    "DITTO",
    "DITTO_MODEL",
    "PERSONAL",
    "PERSONAL_PARAMS",
    "PROTOCOL_PREFIX",
    "PROXIMAL",
    "PRUNE",
    "PRUNE_MASK",
    "SCAFFOLD",
    "SERVER_CONTROL",
]

SERVER_CONTROL = "server_control"
"""Payload key of the server control variate c sent to SCAFFOLD clients."""
CLIENT_CONTROL = "control"
"""Client-state key of a SCAFFOLD client's control variate c_i."""
CONTROL_DELTA = "control_delta"
"""Extras key of a SCAFFOLD client's control-variate change Δc_i."""
PROXIMAL = "proximal"
"""Gradient-transform name of FedProx's proximal term (option ``mu``)."""
SCAFFOLD = "scaffold"
"""Gradient-transform name of SCAFFOLD's control-variate correction."""
PRUNE = "prune"
"""Gradient-transform name of the pruning mask (pruned weights stay exactly zero)."""
PRUNE_MASK = "prune_mask"
"""Payload key of the keep-mask: 1 bit per entry of the flat vector, packed low bit first."""

PARAMS = "params"
"""Wire name of the dense global vector."""
DELTA = "delta"
"""Wire name of an update's dense delta."""
PAYLOAD_PREFIX = "payload/"
"""Wire-name prefix of payload tensors (an instruction's payload, an update's encoded payload)."""
EXTRAS_PREFIX = "extras/"
"""Wire-name prefix of an update's extras."""
BROADCAST_PREFIX = "broadcast/"
PROTOCOL_PREFIX = "protocol/"
"""Wire-name prefix of the tensors of an encoded broadcast payload."""

FEDDYN = "feddyn"
"""Gradient-transform name of FedDyn's dynamic regularizer (option ``alpha``)."""
FEDDYN_GRAD = "feddyn.grad"
"""Client-state key of a FedDyn client's linear-term vector g_i (the paper's ∇L_i(θ_i^{t−1}))."""
PERSONAL = "personal"
"""Gradient-transform name of personal layers (option ``layers``: comma-separated parameter-name prefixes)."""
PERSONAL_PARAMS = "personal.params"
"""Client-state key of a client's own values of its personal layers (the masked entries, in vector order)."""
DITTO = "ditto"
"""Gradient-transform name of Ditto's personal run (option ``lam``: the pull toward the global model)."""
DITTO_MODEL = "ditto.model"
"""Client-state key of a Ditto client's personal model v_k (a full vector)."""
