"""A 600 MiB model travels through the real gRPC service in checksummed chunks, both ways.

gRPC's default message limit is 4 MiB; the stream of 1 MiB chunks has no size limit but memory.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from fedloom.agent import AgentOptions, ClientAgent
from fedloom.core.params import ParamSpec
from fedloom.data.base import ClientData, Split
from fedloom.engines.coordinator import Coordinator
from fedloom.server.service import FleetService, ServiceSettings, start_server
from fedloom.transport.proto import fedloom_pb2 as pb
from fedloom.transport.wire import Message, encode_body

pytestmark = pytest.mark.slow

NUMEL = 600 * (1 << 20) // 4  # 600 MiB of float32


class _Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(NUMEL), requires_grad=False)


class _EchoAgent(ClientAgent):
    """Skips training: returns delta = params / 2 so the server can check every value came through."""

    def _register(self) -> None:  # the model is not in the registry; build the layout directly
        self._model, self._spec, self._task = nn.Identity(), ParamSpec.from_module(_Big()), object()  # type: ignore[assignment]
        stub = self._connect()
        reply = stub.Register(pb.RegisterRequest(client_id=self.client_id, num_examples=10), timeout=60)
        self._session = reply.session

    def _work(self, msg: Message):  # type: ignore[no-untyped-def]
        params = msg.tensors["params"]
        self.report.tasks += 1
        return "update", {"round": 1, "num_examples": 10, "num_steps": 1, "metrics": {}}, {"delta": params / 2}


def test_600_mib_model_round_trip() -> None:
    spec = ParamSpec.from_module(_Big())
    coord = Coordinator()
    service = FleetService(coord, spec=spec, dtype=torch.float32, settings=ServiceSettings(run_info={}, secure=False))
    server, port = start_server(service, "127.0.0.1:0", credentials=None, max_workers=8)
    try:
        data = ClientData(train=Split(torch.zeros(10, 1), torch.zeros(10)))
        agent = _EchoAgent(data, AgentOptions(server=f"127.0.0.1:{port}", client_id="big", pull_wait=1.0))
        params = torch.arange(NUMEL, dtype=torch.float32) % 1000.0
        body = encode_body({"params": params})
        assert len(body.chunks) == 600  # 1 MiB chunks
        t = threading.Thread(target=agent.run, kwargs={"max_tasks": 1}, daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while "big" not in coord.live_clients():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        collector = coord.post([("big", "task", {"round": 1, "seed": 0}, body)], deadline=time.monotonic() + 300)
        res = collector.get(300)
        t.join(timeout=60)
        assert res is not None and res.failure == "", res
        update = res.payload
        assert update.delta.shape == (NUMEL,) and update.delta.dtype == torch.float32
        assert torch.equal(update.delta, params / 2)
        assert service.bytes_sent == NUMEL * 4 and service.bytes_received == NUMEL * 4
        assert agent.report.bytes_down == NUMEL * 4 and agent.report.bytes_up == NUMEL * 4
    finally:
        server.stop(0)
