"""The round loop: FedAvg equals centralized GD, determinism, hostile updates, federated eval."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedloom.compress import QSGD
from fedloom.core.params import ParamSpec
from fedloom.core.types import Aggregate, ClientInstruction, ClientUpdate, TrainConfig
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec
from fedloom.engines.sequential import SequentialEngine
from fedloom.federation.loop import Federation
from fedloom.pipeline import Pipeline
from fedloom.strategies.base import ServerState
from fedloom.strategies.fedavg import FedAvg

TASK = TaskSpec(kind="regression", input_shape=(3,), num_outputs=1, loss="mse", metrics=("mae", "loss"))


def _dataset(sizes: Sequence[int], dtype: torch.dtype = torch.float32) -> FederatedDataset:
    g = torch.Generator().manual_seed(0)
    clients = {}
    for i, n in enumerate(sizes):
        x = torch.randn(n, 3, generator=g, dtype=dtype)
        y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype) + 0.3 * i
        clients[f"c{i}"] = ClientData(train=Split(x, y), test=Split(x[:4], y[:4]))
    x = torch.randn(16, 3, generator=g, dtype=dtype)
    return FederatedDataset("toy", TASK, clients, server_test=Split(x, x @ torch.tensor([1.0, -2.0, 0.5], dtype=dtype)))


def _federation(ds: FederatedDataset, strategy, *, dtype=torch.float32, engine_cls=SequentialEngine, **kw) -> Federation:
    torch.manual_seed(0)

    def model_fn() -> nn.Module:
        return nn.Linear(3, 1).to(dtype)

    model = model_fn()
    spec = ParamSpec.from_module(model)
    engine = engine_cls(model_fn=model_fn, dataset=ds, spec=spec)
    return Federation(strategy=strategy, engine=engine, spec=spec, initial=spec.module_vector(model), **kw)


def test_one_client_full_batch_fedavg_equals_centralized_gradient_descent() -> None:
    ds = _dataset([40], dtype=torch.float64)
    train = TrainConfig(loss="mse", epochs=1, batch_size=40, lr=0.1)
    fed = _federation(ds, FedAvg(train=train, fraction=1.0), dtype=torch.float64)
    w0 = fed.state.params.clone()
    fed.run(5)
    # Centralized: 5 full-batch gradient steps on the same data.
    data = ds.clients["c0"].train
    w = w0.clone().requires_grad_()
    for _ in range(5):
        loss = F.mse_loss(data.x @ w[:3] + w[3], data.y)
        (gr,) = torch.autograd.grad(loss, (w,))
        w = (w - 0.1 * gr).detach().requires_grad_()
    torch.testing.assert_close(fed.state.params, w.detach(), rtol=0, atol=1e-14)
    assert fed.state.round == 5 and len(fed.history) == 5


def test_same_seed_same_config_gives_bit_identical_history() -> None:
    def go() -> tuple[list, torch.Tensor]:
        ds = _dataset([13, 7, 21, 9])
        s = FedAvg(train=TrainConfig(loss="mse", epochs=2, batch_size=4, lr=0.05, momentum=0.9), fraction=0.5, seed=3)
        fed = _federation(ds, s, evaluate=lambda v: {"norm": float(v.norm())}, federated_eval_every=2)
        h = fed.run(4)
        return [(r.round, r.clients, r.metrics, r.bytes_up, r.bytes_down) for r in h], fed.state.params

    (h1, p1), (h2, p2) = go(), go()
    assert h1 == h2
    assert torch.equal(p1, p2)
    assert {tuple(r[1]) for r in h1} != {tuple(h1[0][1])}, "different cohorts over rounds"
    assert all(len(r[1]) == 2 for r in h1)
    assert "fed_mae" in h1[1][2] and "fed_mae" not in h1[0][2]


class HostileEngine(SequentialEngine):
    """Corrupts some clients' updates the way a broken or malicious client would."""

    def run_cohort(self, global_vec: torch.Tensor, instructions: Sequence[ClientInstruction]) -> Iterator[ClientUpdate]:
        for u in super().run_cohort(global_vec, instructions):
            if u.client_id == "c0":
                yield replace(u, delta=torch.full_like(u.delta, float("nan")))
            elif u.client_id == "c1":
                yield replace(u, delta=u.delta[:-1])
            elif u.client_id == "c2":
                yield u
                yield u  # duplicate
            else:
                yield u
        yield ClientUpdate(client_id="intruder", round=1, delta=torch.zeros(self.spec.numel), num_examples=10)


def test_hostile_updates_are_rejected_and_the_round_goes_on() -> None:
    ds = _dataset([10, 10, 10, 10])
    train = TrainConfig(loss="mse", epochs=1, batch_size=5, lr=0.05)
    fed = _federation(ds, FedAvg(train=train, fraction=1.0), engine_cls=HostileEngine)
    honest = _federation(ds, FedAvg(train=train, fraction=1.0))
    rec = fed.step()
    assert rec.clients == ["c2", "c3"]
    assert set(rec.rejected) == {"c0", "c1", "c2", "intruder"}  # c2's second (duplicate) update
    assert "already answered" in rec.rejected["c2"]
    assert "NaN" in rec.rejected["c0"] and "shape" in rec.rejected["c1"]
    assert "cohort" in rec.rejected["intruder"]
    assert torch.isfinite(fed.state.params).all()
    # The accepted part equals FedAvg over the honest clients c2 and c3 alone.
    only = {k: v for k, v in ds.clients.items() if k in ("c2", "c3")}
    sub = _federation(FederatedDataset("toy", TASK, only, server_test=ds.server_test), FedAvg(train=train, fraction=1.0))
    sub.state = replace(sub.state, params=honest.state.params.clone())
    sub.step()
    assert torch.equal(fed.state.params, sub.state.params)


def test_too_few_updates_leaves_model_unchanged() -> None:
    ds = _dataset([10, 10])

    class AllBad(SequentialEngine):
        def run_cohort(self, g, instructions):  # type: ignore[no-untyped-def]
            for u in super().run_cohort(g, instructions):
                yield replace(u, num_examples=-1)

    fed = _federation(ds, FedAvg(train=TrainConfig(loss="mse"), fraction=1.0), engine_cls=AllBad)
    before = fed.state.params.clone()
    rec = fed.step()
    assert rec.status == "insufficient" and rec.clients == []
    assert torch.equal(fed.state.params, before) and fed.state.round == 1


def test_aggregate_carries_the_number_of_available_clients() -> None:
    """The loop sets ``Aggregate.num_available`` (SCAFFOLD's N) from the attempt's selection."""
    seen: list[tuple[int | None, int]] = []

    class Recording(FedAvg):
        def apply(self, state: ServerState, aggregate: Aggregate) -> ServerState:
            seen.append((aggregate.num_available, aggregate.num_clients))
            return super().apply(state, aggregate)

    fed = _federation(_dataset([10, 10, 10, 10]), Recording(train=TrainConfig(loss="mse"), fraction=0.5))
    fed.run(2)
    assert seen == [(4, 2), (4, 2)]


def test_bytes_are_counted() -> None:
    ds = _dataset([10, 10, 10])
    fed = _federation(ds, FedAvg(train=TrainConfig(loss="mse"), fraction=1.0))
    rec = fed.step()
    assert rec.bytes_down == 3 * 4 * 4 and rec.bytes_up == 3 * 4 * 4


@pytest.mark.parametrize("bad", [0, -1])
def test_eval_every_must_be_positive_in_config(bad: int) -> None:
    from fedloom.core.config import parse_config
    from fedloom.core.errors import ConfigError

    with pytest.raises(ConfigError, match="run.eval_every"):
        parse_config({"run": {"eval_every": bad}, "data": {"name": "x"}, "model": {"name": "y"}})


class CorruptingEngine(SequentialEngine):
    """Mangles encoded payloads the ways a broken or hostile client could."""

    def run_cohort(self, global_vec, instructions, **kw):  # type: ignore[no-untyped-def]
        for u in super().run_cohort(global_vec, instructions):
            p = u.payload
            assert p is not None and p.codec == "qsgd"
            t = dict(p.tensors)
            if u.client_id == "c0":  # truncated
                yield replace(u, payload=replace(p, tensors={**t, "codes": t["codes"][:-1]}))
            elif u.client_id == "c1":  # claims another codec
                yield replace(u, payload=replace(p, codec="topk"))
            elif u.client_id == "c2":  # a scale that is not finite
                yield replace(u, payload=replace(p, tensors={**t, "scales": torch.full_like(t["scales"], float("inf"))}))
            elif u.client_id == "c3":  # a size beyond what the codec produces
                yield replace(u, payload=replace(p, tensors={**t, "codes": torch.zeros(10**6, dtype=torch.uint8)}))
            else:
                yield u


def test_malformed_payloads_are_rejected_naming_the_stage_and_the_round_goes_on() -> None:
    ds = _dataset([10, 10, 10, 10, 10])
    train = TrainConfig(loss="mse", epochs=1, batch_size=5, lr=0.05)
    pipe = Pipeline((QSGD(bits=4, bucket=2),))
    fed = _federation(ds, FedAvg(train=train, fraction=1.0), engine_cls=CorruptingEngine, pipeline=pipe)
    before = fed.state.params.clone()
    rec = fed.step()
    assert rec.status == "ok" and rec.clients == ["c4"]
    assert set(rec.rejected) == {"c0", "c1", "c2", "c3"}
    assert all(r.startswith("stage 'qsgd': ") for r in rec.rejected.values()), rec.rejected
    assert "truncated or mis-sized" in rec.rejected["c0"] and "truncated or mis-sized" in rec.rejected["c3"]
    assert "codec is 'topk'" in rec.rejected["c1"] and "NaN or Inf" in rec.rejected["c2"]
    # the model moved by c4's update alone, and it is finite
    assert torch.isfinite(fed.state.params).all() and not torch.equal(fed.state.params, before)
    # bytes: what each client's payload cost as sent (4 honest-sized payloads + one of 10**6 codes)
    assert rec.bytes_up > 10**6


def test_a_robust_rule_with_too_few_updates_makes_the_round_insufficient_not_the_run_fail() -> None:
    """Krum with f=1 needs n > 2f+2 = 4: a NaN update dropped from a cohort of 5 leaves 4."""
    from fedloom.strategies.robust import Krum

    class NaNFromC0(SequentialEngine):
        def run_cohort(self, global_vec, instructions, **kw):  # type: ignore[no-untyped-def]
            for up in super().run_cohort(global_vec, instructions, **kw):
                yield replace(up, delta=torch.full_like(up.delta, float("nan"))) if up.client_id == "c0" else up

    ds = _dataset([8, 8, 8, 8, 8])
    fed = _federation(ds, Krum(train=TrainConfig(loss="mse", lr=0.05), fraction=1.0, f=1), engine_cls=NaNFromC0)
    w0 = fed.state.params.clone()
    h = fed.run(2)
    assert [r.status for r in h] == ["insufficient", "insufficient"]
    assert h[0].reason == "Krum with f=1 needs more than 2f+2=4 updates, got 4"
    assert "c0" in h[0].rejected
    assert torch.equal(fed.state.params, w0) and fed.state.round == 2
