"""The update pipeline: stages between local training and the global model (DESIGN.md).

:class:`Stage` (client, server and finalize halves), :class:`ClientBatch` (k clients'
updates as one matrix), :class:`Pipeline` (a run's stages and the broadcast stage), the
weighting stages, and the stage registry.
"""

from fedloom.pipeline.base import ClientBatch, Stage, StageContext, StageState
from fedloom.pipeline.pipeline import Broadcast, Pipeline, client_stages, finish_clients, run_client_stages
from fedloom.pipeline.registry import STAGES, build_stage, list_stages
from fedloom.pipeline.weighting import ExampleWeighting, UniformWeighting, WeightingStage

__all__ = [
    "STAGES",
    "Broadcast",
    "ClientBatch",
    "ExampleWeighting",
    "Pipeline",
    "Stage",
    "StageContext",
    "StageState",
    "UniformWeighting",
    "WeightingStage",
    "build_stage",
    "client_stages",
    "finish_clients",
    "list_stages",
    "run_client_stages",
]
