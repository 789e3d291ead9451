"""The remote engine's side of a round, against the coordinator alone (no gRPC server).

What a client pulls is the codec's encoding of its instruction with the dense global vector,
or with the encoded broadcast payload when ``run_cohort`` is given one; what it delivers is
what the round receives.
"""

from __future__ import annotations

import threading

import torch

from fedloom.core.keys import SERVER_CONTROL
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, ClientUpdate, Payload, TrainConfig
from fedloom.engines.coordinator import Coordinator
from fedloom.engines.remote import RemoteEngine
from fedloom.transport import codec
from fedloom.transport.wire import decode, encode

SPEC = ParamSpec.from_state_dict({"w": torch.zeros(2, 3), "b": torch.zeros(3)})


def _round(broadcast: Payload | None) -> tuple[codec.DecodedTask, list[ClientUpdate], ClientUpdate]:
    coord = Coordinator()
    engine = RemoteEngine(spec=SPEC, coordinator=coord, round_timeout=30, wait_timeout=5)
    coord.register("a", num_examples=10)
    g = torch.arange(9, dtype=torch.float32)
    ins = ClientInstruction(round=3, client_id="a", train=TrainConfig(lr=0.1), seed=5, payload={SERVER_CONTROL: g * 0.5})
    got: list[ClientUpdate] = []
    t = threading.Thread(target=lambda: got.extend(engine.run_cohort(g, [ins], broadcast=broadcast)))
    t.start()
    task = coord.pull("a", 10.0)
    assert task is not None and task.kind == "task"
    msg = decode(encode(task.kind, task.meta, task.body), max_bytes=1 << 20)  # what the client reads
    decoded = codec.decode_instruction(msg.meta, msg.tensors)
    update = ClientUpdate(client_id="a", round=3, delta=torch.ones(9), num_examples=10)
    assert coord.deliver("a", task.task_id, update) is None
    t.join(timeout=10)
    assert not t.is_alive()
    engine.close()
    assert decoded.instruction.payload.keys() == {SERVER_CONTROL}
    assert torch.equal(decoded.instruction.payload[SERVER_CONTROL], g * 0.5)
    assert decoded.instruction.round == 3 and decoded.instruction.seed == 5 and decoded.deadline_s == 30
    return decoded, got, update


def test_the_dense_global_vector_is_sent_by_default() -> None:
    decoded, got, update = _round(None)
    assert decoded.broadcast is None and torch.equal(decoded.params, torch.arange(9, dtype=torch.float32))
    assert len(got) == 1 and got[0] is update  # the round receives what the client delivered


def test_a_broadcast_payload_is_sent_instead_of_the_dense_vector() -> None:
    bc = Payload(codec="int8", tensors={"q": torch.arange(9, dtype=torch.uint8)}, meta={"scale": 0.5})
    decoded, got, update = _round(bc)
    assert decoded.params is None and decoded.broadcast is not None
    assert decoded.broadcast.codec == "int8" and dict(decoded.broadcast.meta) == {"scale": 0.5}
    assert torch.equal(decoded.broadcast.tensors["q"], torch.arange(9, dtype=torch.uint8))
    assert len(got) == 1 and got[0] is update  # the round receives what the client delivered
