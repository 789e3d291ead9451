"""The one exception hierarchy of fedloom.

Every error fedloom raises on purpose derives from :class:`FedloomError`, so callers can
catch the whole family. Errors caused by bad input also derive from ``ValueError``.
"""

from __future__ import annotations

__all__ = [
    "BudgetExhausted",
    "CertError",
    "ConfigError",
    "DataError",
    "EngineError",
    "FedloomError",
    "InvalidUpdateError",
    "PayloadError",
    "ProtocolAbort",
    "ProtocolError",
    "SpecError",
    "StoreError",
    "StrategyError",
]


class FedloomError(Exception):
    """Base class of all fedloom errors."""


class ConfigError(FedloomError, ValueError):
    """A configuration value is missing, of the wrong type or out of range.

    ``key`` names the offending dotted key (``client.lr``) where it is known.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.key = key
        self.detail = message
        super().__init__(f"{key}: {message}" if key else message)


class SpecError(FedloomError, ValueError):
    """A state_dict or flat vector does not match a :class:`~fedloom.core.params.ParamSpec`."""


class InvalidUpdateError(FedloomError, ValueError):
    """A client update was rejected (wrong shape or dtype, NaN/Inf, not in the cohort, ...).

    ``client_id`` names the client; ``reason`` is the short, loggable cause.
    """

    def __init__(self, reason: str, *, client_id: str | None = None) -> None:
        self.client_id = client_id
        self.reason = reason
        who = f"update from client {client_id!r}" if client_id is not None else "update"
        super().__init__(f"{who} rejected: {reason}")


class PayloadError(FedloomError, ValueError):
    """An encoded payload (a broadcast model) does not match the stage that should decode it."""


class StrategyError(FedloomError):
    """A strategy cannot proceed (for example: too few updates for Krum's f)."""


class DataError(FedloomError, ValueError):
    """A dataset or partition request is invalid (unknown scenario, impossible split, ...)."""


class EngineError(FedloomError):
    """An engine failed to run a cohort."""


class CertError(FedloomError):
    """A certificate or key cannot be made, read or used (missing file, bad id, wrong CA, ...)."""


class StoreError(FedloomError):
    """The run store cannot do what was asked (unreadable or newer database, config mismatch, ...)."""


class BudgetExhausted(FedloomError):
    """The next round would exceed a budget (``privacy.max_epsilon``): the run stops before it."""


class ProtocolError(FedloomError, ValueError):
    """A protocol message (secure aggregation) that is out of stage, replayed, malformed or forged."""


class ProtocolAbort(FedloomError):
    """A round's protocol cannot finish (too few clients left): the round is aborted, nothing is revealed."""
