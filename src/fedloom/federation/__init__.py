"""The round loop that drives a Strategy over an Engine, and the per-round history."""

from fedloom.core.history import History, RoundRecord
from fedloom.federation.loop import Federation

__all__ = ["Federation", "History", "RoundRecord"]
