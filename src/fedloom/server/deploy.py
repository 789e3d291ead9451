"""Start the server side of a deployment from a config's ``[deploy]`` section.

:func:`start_remote_engine` loads the server's credentials (unless ``insecure``), starts the
gRPC :class:`~fedloom.server.service.FleetService` and returns the
:class:`~fedloom.engines.remote.RemoteEngine` the round loop drives; closing the engine tells
the clients the run is over and stops the server.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from fedloom.core.config import DeploySection
from fedloom.core.errors import ConfigError
from fedloom.core.params import ParamSpec
from fedloom.data.base import TaskSpec
from fedloom.engines.coordinator import Coordinator
from fedloom.engines.remote import RemoteEngine
from fedloom.server import certs
from fedloom.server.limits import DEFAULT_MAX_LONG_POLLS, Limits
from fedloom.server.service import FleetService, RevocationList, ServiceSettings, start_server

__all__ = ["limits", "run_info", "start_remote_engine", "tune_allocator"]

log = logging.getLogger("fedloom.server")

INSECURE_WARNING = (
    "INSECURE MODE: no TLS, clients are not authenticated and updates are not signed. "
    "Anyone who can reach this port can join the run. Use it on loopback for development only."
)


def run_info(model_name: str, model_options: dict[str, Any], task: TaskSpec, *, max_message_bytes: int = 0) -> dict[str, Any]:
    """What a client needs to build the model, and the largest message it may receive: sent at registration."""
    info: dict[str, Any] = {"model": {"name": model_name, "options": model_options}, "task": dataclasses.asdict(task)}
    if max_message_bytes:
        info["max_message_bytes"] = int(max_message_bytes)
    return info


M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameters (malloc.h)


def tune_allocator() -> bool:
    """Keep the server's heap from holding on to freed transfer buffers (glibc only; True if applied).

    A round moves model-sized buffers and 256 KiB messages through a pool of threads: with
    glibc's defaults each thread may get its own arena, and freeing one large buffer raises
    the mmap threshold so later ones come from those arenas, where fragmentation keeps them
    resident. A fixed 256 KiB threshold (large buffers mmapped, returned to the OS when
    freed) and two arenas cut the server's peak RSS by about a fifth (1,389 -> 1,136 MB at
    1,000 clients and a cohort of 100, bench/deploy.py). ``MALLOC_ARENA_MAX`` /
    ``MALLOC_MMAP_THRESHOLD_`` set in the environment are respected. It changes the whole
    process's allocator, which is why only :func:`start_remote_engine` (a server) calls it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    applied = False
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        applied |= bool(mallopt(M_MMAP_THRESHOLD, 256 << 10))
    if "MALLOC_ARENA_MAX" not in os.environ:
        applied |= bool(mallopt(M_ARENA_MAX, 2))
    return applied


def limits(deploy: DeploySection) -> Limits:
    """The service's per-participant limits from ``[deploy]``.

    A waiting pull holds no thread of the server (it waits on its event loop), so
    ``max_long_polls`` is independent of ``max_workers``: unset, it is
    :data:`~fedloom.server.limits.DEFAULT_MAX_LONG_POLLS`.
    """
    polls = deploy.max_long_polls if deploy.max_long_polls is not None else DEFAULT_MAX_LONG_POLLS
    return Limits(
        max_streams_per_client=deploy.max_streams_per_client,
        stream_idle_timeout=deploy.stream_idle_timeout,
        max_long_polls=polls,
        register_rate=deploy.register_rate,
        register_burst=deploy.register_burst,
        pull_rate=deploy.pull_rate,
        pull_burst=deploy.pull_burst,
        min_upload_rate=deploy.min_upload_rate,
        max_task_downloads=deploy.max_task_downloads,
        log_every=deploy.log_every,
    )


def start_remote_engine(
    deploy: DeploySection,
    *,
    spec: ParamSpec,
    dtype: torch.dtype,
    info: dict[str, Any],
    roster: frozenset[str] | None = None,
    roster_name: str = "this run",
) -> RemoteEngine:
    """Listen on ``deploy.address`` and return the engine serving this run's clients.

    ``roster``: the only client ids that may register (an edge's clients, a root's edges).
    """
    if deploy.insecure:
        host = deploy.address.rsplit(":", 1)[0].strip("[]")
        log.warning(INSECURE_WARNING)
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("INSECURE MODE on a non-loopback address %s", deploy.address)
        credentials = None
    else:
        if deploy.credentials is None:
            raise ConfigError(
                "TLS is on by default: set deploy.credentials to the server's directory from `fedloom certs` "
                "(or deploy.insecure = true for loopback development)",
                key="deploy.credentials",
            )
        try:
            credentials = certs.load_server_credentials(Path(deploy.credentials))
        except certs.CertError as exc:
            raise ConfigError(str(exc), key="deploy.credentials") from None
    tune_allocator()
    coordinator = Coordinator(heartbeat_timeout=deploy.heartbeat_timeout)
    service = FleetService(
        coordinator,
        spec=spec,
        dtype=dtype,
        settings=ServiceSettings(
            run_info=info,
            heartbeat_interval=deploy.heartbeat_interval,
            max_pull_wait=deploy.max_pull_wait,
            heartbeat_timeout=deploy.heartbeat_timeout,
            max_control_rate=deploy.max_control_rate,
            secure=credentials is not None,
            limits=limits(deploy),
            max_decoding=deploy.max_decoding,
            max_message_bytes=int(info.get("max_message_bytes", 0)),
            max_examples=deploy.max_examples,
            client_max_examples=dict(deploy.client_max_examples),
            roster=roster,
            roster_name=roster_name,
        ),
        revoked=RevocationList(Path(deploy.revoked) if deploy.revoked else None),
    )
    server, port = start_server(service, deploy.address, credentials=credentials, max_workers=deploy.max_workers)
    log.warning("fedloom server listening on %s (port %d, %s)", deploy.address, port, "TLS" if credentials else "INSECURE")

    def stop() -> None:
        # Tell every live client the run is over (their next pull says so), then stop.
        if not coordinator.wait_all_told(timeout=deploy.max_pull_wait + 2 * deploy.heartbeat_interval + 5.0):
            log.warning("stopping although some clients were not told the run is over (busy or gone)")
        server.stop(grace=2.0).wait()
        service.close()

    engine = RemoteEngine(
        spec=spec,
        coordinator=coordinator,
        round_timeout=deploy.round_timeout,
        min_available=deploy.min_clients,
        wait_timeout=deploy.wait_timeout,
        on_close=stop,
        port=port,
    )
    return engine
