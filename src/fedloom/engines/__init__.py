"""Engines: where client work runs. Every engine yields the same ClientUpdates for the same inputs."""

from fedloom.engines.base import ClientStateStore, Engine
from fedloom.engines.ray import RayEngine
from fedloom.engines.sequential import SequentialEngine
from fedloom.engines.vectorized import VectorizedEngine

__all__ = ["ClientStateStore", "Engine", "RayEngine", "SequentialEngine", "VectorizedEngine"]
