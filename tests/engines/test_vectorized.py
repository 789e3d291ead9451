"""The vectorized engine yields the sequential engine's updates (float32 rounding aside)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedloom.core.keys import CLIENT_CONTROL, CONTROL_DELTA, SERVER_CONTROL
from fedloom.core.params import ParamSpec
from fedloom.core.types import ComponentSpec, ClientInstruction, ClientUpdate, TrainConfig
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec
from fedloom.engines import SequentialEngine, VectorizedEngine
from fedloom.engines.base import Engine
from fedloom.federation import Federation
from fedloom.models import MLP, McMahanCNN
from fedloom.run import build_engine
from fedloom.strategies import FedAvg
from _models import Branchy, Residual

SIZES = (23, 7, 3, 40)  # unequal; client 2 is smaller than one batch of 5
CLASSIFY = TaskSpec(kind="classification", input_shape=(6,), num_outputs=3, loss="cross_entropy", metrics=("accuracy",))


def _dataset(task: TaskSpec = CLASSIFY, sizes: tuple[int, ...] = SIZES, seed: int = 0) -> FederatedDataset:
    g = torch.Generator().manual_seed(seed)
    clients = {}
    for i, n in enumerate(sizes):
        x = torch.randn(n, *task.input_shape, generator=g)
        if task.kind == "classification":
            y = torch.randint(0, task.num_outputs, (n,), generator=g)
        elif task.kind == "binary":
            y = (torch.rand(n, generator=g) < 0.4).float()
        else:
            y = torch.randn(n, generator=g)
        clients[f"c{i}"] = ClientData(Split(x, y))
    return FederatedDataset("toy", task, clients)


def _engines(
    model_fn: Callable[[], nn.Module], data: FederatedDataset, **kw: object
) -> tuple[Engine, VectorizedEngine, torch.Tensor]:
    torch.manual_seed(0)
    model = model_fn()
    spec = ParamSpec.from_module(model)
    seq = SequentialEngine(model_fn=model_fn, dataset=data, spec=spec)
    vec = VectorizedEngine(model_fn=model_fn, dataset=data, spec=spec, **kw)  # type: ignore[arg-type]
    return seq, vec, spec.module_vector(model)


def _instructions(
    data: FederatedDataset, cfg: TrainConfig, rnd: int = 1, payload: dict | None = None, transforms: tuple = ()
) -> list[ClientInstruction]:
    return [
        ClientInstruction(
            round=rnd, client_id=cid, train=cfg, seed=100 * rnd + i, payload=payload or {}, transforms=transforms
        )
        for i, cid in enumerate(data.client_ids)
    ]


def _close(actual: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> None:
    """Within 1e-5 relative, or 1e-6 of ``scale`` (at least the largest expected value) absolute.

    A delta is a difference of parameters, so float32 rounds it to about one ulp of the
    PARAMETERS: pass their magnitude as ``scale`` (and divide it by K·lr for SCAFFOLD's
    control deltas, which are deltas over K·lr).
    """
    scale = max(scale, float(expected.abs().max())) or 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * scale)


def _by_client(vec: list[ClientUpdate], seq: list[ClientUpdate]) -> list[tuple[ClientUpdate, ClientUpdate]]:
    """The two engines' updates paired by client: the sequential engine yields them in cohort
    order, the vectorized one chunk by chunk (clients grouped by size, most examples first)."""
    assert sorted(u.client_id for u in vec) == sorted(u.client_id for u in seq)
    assert len({u.client_id for u in vec}) == len(vec)
    by_id = {u.client_id: u for u in vec}
    return [(by_id[s.client_id], s) for s in seq]


def _assert_same(vec: list[ClientUpdate], seq: list[ClientUpdate], g: torch.Tensor, *, lr: float = 1.0) -> None:
    magnitude = float(g.abs().max())
    for v, s in _by_client(vec, seq):
        assert (v.num_examples, v.num_steps, v.round) == (s.num_examples, s.num_steps, s.round), v.client_id
        _close(v.delta, s.delta, magnitude)
        assert v.metrics.keys() == s.metrics.keys()
        assert v.metrics["train_loss"] == pytest.approx(s.metrics["train_loss"], rel=1e-5)
        assert v.extras.keys() == s.extras.keys()
        for k in s.extras:
            _close(v.extras[k], s.extras[k], magnitude / (s.num_steps * lr))


def _compare(
    model_fn: Callable[[], nn.Module],
    cfg: TrainConfig,
    data: FederatedDataset | None = None,
    transforms: tuple = (),
    **kw: object,
) -> VectorizedEngine:
    data = data or _dataset()
    seq, vec, g = _engines(model_fn, data, **kw)
    ins = _instructions(data, cfg, transforms=transforms)
    _assert_same(list(vec.run_cohort(g, ins)), list(seq.run_cohort(g, ins)), g)
    return vec


def _mlp(**kw: object) -> Callable[[], nn.Module]:
    return lambda: MLP(6, (16, 8), 3, **kw)  # type: ignore[arg-type]


PROX = (ComponentSpec.of("proximal", mu=0.5),)


@pytest.mark.parametrize(
    ("cfg", "transforms"),
    [
        (TrainConfig(epochs=2, batch_size=5, lr=0.1), ()),
        (TrainConfig(epochs=2, batch_size=5, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), ()),
        (TrainConfig(epochs=2, batch_size=5, lr=0.05, momentum=0.8, weight_decay=0.001), ()),
        (TrainConfig(epochs=2, batch_size=5, lr=0.01, optimizer="adam", weight_decay=0.01), ()),
        (TrainConfig(epochs=2, batch_size=5, lr=0.1), PROX),
        (TrainConfig(epochs=2, batch_size=5, lr=0.05, momentum=0.9), PROX),
        (TrainConfig(epochs=3, batch_size=5, lr=0.1, max_steps=4), ()),
    ],
    ids=["sgd", "nesterov-wd", "momentum-wd", "adam", "fedprox", "fedprox-momentum", "max_steps"],
)
def test_mlp_matches_sequential(cfg: TrainConfig, transforms: tuple) -> None:
    vec = _compare(_mlp(), cfg, transforms=transforms)
    assert vec.mode == "lowered"


@pytest.mark.parametrize(
    ("kind", "loss"), [("binary", "bce"), ("regression", "mse"), ("regression", "l1"), ("regression", "huber")]
)
def test_losses_match_sequential(kind: str, loss: str) -> None:
    task = TaskSpec(kind=kind, input_shape=(6,), num_outputs=1, loss=loss, metrics=("loss",))  # type: ignore[arg-type]
    cfg = TrainConfig(epochs=2, batch_size=5, lr=0.05, loss=loss)  # type: ignore[arg-type]
    _compare(lambda: MLP(6, (8,), 1), cfg, _dataset(task))


def test_batchnorm_mlp_matches_sequential() -> None:
    data = _dataset(sizes=(23, 7, 12, 40))  # ragged last batches of 3, 2, 2 samples (BatchNorm needs 2)
    vec = _compare(_mlp(batchnorm=True), TrainConfig(epochs=2, batch_size=5, lr=0.05, momentum=0.9), data)
    assert vec.mode == "lowered"


def _conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(36, 3),
    )


def test_conv_batchnorm2d_matches_sequential() -> None:
    task = TaskSpec(
        kind="classification", input_shape=(1, 6, 6), num_outputs=3, loss="cross_entropy", metrics=("accuracy",)
    )
    # A one-sample client is fine for BatchNorm2d: its statistics run over 6 x 6 positions.
    vec = _compare(_conv_bn, TrainConfig(epochs=2, batch_size=5, lr=0.05), _dataset(task, sizes=(23, 7, 1, 12)))
    assert vec.mode == "lowered"


def test_mcmahan_cnn_matches_sequential() -> None:
    task = TaskSpec(
        kind="classification", input_shape=(784,), num_outputs=10, loss="cross_entropy", metrics=("accuracy",)
    )
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.05, momentum=0.5)
    vec = _compare(McMahanCNN, cfg, _dataset(task, sizes=(9, 5, 3)))
    assert vec.mode == "lowered"


def test_scaffold_two_rounds_with_client_state() -> None:
    data = _dataset()
    seq, vec, g = _engines(_mlp(), data)
    cfg = TrainConfig(epochs=1, batch_size=5, lr=0.05)
    c = torch.zeros_like(g)
    for rnd in (1, 2):
        ins = _instructions(data, cfg, rnd, {SERVER_CONTROL: c}, (ComponentSpec("scaffold"),))
        s_up, v_up = list(seq.run_cohort(g, ins)), list(vec.run_cohort(g, ins))
        _assert_same(v_up, s_up, g, lr=cfg.lr)
        for cid in data.client_ids:
            expected = seq.client_states.get(cid)[CLIENT_CONTROL]
            _close(vec.client_states.get(cid)[CLIENT_CONTROL], expected, float(g.abs().max()) / cfg.lr)
        g = g + torch.stack([u.delta for u in s_up]).mean(0)
        c = c + torch.stack([u.extras[CONTROL_DELTA] for u in s_up]).mean(0)
    assert len(vec.client_states) == len(data.client_ids)


class _Tied(Residual):
    """A chain that applies ``b`` twice: its weight gradient sums two uses (no fused update)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.b(torch.relu(self.a(x)))))))


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain-sgd-fused", "momentum"])
def test_weight_used_twice_matches_sequential(momentum: float) -> None:
    vec = _compare(_Tied, TrainConfig(epochs=2, batch_size=5, lr=0.05, momentum=momentum))
    assert vec.mode == "lowered"


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["plain-sgd", "momentum"])
def test_generic_torch_func_path_matches_sequential(momentum: float) -> None:
    vec = _compare(Residual, TrainConfig(epochs=2, batch_size=5, lr=0.05, momentum=momentum))
    assert vec.mode == "vmap"


def test_unvectorizable_model_falls_back_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    data = _dataset()
    with caplog.at_level(logging.WARNING, logger="fedloom.engines.vectorized"):
        seq, vec, g = _engines(Branchy, data)
        ins = _instructions(data, TrainConfig(epochs=1, batch_size=5, lr=0.05))
        v_up, s_up = list(vec.run_cohort(g, ins)), list(seq.run_cohort(g, ins))
        list(vec.run_cohort(g, ins))
    warnings = [r for r in caplog.records if r.name == "fedloom.engines.vectorized"]
    assert len(warnings) == 1 and "sequentially" in warnings[0].getMessage()
    assert vec.mode == "sequential" and vec.fallback_reason
    for v, s in zip(v_up, s_up, strict=True):
        assert torch.equal(v.delta, s.delta)


def test_chunking_does_not_change_updates() -> None:
    data = _dataset()
    _, whole, g = _engines(_mlp(), data)
    _, chunked, _ = _engines(_mlp(), data, chunk_size=3)
    ins = _instructions(data, TrainConfig(epochs=1, batch_size=5, lr=0.1, momentum=0.9))
    _assert_same(list(chunked.run_cohort(g, ins)), list(whole.run_cohort(g, ins)), g)
    cfg = ins[0].train
    small = VectorizedEngine(model_fn=_mlp(), dataset=data, spec=whole.spec, memory_budget_bytes=1)
    assert small.chunk_size_for(cfg) == 1 and whole.chunk_size_for(cfg) >= len(SIZES)


def test_dropout_is_reproducible_and_independent_per_client() -> None:
    data = _dataset(sizes=(20, 20))
    _, a, g = _engines(_mlp(dropout=0.5), data)
    _, b, _ = _engines(_mlp(dropout=0.5), data)
    cfg = TrainConfig(batch_size=5, lr=0.1)
    ins = [ClientInstruction(round=1, client_id=cid, train=cfg, seed=7) for cid in data.client_ids]
    ua, ub = list(a.run_cohort(g, ins)), list(b.run_cohort(g, ins))
    for x, y in zip(ua, ub, strict=True):
        assert torch.equal(x.delta, y.delta)
    # Same seed, different data: different updates; with identical data the masks must still differ.
    same = FederatedDataset("twins", CLASSIFY, {"a": data.clients["c0"], "b": data.clients["c0"]})
    _, twins, _ = _engines(_mlp(dropout=0.5), same)
    ins = [ClientInstruction(round=1, client_id=cid, train=cfg, seed=7) for cid in ("a", "b")]
    da, db = (u.delta for u in twins.run_cohort(g, ins))
    assert not torch.equal(da, db)


def test_builder_registers_vectorized_and_auto() -> None:
    data = _dataset()
    spec = ParamSpec.from_module(_mlp()())
    named = build_engine("vectorized", model_fn=_mlp(), dataset=data, spec=spec, device="cpu")
    assert isinstance(named, VectorizedEngine)
    assert isinstance(build_engine("auto", model_fn=_mlp(), dataset=data, spec=spec, device="cpu"), VectorizedEngine)
    branchy = ParamSpec.from_module(Branchy())
    auto = build_engine("auto", model_fn=Branchy, dataset=data, spec=branchy, device="cpu")
    assert isinstance(auto, SequentialEngine)


def test_federation_runs_identically_on_both_engines() -> None:
    data = _dataset()
    finals = []
    for engine_cls in (SequentialEngine, VectorizedEngine):
        torch.manual_seed(0)
        model = _mlp(batchnorm=False)()
        spec = ParamSpec.from_module(model)
        strategy = FedAvg(train=TrainConfig(epochs=2, batch_size=5, lr=0.05, momentum=0.9), fraction=0.75, seed=3)
        engine = engine_cls(model_fn=_mlp(), dataset=data, spec=spec)
        fed = Federation(strategy=strategy, engine=engine, spec=spec, initial=spec.module_vector(model))
        history = fed.run(3)
        finals.append((fed.state.params, [r.clients for r in history], [r.metrics["train_loss"] for r in history]))
    (p_seq, c_seq, l_seq), (p_vec, c_vec, l_vec) = finals
    assert c_seq == c_vec
    _close(p_vec, p_seq, float(p_seq.abs().max()))
    assert l_vec == pytest.approx(l_seq, rel=1e-5)


def test_chunk_size_from_config_changes_nothing_but_the_chunking() -> None:
    from fedloom.core.config import parse_config
    from fedloom.run import build_run

    def final(chunk: int | None) -> torch.Tensor:
        cfg = {
            "run": {"rounds": 2, "seed": 3, "engine": "vectorized", "chunk_size": chunk},
            "data": {"name": "equipment"},
            "model": {"name": "mlp", "hidden": [16]},
            "strategy": {"name": "fedavg", "fraction": 1.0},
            "client": {"epochs": 1, "batch_size": 64, "lr": 0.05, "max_steps": 10},
        }
        run = build_run(parse_config(cfg))
        if chunk is not None:
            assert run.engine.chunk_size == chunk
        run.federation.run(2)
        return run.federation.state.params

    torch.testing.assert_close(final(1), final(None), rtol=1e-5, atol=1e-6)


def test_auto_probes_the_lockstep_program_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import fedloom.engines.vectorized as vmod
    from fedloom.engines.vectorized import local_engine

    calls = []
    real = vmod.lockstep_program
    monkeypatch.setattr(vmod, "lockstep_program", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = _dataset()
    spec = ParamSpec.from_module(_mlp()())
    eng = local_engine("auto", model_fn=_mlp(), dataset=data, spec=spec)
    assert isinstance(eng, VectorizedEngine) and eng.mode == "lowered" and len(calls) == 1
    assert isinstance(local_engine("sequential", model_fn=_mlp(), dataset=data, spec=spec), SequentialEngine)
    assert len(calls) == 1
