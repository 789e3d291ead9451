"""The server side: deployment over gRPC (service, coordinator, remote engine, client agent,
certificates) and the run store (records, client registry, checkpoints)."""

from fedloom.server.agent import AgentOptions, AgentReport, ClientAgent
from fedloom.server.coordinator import Coordinator
from fedloom.server.deploy import start_remote_engine
from fedloom.server.remote import RemoteEngine
from fedloom.server.sitedata import load_site_data
from fedloom.store import Checkpoint, ClientInfo, RunHandle, RunInfo, Store

__all__ = [
    "AgentOptions",
    "AgentReport",
    "Checkpoint",
    "ClientAgent",
    "ClientInfo",
    "Coordinator",
    "RemoteEngine",
    "RunHandle",
    "RunInfo",
    "Store",
    "load_site_data",
    "start_remote_engine",
]
