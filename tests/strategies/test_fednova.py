"""FedNova (Wang et al. 2020): effective step counts, the normalized server step, bad step counts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import pytest
import torch
from torch import nn

from fedloom.core.errors import ConfigError, InvalidUpdateError
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, ClientUpdate, TrainConfig
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec
from fedloom.engines.sequential import SequentialEngine
from fedloom.engines.vectorized import VectorizedEngine
from fedloom.federation.loop import Federation
from fedloom.strategies import FedAvg, FedNova, FedNovaAggregator, FedNovaWeighting, Strategy, build_strategy, effective_steps

from _server import Server

# ---------------------------------------------------------------- a_i


@pytest.mark.parametrize(
    ("tau", "rho", "want"),
    [
        (5, 0.0, 5.0),  # plain SGD: a = tau
        (1, 0.9, 1.0),  # one step: momentum has nothing to accumulate
        (2, 0.5, 2.5),  # [2 - 0.5 * (1 - 0.25) / 0.5] / 0.5 = (2 - 0.75) / 0.5
        (3, 0.5, 4.25),  # [3 - 0.5 * (1 - 0.125) / 0.5] / 0.5 = (3 - 0.875) / 0.5
    ],
)
def test_effective_steps_by_hand(tau: int, rho: float, want: float) -> None:
    assert effective_steps(tau, rho) == want


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_effective_steps_is_what_torch_sgd_with_momentum_does(rho: float) -> None:
    """‖a‖₁ = the distance torch's SGD moves a scalar whose every gradient is 1, divided by lr."""
    w = nn.Parameter(torch.zeros((), dtype=torch.float64))
    opt = torch.optim.SGD([w], lr=0.5, momentum=rho)
    for tau in range(1, 8):
        w.grad = torch.ones((), dtype=torch.float64)
        opt.step()
        assert float(-w.detach()) / 0.5 == pytest.approx(effective_steps(tau, rho), rel=1e-13)


# ---------------------------------------------------------------- server math

F64 = torch.float64


def upd(cid: str, delta: list[float], n: int, steps: int, dtype: torch.dtype = F64) -> ClientUpdate:
    return ClientUpdate(client_id=cid, round=1, delta=torch.tensor(delta, dtype=dtype), num_examples=n, num_steps=steps)


def server_step(s: Strategy, updates: Sequence[ClientUpdate], x0: torch.Tensor) -> tuple[torch.Tensor, Server]:
    state = s.init(x0)
    agg = Server(s, state, 1)
    for u in updates:
        agg.add(u)
    return s.apply(state, agg.result()).params, agg


TRAIN = TrainConfig(epochs=4, batch_size=1)  # allows up to 4 * n_i steps


def test_momentum_two_clients_three_parameters_by_hand() -> None:
    # rho = 0.5; client a: n = 2, tau = 2 -> a = 2.5; client b: n = 6, tau = 3 -> a = 4.25
    # p = (1/4, 3/4); d = 1/4 * [2.5, 0, 5] / 2.5 + 3/4 * [4.25, 8.5, 0] / 4.25
    #                   = 1/4 * [1, 0, 2] + 3/4 * [1, 2, 0] = [1, 1.5, 0.5]
    # tau_eff = 1/4 * 2.5 + 3/4 * 4.25 = 3.8125; x = 0 + 3.8125 * d = [3.8125, 5.71875, 1.90625]
    s = FedNova(train=replace(TRAIN, momentum=0.5))
    x, agg = server_step(s, [upd("a", [2.5, 0, 5], 2, 2), upd("b", [4.25, 8.5, 0], 6, 3)], torch.zeros(3, dtype=F64))
    assert torch.equal(x, torch.tensor([3.8125, 5.71875, 1.90625], dtype=F64))
    assert agg.effective_steps == {"a": 2.5, "b": 4.25}
    assert isinstance(agg.aggregator, FedNovaAggregator)


def test_plain_sgd_by_hand_and_against_fedavg() -> None:
    # a = tau = (2, 4); p = (1/4, 3/4); d = 1/4 * [1, 2, 0] + 3/4 * [1, 0, 2] = [1, 0.5, 1.5]
    # tau_eff = 1/4 * 2 + 3/4 * 4 = 3.5; x = [1, 1, 1] + 3.5 * d = [4.5, 2.75, 6.25]
    ups = [upd("a", [2, 4, 0], 1, 2), upd("b", [4, 0, 8], 3, 4)]
    x0 = torch.ones(3, dtype=F64)
    s = FedNova(train=TRAIN)
    state = s.init(x0)
    agg = Server(s, state, 1)
    for u in ups:
        agg.add(u)
    result = agg.result()
    assert result.metrics == {}  # a_i is consumed by the stage (it reports tau_eff itself)
    assert torch.equal(s.apply(state, result).params, torch.tensor([4.5, 2.75, 6.25], dtype=F64))
    # FedAvg would take 1/4 * [2, 4, 0] + 3/4 * [4, 0, 8] = [3.5, 1, 6]: the busier client dominates
    x_avg, _ = server_step(FedAvg(train=TRAIN), ups, x0)
    assert torch.equal(x_avg, torch.tensor([4.5, 2.0, 7.0], dtype=F64))


def test_server_lr_scales_the_normalized_step() -> None:
    s = FedNova(train=TRAIN, server_lr=0.5)
    x, _ = server_step(s, [upd("a", [2, 4, 0], 1, 2), upd("b", [4, 0, 8], 3, 4)], torch.zeros(3, dtype=F64))
    assert torch.equal(x, torch.tensor([1.75, 0.875, 2.625], dtype=F64))


@pytest.mark.parametrize("tau", [4, 3])
@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_equal_steps_equal_fedavg(tau: int, rho: float) -> None:
    g = torch.Generator().manual_seed(tau)
    ups = [
        upd(f"c{i}", torch.randn(5, generator=g).tolist(), n, tau, dtype=torch.float32)
        for i, n in enumerate([3, 7, 12, 5])
    ]
    train = TrainConfig(epochs=4, batch_size=1, momentum=rho)
    x0 = torch.randn(5, generator=g)
    nova, _ = server_step(FedNova(train=train), ups, x0)
    avg, _ = server_step(FedAvg(train=train), ups, x0)
    if tau == 4 and rho == 0.0:  # a power-of-two a_i: the scalings are exact, so the results are identical
        assert torch.equal(nova, avg)
    else:
        torch.testing.assert_close(nova, avg, rtol=1e-6, atol=1e-6)


def test_tau_eff_is_reported_as_a_round_metric() -> None:
    s = FedNova(train=TRAIN)
    agg = Server(s, s.init(torch.zeros(3, dtype=F64)), 1)
    agg.add(upd("a", [2, 4, 0], 1, 2))
    agg.add(upd("b", [4, 0, 8], 3, 4))
    out = agg.aggregator.result()
    _, _, _, metrics = agg.pipeline.finalize(out, agg.ctx(F64), {}, {})
    assert metrics == {"tau_eff": 3.5}


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("steps", "reason"),
    [
        (0, "missing or not positive"),  # a header without num_steps decodes to 0
        (-3, "missing or not positive"),
        (2.0, "must be an integer"),
        (True, "must be an integer"),
        (9, "allows at most 8 for 2 examples"),  # epochs 4 * ceil(2 / 1)
    ],
)
def test_bad_step_counts_are_rejected_with_a_reason(steps: object, reason: str) -> None:
    s = FedNova(train=TRAIN)
    agg = Server(s, s.init(torch.zeros(3, dtype=F64)), 1)
    bad = ClientUpdate(client_id="x", round=1, delta=torch.zeros(3, dtype=F64), num_examples=2, num_steps=steps)  # type: ignore[arg-type]
    with pytest.raises(InvalidUpdateError) as ei:
        agg.add(bad)
    assert reason in ei.value.reason and "weight_fednova" in ei.value.reason
    assert agg.client_ids == []


def test_a_step_count_missing_on_the_wire_is_rejected() -> None:
    from fedloom.transport.codec import decode_update, encode_update

    meta, tensors = encode_update(upd("x", [1, 2, 3], 2, 2))
    meta = {k: v for k, v in meta.items() if k != "num_steps"}
    s = FedNova(train=TRAIN)
    agg = Server(s, s.init(torch.zeros(3, dtype=F64)), 1)
    with pytest.raises(InvalidUpdateError, match="reports 0 local steps"):
        agg.add(decode_update(meta, tensors, client_id="x", round=1))


def test_max_steps_bounds_the_step_count() -> None:
    st = FedNovaWeighting.of(TrainConfig(epochs=3, batch_size=10, max_steps=5))
    ok = ClientUpdate(client_id="x", round=1, delta=torch.zeros(1), num_examples=100, num_steps=5)
    assert st.steps_of(ok) == 5
    with pytest.raises(InvalidUpdateError, match="at most 5 for 100"):
        st.steps_of(replace(ok, num_steps=6))
    # without the cap: 3 epochs of ceil(25 / 10) = 3 batches
    assert FedNovaWeighting.of(TrainConfig(epochs=3, batch_size=10)).steps_of(replace(ok, num_examples=25, num_steps=9)) == 9


def test_the_aggregator_refuses_an_update_its_stage_did_not_weight() -> None:
    agg = FedNovaAggregator()
    with pytest.raises(InvalidUpdateError, match="weight_fednova"):
        agg.add(upd("a", [1, 2, 3], 1, 1))


def test_unsupported_local_optimizers_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as ei:
        FedNova(train=TrainConfig(optimizer="adam"))
    assert ei.value.key == "client.optimizer"
    with pytest.raises(ConfigError) as ei:
        FedNova(train=TrainConfig(momentum=0.9, nesterov=True))
    assert ei.value.key == "client.nesterov"


def test_registry_builds_it() -> None:
    s = build_strategy("fednova", train=TrainConfig(momentum=0.9), fraction=0.5, min_clients=1, seed=0)
    assert isinstance(s, FedNova)
    assert s.stages() == (FedNovaWeighting(momentum=0.9, epochs=1, batch_size=10, max_steps=None),)


def test_secure_aggregation_is_refused() -> None:
    from fedloom.secure.plan import plan_secure

    s = FedNova(train=TRAIN)
    with pytest.raises(ConfigError, match="FedNovaAggregator") as ei:
        plan_secure({}, strategy=s, stages=s.stages(), params=torch.zeros(3))
    assert ei.value.key == "secure"


# ---------------------------------------------------------------- in the round loop

TASK = TaskSpec(kind="regression", input_shape=(3,), num_outputs=1, loss="mse", metrics=("mae", "loss"))


def _dataset(sizes: Sequence[int]) -> FederatedDataset:
    g = torch.Generator().manual_seed(0)
    clients = {}
    for i, n in enumerate(sizes):
        x = torch.randn(n, 3, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * i
        clients[f"c{i}"] = ClientData(train=Split(x, y), test=Split(x[:4], y[:4]))
    x = torch.randn(16, 3, generator=g)
    return FederatedDataset("toy", TASK, clients, server_test=Split(x, x @ torch.tensor([1.0, -2.0, 0.5])))


def _federation(ds: FederatedDataset, strategy: Strategy, engine_cls: type = SequentialEngine) -> Federation:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    spec = ParamSpec.from_module(model)
    engine = engine_cls(model_fn=lambda: nn.Linear(3, 1), dataset=ds, spec=spec)
    return Federation(strategy=strategy, engine=engine, spec=spec, initial=spec.module_vector(model))


def test_a_run_with_equal_steps_equals_fedavg_bit_for_bit() -> None:
    ds = _dataset([16, 24, 40])
    train = TrainConfig(loss="mse", batch_size=4, lr=0.05, max_steps=4)  # every client takes 4 steps
    nova = _federation(ds, FedNova(train=train, fraction=1.0))
    avg = _federation(ds, FedAvg(train=train, fraction=1.0))
    nova.run(3)
    avg.run(3)
    assert torch.equal(nova.state.params, avg.state.params)
    assert [r.metrics["tau_eff"] for r in nova.history] == [4.0, 4.0, 4.0]


def test_sequential_and_vectorized_engines_agree() -> None:
    ds = _dataset([8, 20, 44])  # 2, 5 and 11 steps of 4 examples
    train = TrainConfig(loss="mse", batch_size=4, lr=0.02, momentum=0.9, weight_decay=1e-3)
    seq = _federation(ds, FedNova(train=train, fraction=1.0))
    vec = _federation(ds, FedNova(train=train, fraction=1.0), VectorizedEngine)
    seq.run(3)
    vec.run(3)
    torch.testing.assert_close(vec.state.params, seq.state.params, rtol=1e-5, atol=1e-6)
    want = (8 * effective_steps(2, 0.9) + 20 * effective_steps(5, 0.9) + 44 * effective_steps(11, 0.9)) / 72
    assert seq.history[0].metrics["tau_eff"] == pytest.approx(want, rel=1e-12)
    assert vec.history[0].metrics["tau_eff"] == pytest.approx(want, rel=1e-12)


class _OverReportingEngine(SequentialEngine):
    """Client c1 claims more local steps than its instruction allows; c2 reports none."""

    def run_cohort(self, global_vec: torch.Tensor, instructions: Sequence[ClientInstruction], **kw: object) -> Iterator[ClientUpdate]:
        for u in super().run_cohort(global_vec, instructions, **kw):  # type: ignore[arg-type]
            if u.client_id == "c1":
                yield replace(u, num_steps=u.num_steps + 1)
            elif u.client_id == "c2":
                yield replace(u, num_steps=0)
            else:
                yield u


def test_bad_step_counts_are_rejected_in_a_round_that_goes_on() -> None:
    ds = _dataset([8, 12, 16, 20])
    train = TrainConfig(loss="mse", batch_size=4, lr=0.05)
    fed = _federation(ds, FedNova(train=train, fraction=1.0), _OverReportingEngine)
    rec = fed.step()
    assert rec.status == "ok" and sorted(rec.clients) == ["c0", "c3"]
    assert "allows at most 3 for 12 examples" in rec.rejected["c1"]
    assert "reports 0 local steps" in rec.rejected["c2"]
    # c0 (2 steps) and c3 (5 steps) alone: a = (2, 5), tau_eff = (8 * 2 + 20 * 5) / 28
    assert rec.metrics["tau_eff"] == pytest.approx((8 * 2 + 20 * 5) / 28, rel=1e-15)
