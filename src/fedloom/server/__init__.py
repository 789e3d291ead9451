"""The server side: the run store (records, client registry, checkpoints); later, deployment."""

from fedloom.server.store import Checkpoint, ClientInfo, RunHandle, RunInfo, Store

__all__ = ["Checkpoint", "ClientInfo", "RunHandle", "RunInfo", "Store"]
