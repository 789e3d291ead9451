"""The client agent's work, without a server: a decoded task trains exactly as the simulation does."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedloom.agent import AgentError, AgentOptions, ClientAgent
from fedloom.client.training import train_local
from fedloom.core.keys import CONTROL_DELTA, SERVER_CONTROL
from fedloom.compress import QSGD, TopK
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, ComponentSpec, Payload, TrainConfig
from fedloom.data.base import ClientData, Split, TaskSpec
from fedloom.models.registry import build_model
from fedloom.pipeline import ExampleWeighting, StageContext, finish_clients
from fedloom.transport import codec
from fedloom.transport.wire import Message

TASK = TaskSpec(kind="regression", input_shape=(3,), num_outputs=1, loss="mse", metrics=("mae", "loss"))


def _agent() -> ClientAgent:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1
    data = ClientData(train=Split(x, y), test=Split(x[:6], y[:6]))
    agent = ClientAgent(data, AgentOptions(server="127.0.0.1:1", client_id="site-a"))  # never connects here
    torch.manual_seed(0)
    agent._model = build_model("linear", TASK)
    agent._spec = ParamSpec.from_module(agent._model)
    agent._task = TASK
    return agent


def _message(kind: str, meta: dict, tensors: dict) -> Message:  # type: ignore[type-arg]
    return Message(kind, {**meta, "task_id": "t" * 32}, dict(tensors))


def test_a_task_trains_like_train_local_and_the_update_decodes() -> None:
    agent = _agent()
    assert agent._spec is not None
    g = torch.randn(agent._spec.numel, generator=torch.Generator().manual_seed(1))
    control = torch.full((agent._spec.numel,), 0.01)
    ins = ClientInstruction(
        round=2, client_id="site-a", train=TrainConfig(batch_size=5, lr=0.05, loss="mse"), seed=9,
        payload={SERVER_CONTROL: control}, transforms=(ComponentSpec("scaffold"),),
    )  # fmt: skip
    kind, meta, tensors = agent._work(_message(*codec.encode_instruction(ins, params=g, deadline_s=10.0)))
    assert kind == "update"
    got = codec.decode_update(meta, tensors, client_id="site-a", round=2)

    model = build_model("linear", TASK)
    want = train_local(model, agent._spec, g, agent.data.train, ins, client_state={}).update
    assert torch.equal(got.delta, want.delta) and torch.equal(got.extras[CONTROL_DELTA], want.extras[CONTROL_DELTA])
    assert (got.num_examples, got.num_steps, dict(got.metrics)) == (want.num_examples, want.num_steps, dict(want.metrics))
    assert got.model_version == 1 and agent.report.tasks == 1 and set(agent.state) == {"control"}


def test_an_unknown_or_malformed_broadcast_is_refused_with_a_clear_error() -> None:
    agent = _agent()
    ins = ClientInstruction(round=1, client_id="site-a", train=TrainConfig(loss="mse"), seed=0)
    bc = Payload(codec="int8-model", tensors={"q": torch.zeros(4, dtype=torch.uint8)}, meta={"scale": 0.1})
    with pytest.raises(AgentError, match="cannot decode the global model sent as 'int8-model'.*unknown stage"):
        agent._work(_message(*codec.encode_instruction(ins, broadcast=bc)))
    bad = Payload(codec="fp16", tensors={"values": torch.zeros(1, dtype=torch.float16), "buffers": torch.zeros(0)}, meta={})
    with pytest.raises(AgentError, match="cannot decode the global model sent as 'fp16'.*mis-sized"):
        agent._work(_message(*codec.encode_instruction(ins, broadcast=bad)))
    assert agent.report.tasks == 0


def test_a_broadcast_and_client_stages_run_in_the_agent_as_in_an_engine() -> None:
    agent = _agent()
    assert agent._spec is not None
    spec = agent._spec
    g = torch.randn(spec.numel, generator=torch.Generator().manual_seed(2))
    down = QSGD(bits=8)
    ctx = StageContext(spec, 1, spec.dtype)
    bc = down.encode_model(g, ctx, seed=4)
    stages = (ExampleWeighting().recipe(), TopK(fraction=0.5).recipe())
    ins = ClientInstruction(round=1, client_id="site-a", train=TrainConfig(batch_size=5, lr=0.05, loss="mse"), seed=3, stages=stages)
    kind, meta, tensors = agent._work(_message(*codec.encode_instruction(ins, broadcast=bc)))
    got = codec.decode_update(meta, tensors, client_id="site-a", round=1)
    assert got.payload is not None and got.payload.codec == "topk" and got.weight == float(got.num_examples)
    # the same as training from the decoded broadcast and running the stages as an engine does
    received = down.decode_model(bc, ctx)
    want = train_local(build_model("linear", TASK), spec, received, agent.data.train, ins, client_state={}).update
    ups, states = finish_clients(spec, [ins], [want], [{}])
    for k, v in ups[0].payload.tensors.items():
        assert torch.equal(got.payload.tensors[k], v), k
    assert torch.equal(agent.state["topk.residual"], states[0]["topk.residual"])


def test_an_evaluation_answers_with_the_test_split_size_and_metrics() -> None:
    agent = _agent()
    assert agent._spec is not None
    kind, meta, tensors = agent._work(_message(*codec.encode_evaluation("site-a", torch.zeros(agent._spec.numel))))
    assert kind == "eval_result" and tensors == {}
    n, metrics = codec.decode_eval_result(meta, client_id="site-a", max_examples=6)
    assert n == 6 and set(metrics) == {"mae", "loss"} and agent.report.evaluations == 1


def test_client_state_persists_in_the_state_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    state_file = tmp_path / "site-a.state"
    agent = _agent()
    agent.options = replace(agent.options, state_file=state_file)
    assert agent._spec is not None
    g = torch.randn(agent._spec.numel, generator=torch.Generator().manual_seed(3))
    ins = ClientInstruction(
        round=1, client_id="site-a", train=TrainConfig(batch_size=5, lr=0.05, loss="mse"), seed=1,
        stages=(TopK(fraction=0.5).recipe(),),
    )  # fmt: skip
    agent._work(_message(*codec.encode_instruction(ins, params=g)))
    assert state_file.exists() and set(agent.state) == {"topk.residual"}
    again = ClientAgent(agent.data, replace(agent.options, state_file=state_file))  # a restarted client
    assert torch.equal(again.state["topk.residual"], agent.state["topk.residual"])
    state_file.write_bytes(b"not a safetensors file")
    with pytest.raises(AgentError, match="cannot read the client state file"):
        ClientAgent(agent.data, replace(agent.options, state_file=state_file))
