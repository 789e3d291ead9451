"""The pipeline: weighting as a stage, the order of halves, recipes, state namespacing."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import pytest
import torch
from torch import nn

from fedloom.compress import QSGD, TopK
from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.core.params import ParamSpec
from fedloom.core.types import Aggregate, ClientUpdate, ComponentSpec
from fedloom.pipeline import (
    ClientBatch,
    ExampleWeighting,
    Pipeline,
    Stage,
    StageContext,
    StageState,
    UniformWeighting,
    run_client_stages,
)

SPEC = ParamSpec.from_module(nn.Linear(2, 1, bias=False))
CTX = StageContext(SPEC, 1)


def _updates() -> list[ClientUpdate]:
    return [
        ClientUpdate(client_id="a", round=1, delta=torch.tensor([1.0, 2.0]), num_examples=1),
        ClientUpdate(client_id="b", round=1, delta=torch.tensor([3.0, -1.0]), num_examples=3),
    ]


def test_example_weighting_client_server_finalize_by_hand() -> None:
    batch = ClientBatch.of(_updates(), [0, 1], [{}, {}])
    ups = run_client_stages(batch, [ExampleWeighting().recipe()], CTX)
    assert [u.weight for u in ups] == [1.0, 3.0]
    assert ups[1].delta.tolist() == [9.0, -3.0]
    st = ExampleWeighting()
    assert st.server(ups[1], CTX) is ups[1]
    # a client claiming more weight than its examples is refused
    with pytest.raises(InvalidUpdateError, match="stage 'weight_examples': weight 30.0"):
        st.server(replace(ups[1], weight=30.0), CTX)
    with pytest.raises(InvalidUpdateError, match="no weight"):
        st.server(replace(ups[1], weight=None), CTX)
    # the sum [1+9, 2-3] over total weight 4
    agg = Aggregate(delta=torch.tensor([10.0, -1.0], dtype=torch.float64), num_clients=2, num_examples=4, weight=4.0)
    out, _, _ = st.finalize(agg, CTX, StageState())
    assert out.delta.tolist() == [2.5, -0.25] and out.delta.dtype == torch.float32 and out.weight is None


def test_uniform_weighting() -> None:
    ups = run_client_stages(ClientBatch.of(_updates(), [0, 1], [{}, {}]), [UniformWeighting().recipe()], CTX)
    assert [u.weight for u in ups] == [1.0, 1.0] and ups[1].delta.tolist() == [3.0, -1.0]


def test_weighting_then_encoding_and_order_rules() -> None:
    p = Pipeline((ExampleWeighting(), TopK(fraction=0.5)))
    assert p.recipes == (ComponentSpec.of("weight_examples", cap=None), TopK(fraction=0.5).recipe())
    ups = run_client_stages(ClientBatch.of(_updates(), [0, 1], [{}, {}]), p.recipes, CTX)
    assert ups[1].payload.codec == "topk" and ups[1].weight == 3.0
    dec = p.decode(ups[1], CTX)
    assert dec.delta.tolist() == [9.0, 0.0] and dec.payload is None
    with pytest.raises(ConfigError, match="must be the last client stage"):
        Pipeline((TopK(), ExampleWeighting()))
    with pytest.raises(ConfigError, match="cannot encode the broadcast"):
        Pipeline((), broadcast_stage=TopK())
    assert Pipeline((), broadcast_stage=QSGD()).broadcast(torch.ones(2), CTX, 0).payload.codec == "qsgd"


@dataclass(frozen=True)
class _Counter(Stage):
    """A test stage: counts finalizes in its meta and keeps a running sum tensor."""

    name: ClassVar[str] = "counter"
    runs_on_client: ClassVar[bool] = False

    def init_state(self, spec: ParamSpec) -> StageState:
        return StageState(tensors={"sum": torch.zeros(spec.numel)}, meta={"n": 0})

    def finalize(self, aggregate, ctx, state):  # type: ignore[no-untyped-def]
        new = StageState(tensors={"sum": state.tensors["sum"] + aggregate.delta}, meta={"n": state.meta["n"] + 1})
        return replace(aggregate, delta=aggregate.delta * 2), new, {"counter_n": float(new.meta["n"])}


def test_finalize_runs_in_reverse_with_namespaced_state() -> None:
    p = Pipeline((ExampleWeighting(), _Counter()))
    tensors, meta = p.init_state(SPEC)
    assert set(tensors) == {"stage.1.counter.sum"} and meta == {"stage.1.counter": {"n": 0}}
    agg = Aggregate(delta=torch.tensor([4.0, 8.0], dtype=torch.float64), num_clients=2, num_examples=4, weight=4.0)
    out, tensors, meta, metrics = p.finalize(agg, CTX, tensors, meta)
    # reverse order: the counter doubles the SUM first, then weighting divides by 4
    assert out.delta.tolist() == [2.0, 4.0]
    assert tensors["stage.1.counter.sum"].tolist() == [4.0, 8.0] and meta["stage.1.counter"] == {"n": 1}
    assert metrics == {"counter_n": 1.0}
    assert p.recipes == (ComponentSpec.of("weight_examples", cap=None),)  # server-only stages do not travel
