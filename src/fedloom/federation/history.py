"""Per-round history of a run; it lives in :mod:`fedloom.core.history` (the store reads it too)."""

from fedloom.core.history import History, RoundRecord

__all__ = ["History", "RoundRecord"]
