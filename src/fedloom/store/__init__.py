"""The run store: SQLite records of runs, rounds and clients, and safetensors checkpoints.

Used by every run with ``run.store`` set (simulated or deployed) and by ``fedloom runs``;
it knows nothing of gRPC. :mod:`~fedloom.store.sqlite` holds the :class:`Store`,
:mod:`~fedloom.store.checkpoint` the checkpoint file format and durable writes.
"""

from fedloom.store.checkpoint import CHECKPOINT_FORMAT, Checkpoint
from fedloom.store.sqlite import SCHEMA_VERSION, CheckpointInfo, ClientInfo, RunHandle, RunInfo, Store, config_hash

__all__ = [
    "CHECKPOINT_FORMAT",
    "SCHEMA_VERSION",
    "Checkpoint",
    "CheckpointInfo",
    "ClientInfo",
    "RunHandle",
    "RunInfo",
    "Store",
    "config_hash",
]
