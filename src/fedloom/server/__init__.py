"""The server side of a deployment: the gRPC service, its startup, certificates.

* :mod:`~fedloom.server.service` — ``fedloom.v1.Fleet`` over mutual TLS: who may connect,
  which results are accepted; its handlers are ``grpc.aio`` coroutines;
* :mod:`~fedloom.server.aio` — the event loop thread they run on, the pool that decodes
  results, long polls that wait without a thread;
* :mod:`~fedloom.server.results` — a decoded result checked against its task;
* :mod:`~fedloom.server.limits` — what one participant may hold;
* :mod:`~fedloom.server.deploy` — :func:`start_remote_engine` from a config's ``[deploy]``;
* :mod:`~fedloom.server.certs` — the private CA, server and client certificates, revocation;
* :mod:`~fedloom.server.protogen` — regenerates ``fedloom/transport/proto``.

The remote engine and the coordinator it posts tasks to are engines
(:mod:`fedloom.engines.remote`, :mod:`fedloom.engines.coordinator`), the run store is
:mod:`fedloom.store`, the client process is :mod:`fedloom.agent`. ``Store``, ``Coordinator``
and ``RemoteEngine`` are re-exported here for earlier code.
"""

from fedloom.engines.coordinator import Coordinator
from fedloom.engines.remote import RemoteEngine
from fedloom.server.deploy import start_remote_engine
from fedloom.store import Checkpoint, ClientInfo, RunHandle, RunInfo, Store

__all__ = [
    "Checkpoint",
    "ClientInfo",
    "Coordinator",
    "RemoteEngine",
    "RunHandle",
    "RunInfo",
    "Store",
    "start_remote_engine",
]
