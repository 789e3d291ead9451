"""Secure aggregation: the server learns the sum of the cohort's updates, not any one of them.

:mod:`~fedloom.secure.secagg` holds SecAgg / SecAgg+ as client and server state machines,
built on :mod:`~fedloom.secure.crypto` (X25519, HKDF, AES-GCM, an AES-CTR PRG),
:mod:`~fedloom.secure.shamir` (t-of-n sharing), :mod:`~fedloom.secure.encoding`
(clipping and stochastic quantization to Z_{2^k}) and :mod:`~fedloom.secure.graph` (the
SecAgg+ communication graph). :mod:`~fedloom.secure.host` runs the client side for
in-process clients (the simulation engines), with simulated dropouts.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SecAggClient", "SecAggConfig", "SecAggServer"]


def __getattr__(name: str) -> Any:  # the protocol (and cryptography) load on first use
    if name in __all__:
        from fedloom.secure import secagg

        return getattr(secagg, name)
    raise AttributeError(name)
