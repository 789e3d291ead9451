"""Engines: where client work runs. Every engine yields the same ClientUpdates for the same inputs.

``sequential``, ``vectorized`` and ``ray`` simulate the clients; ``remote``
(:class:`~fedloom.engines.remote.RemoteEngine`) dispatches them to real client processes
through the :class:`~fedloom.engines.coordinator.Coordinator`. The remote engine needs the
transport (gRPC, protobuf), so it is exported lazily: ``import fedloom.engines`` stays free
of them.
"""

from typing import TYPE_CHECKING, Any

from fedloom.engines.base import ClientStateStore, Engine
from fedloom.engines.coordinator import Coordinator
from fedloom.engines.ray import RayEngine
from fedloom.engines.sequential import SequentialEngine
from fedloom.engines.vectorized import VectorizedEngine

if TYPE_CHECKING:
    from fedloom.engines.remote import RemoteEngine

__all__ = ["ClientStateStore", "Coordinator", "Engine", "RayEngine", "RemoteEngine", "SequentialEngine", "VectorizedEngine"]


def __getattr__(name: str) -> Any:
    if name == "RemoteEngine":
        from fedloom.engines.remote import RemoteEngine

        return RemoteEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
