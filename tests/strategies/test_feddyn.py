"""FedDyn (Acar et al. 2021): the local gradient transform, client state g_i, the server's h, resume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fedloom.client.training import train_local
from fedloom.client.transforms import DynamicRegularization
from fedloom.core.keys import FEDDYN_GRAD
from fedloom.core.errors import ConfigError, StrategyError
from fedloom.core.params import ParamSpec
from fedloom.core.types import Aggregate, ClientInstruction, ClientUpdate, ComponentSpec, TrainConfig
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec
from fedloom.engines.base import ClientStateStore
from fedloom.engines.sequential import SequentialEngine
from fedloom.engines.vectorized import VectorizedEngine
from fedloom.federation.loop import Federation
from fedloom.pipeline import ClientBatch, Pipeline, StageContext
from fedloom.store import Store
from fedloom.strategies import FedDyn, FedDynStep, ServerState, build_strategy

H = "stage.0.feddyn.h"

# ---------------------------------------------------------------- the server step


def _spec(trainable: int = 3, buffers: int = 0) -> ParamSpec:
    sd = {"w": torch.zeros(trainable)}
    if buffers:
        sd["running"] = torch.zeros(buffers)
    return ParamSpec.from_state_dict(sd, trainable={"w"})


def server_round(
    s: FedDyn, state: ServerState, spec: ParamSpec, deltas: Sequence[list[float]], num_available: int | None
) -> ServerState:
    """One round as the loop runs it: client halves, server halves, sum, finalize with stage state, apply."""
    pipe = Pipeline(s.stages())
    tensors, _ = pipe.init_state(spec)
    state = replace(state, tensors={**tensors, **state.tensors})
    rnd = state.round + 1
    ctx = StageContext(spec, rnd, torch.float32)
    agg = s.aggregator(state, rnd)
    for i, d in enumerate(deltas):
        u = ClientUpdate(client_id=f"c{i}", round=rnd, delta=torch.tensor(d), num_examples=10 * (i + 1))
        batch = ClientBatch.of([u], [0], [{}])
        for st in pipe.stages:
            if st.runs_on_client:
                st.client(batch, ctx)
        agg.add(pipe.decode(batch.finish()[0], ctx))
    out = replace(agg.result(), num_available=num_available)
    out, tensors, meta, _ = pipe.finalize(out, ctx, state.tensors, state.meta)
    return s.apply(replace(state, tensors=tensors, meta=meta), out)


def test_two_rounds_of_server_math_by_hand_with_a_checkpoint_between() -> None:
    s = FedDyn(alpha=0.5)
    spec = _spec()
    state = s.init(torch.tensor([1.0, -1.0, 0.0]))
    # round 1: N = 4, P = {c0, c1}; deltas [1, 2, 3] and [3, 0, -1] (example counts ignored: unweighted)
    #   mean = [2, 1, 1];  h1 = 0 - 0.5 * (1/4) * [4, 2, 2] = [-0.5, -0.25, -0.25]
    #   x1 = x0 + mean - h1 / 0.5 = [1, -1, 0] + [2, 1, 1] + [1, 0.5, 0.5] = [4, 0.5, 1.5]
    state = server_round(s, state, spec, [[1, 2, 3], [3, 0, -1]], num_available=4)
    assert torch.equal(state.tensors[H], torch.tensor([-0.5, -0.25, -0.25]))
    assert torch.equal(state.params, torch.tensor([4.0, 0.5, 1.5]))
    state = ServerState.from_tensors(state.to_tensors())  # h survives a checkpoint
    # round 2: deltas [0, 0, 0] and [2, 2, 2]: mean = [1, 1, 1]
    #   h2 = h1 - 0.5 * (1/4) * [2, 2, 2] = [-0.75, -0.5, -0.5]
    #   x2 = x1 + [1, 1, 1] + [1.5, 1, 1] = [6.5, 2.5, 3.5]
    state = server_round(s, state, spec, [[0, 0, 0], [2, 2, 2]], num_available=4)
    assert torch.equal(state.tensors[H], torch.tensor([-0.75, -0.5, -0.5]))
    assert torch.equal(state.params, torch.tensor([6.5, 2.5, 3.5]))
    assert state.round == 2


def test_fixed_num_clients_and_server_lr() -> None:
    s = FedDyn(alpha=0.25, num_clients=2, server_lr=0.5)
    # mean = [2, 1, 1]; N = 2 (num_available ignored): h = -0.25 * (2/2) * [2, 1, 1] = [-0.5, -0.25, -0.25]
    # x = 0 + 0.5 * ([2, 1, 1] + [2, 1, 1]) = [2, 1, 1]
    state = server_round(s, s.init(torch.zeros(3)), _spec(), [[1, 2, 3], [3, 0, -1]], num_available=100)
    assert torch.equal(state.tensors[H], torch.tensor([-0.5, -0.25, -0.25]))
    assert torch.equal(state.params, torch.tensor([2.0, 1.0, 1.0]))


def test_buffers_are_averaged_without_h() -> None:
    s = FedDyn(alpha=0.5)
    # entries: w (2, trainable), running (1, a buffer); N = 2
    # mean = [2, 1, 5]; h = -0.5 * [2, 1, 0] = [-1, -0.5, 0]; x = [2, 1, 5] + [2, 1, 0] = [4, 2, 5]
    state = server_round(s, s.init(torch.zeros(3)), _spec(2, 1), [[1, 2, 4], [3, 0, 6]], num_available=2)
    assert torch.equal(state.tensors[H], torch.tensor([-1.0, -0.5, 0.0]))
    assert torch.equal(state.params, torch.tensor([4.0, 2.0, 5.0]))


def test_unknown_or_too_small_population_fails_the_round() -> None:
    s = FedDyn()
    with pytest.raises(StrategyError, match="N is unknown"):
        server_round(s, s.init(torch.zeros(3)), _spec(), [[1, 2, 3]], num_available=None)
    with pytest.raises(StrategyError, match="2 updates but only N=1"):
        server_round(s, s.init(torch.zeros(3)), _spec(), [[1, 2, 3], [1, 1, 1]], num_available=1)
    step = FedDynStep(alpha=0.1)
    agg = Aggregate(delta=torch.zeros(3), num_clients=1, num_examples=1, num_available=1)
    with pytest.raises(StrategyError, match="'h'"):  # a state that FedDyn did not make
        step.finalize(agg, StageContext(_spec(), 1), step.init_state(_spec(4)))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("bad", [0.0, -0.01, float("nan"), float("inf"), "0.1", None, True])
def test_bad_alpha_is_a_keyed_config_error(bad: object) -> None:
    with pytest.raises(ConfigError) as ei:
        FedDyn(alpha=bad)  # type: ignore[arg-type]
    assert ei.value.key == "strategy.alpha"
    with pytest.raises(ConfigError) as ei:
        build_strategy("feddyn", train=TrainConfig(), fraction=0.5, alpha=bad)
    assert ei.value.key == "strategy.alpha"


def test_bad_num_clients_and_bad_transform_alpha() -> None:
    with pytest.raises(ConfigError) as ei:
        FedDyn(num_clients=0)
    assert ei.value.key == "strategy.num_clients"
    with pytest.raises(ConfigError) as ei:
        DynamicRegularization(alpha=-1.0)
    assert ei.value.key == "alpha"


def test_defaults_registry_and_instruction() -> None:
    s = build_strategy("feddyn", train=TrainConfig(lr=0.05), fraction=0.5, seed=3)
    assert isinstance(s, FedDyn) and s.alpha == 0.01 and s.num_clients is None
    instr = s.client_config(s.init(torch.zeros(3)), 2, "a")
    assert instr.transforms == (ComponentSpec.of("feddyn", alpha=0.01),)
    assert instr.payload == {} and instr.train.lr == 0.05
    assert [st.name for st in s.stages()] == ["feddyn", "weight_uniform"]


# ---------------------------------------------------------------- local training

TASK = TaskSpec(kind="regression", input_shape=(3,), num_outputs=1, loss="mse", metrics=("mae", "loss"))


def _split(n: int = 20, seed: int = 0, dtype: torch.dtype = torch.float32) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=dtype)
    return Split(x, x @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype) + 0.1 * torch.randn(n, generator=g, dtype=dtype))


def _ins(alpha: float | None, **train: object) -> ClientInstruction:
    transforms = () if alpha is None else (ComponentSpec.of("feddyn", alpha=alpha),)
    return ClientInstruction(round=1, client_id="c", train=TrainConfig(loss="mse", **train), seed=4, transforms=transforms)  # type: ignore[arg-type]


def test_alpha_zero_and_zero_state_is_plain_sgd() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    spec = ParamSpec.from_module(model)
    g = spec.module_vector(model)
    plain = train_local(model, spec, g, _split(), _ins(None, epochs=2, batch_size=6, lr=0.1))
    dyn = train_local(model, spec, g, _split(), _ins(0.0, epochs=2, batch_size=6, lr=0.1))
    assert torch.equal(dyn.update.delta, plain.update.delta)
    assert dyn.update.extras == {}
    assert torch.equal(dyn.state[FEDDYN_GRAD], torch.zeros_like(g))  # g_i - 0 * delta


def test_local_gradient_and_new_state_by_hand() -> None:
    """Two full-batch steps of  L(θ) − ⟨g_i, θ⟩ + (α/2)‖θ − θ0‖²  against autograd, then g_i − α Δ."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    spec = ParamSpec.from_module(model)
    theta0 = spec.module_vector(model)
    data = _split(dtype=torch.float64)
    g_i = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64)
    alpha, lr = 0.5, 0.1
    res = train_local(model, spec, theta0, data, _ins(alpha, epochs=2, batch_size=20, lr=lr), client_state={FEDDYN_GRAD: g_i})
    theta = theta0.clone()
    for _ in range(2):
        t = theta.clone().requires_grad_()
        loss = F.mse_loss(data.x @ t[:3] + t[3], data.y) - g_i @ t + 0.5 * alpha * ((t - theta0) ** 2).sum()
        (grad,) = torch.autograd.grad(loss, (t,))
        theta = theta - lr * grad
    torch.testing.assert_close(res.update.delta, theta - theta0, rtol=0, atol=1e-14)
    torch.testing.assert_close(res.state[FEDDYN_GRAD], g_i - alpha * (theta - theta0), rtol=0, atol=1e-14)


def test_buffers_get_no_linear_term() -> None:
    torch.manual_seed(0)

    def model_fn() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1), nn.Flatten(0))

    model = model_fn()
    spec = ParamSpec.from_module(model)
    g = spec.module_vector(model)
    res = train_local(model, spec, g, _split(), _ins(0.3, batch_size=5, lr=0.05))
    mask = spec.trainable_mask()
    grad = res.state[FEDDYN_GRAD]
    assert bool((grad[~mask] == 0).all()) and bool((res.update.delta[~mask] != 0).any())
    torch.testing.assert_close(grad[mask], -0.3 * res.update.delta[mask])


def test_client_state_round_trip(tmp_path: Path) -> None:
    """g_i kept by the engines' store (and a checkpoint file) gives the next round exactly what it left."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    spec = ParamSpec.from_module(model)
    g = spec.module_vector(model)
    ins = _ins(0.2, batch_size=5, lr=0.05)
    first = train_local(model, spec, g, _split(), ins)
    store = ClientStateStore()
    store.put("c", first.state)
    save_file(store.to_tensors(), str(tmp_path / "clients.safetensors"))
    restored = ClientStateStore()
    restored.load_tensors(load_file(str(tmp_path / "clients.safetensors")))
    assert torch.equal(restored.get("c")[FEDDYN_GRAD], first.state[FEDDYN_GRAD])
    a = train_local(model, spec, g, _split(seed=1), ins, client_state=first.state)
    b = train_local(model, spec, g, _split(seed=1), ins, client_state=restored.get("c"))
    assert torch.equal(a.update.delta, b.update.delta) and torch.equal(a.state[FEDDYN_GRAD], b.state[FEDDYN_GRAD])
    # the state matters: without it the second round trains differently
    fresh = train_local(model, spec, g, _split(seed=1), ins)
    assert not torch.equal(fresh.update.delta, a.update.delta)
    torch.testing.assert_close(a.state[FEDDYN_GRAD], first.state[FEDDYN_GRAD] - 0.2 * a.update.delta)


# ---------------------------------------------------------------- in the round loop


def _dataset(sizes: Sequence[int]) -> FederatedDataset:
    clients = {f"c{i}": ClientData(train=_split(n, seed=i), test=_split(4, seed=i)) for i, n in enumerate(sizes)}
    return FederatedDataset("toy", TASK, clients, server_test=_split(16, seed=99))


def _federation(engine_cls: type = SequentialEngine, store: Store | None = None, fresh: bool = False) -> Federation:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    spec = ParamSpec.from_module(model)
    engine = engine_cls(model_fn=lambda: nn.Linear(3, 1), dataset=_dataset([12, 20, 8, 16]), spec=spec)
    s = FedDyn(alpha=0.1, train=TrainConfig(loss="mse", batch_size=4, lr=0.05, momentum=0.5), fraction=0.5, seed=1)
    handle = store.start_or_resume_run("feddyn", {"test": "feddyn"}, fresh=fresh) if store is not None else None
    return Federation(strategy=s, engine=engine, spec=spec, initial=spec.module_vector(model), store=store, run_handle=handle)


def test_sequential_and_vectorized_engines_agree() -> None:
    seq, vec = _federation(), _federation(VectorizedEngine)
    seq.run(4)
    vec.run(4)
    assert [sorted(r.clients) for r in seq.history] == [sorted(r.clients) for r in vec.history]
    assert len({tuple(r.clients) for r in seq.history}) > 1  # partial participation: g_i of absent clients wait
    torch.testing.assert_close(vec.state.params, seq.state.params, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vec.state.tensors[H], seq.state.tensors[H], rtol=1e-5, atol=1e-7)
    assert float(seq.state.tensors[H].abs().sum()) > 0
    for cid in seq.engine.available_clients():
        want = seq.engine.client_states.get(cid).get(FEDDYN_GRAD)
        got = vec.engine.client_states.get(cid).get(FEDDYN_GRAD)
        assert (want is None) == (got is None)
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_resumed_run_equals_uninterrupted(tmp_path: Path) -> None:
    full = _federation()
    full.run(4)
    first = _federation(store=Store.open(tmp_path / "runs.db"), fresh=True)
    first.run(2)
    assert float(first.state.tensors[H].abs().sum()) > 0 and len(first.engine.client_states) > 0
    second = _federation(store=Store.open(tmp_path / "runs.db"))
    assert second.resumed_from == 2
    assert torch.equal(second.state.tensors[H], first.state.tensors[H])
    second.run(4)
    assert [r.clients for r in second.history] == [r.clients for r in full.history]
    assert torch.equal(second.state.params, full.state.params)
    assert torch.equal(second.state.tensors[H], full.state.tensors[H])
    assert second.engine.client_states.to_tensors().keys() == full.engine.client_states.to_tensors().keys()
    for k, v in full.engine.client_states.to_tensors().items():
        assert torch.equal(second.engine.client_states.to_tensors()[k], v), k
