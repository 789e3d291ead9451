"""Contract keys: payload, extras and client-state names shared by client and server, defined once."""

from __future__ import annotations

__all__ = ["CLIENT_CONTROL", "CONTROL_DELTA", "PROXIMAL", "SCAFFOLD", "SERVER_CONTROL"]

SERVER_CONTROL = "server_control"
"""Instruction payload: SCAFFOLD's server control variate c."""
CLIENT_CONTROL = "control"
"""Client state: SCAFFOLD's client control variate c_i."""
CONTROL_DELTA = "control_delta"
"""Update extras: SCAFFOLD's Δc_i = c_i⁺ − c_i."""
PROXIMAL = "proximal"
"""Gradient transform: FedProx's proximal term (option ``mu``)."""
SCAFFOLD = "scaffold"
"""Gradient transform: SCAFFOLD's control-variate correction."""
