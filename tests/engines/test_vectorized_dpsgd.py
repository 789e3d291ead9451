"""DP-SGD in the vectorized engine gives the sequential (Opacus) engine's updates, noise included."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedloom.client.dpsgd import poisson_batches
from fedloom.core.errors import ConfigError
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, ClientUpdate, ComponentSpec, TrainConfig
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec
from fedloom.engines import SequentialEngine, VectorizedEngine
from fedloom.models import MLP
from fedloom.models.registry import build_model
from _models import Residual

SIZES = (23, 7, 3, 40)  # different n: different q, different numbers of steps


def _dataset(sizes: tuple[int, ...] = SIZES, d: int = 6, classes: int = 3, seed: int = 0) -> FederatedDataset:
    task = TaskSpec(
        kind="classification", input_shape=(d,), num_outputs=classes, loss="cross_entropy", metrics=("accuracy",)
    )
    g = torch.Generator().manual_seed(seed)
    clients = {
        f"c{i}": ClientData(Split(torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)))
        for i, n in enumerate(sizes)
    }
    return FederatedDataset("toy", task, clients)


def _run(
    model_fn: Callable[[], nn.Module], data: FederatedDataset, cfg: TrainConfig, transforms: tuple = (), **kw: object
) -> tuple[list[ClientUpdate], list[ClientUpdate], VectorizedEngine]:
    torch.manual_seed(0)
    model = model_fn()
    spec = ParamSpec.from_module(model)
    g = spec.module_vector(model)
    seq = SequentialEngine(model_fn=model_fn, dataset=data, spec=spec)
    vec = VectorizedEngine(model_fn=model_fn, dataset=data, spec=spec, **kw)  # type: ignore[arg-type]
    ins = [
        ClientInstruction(round=1, client_id=cid, train=cfg, seed=100 + i, transforms=transforms)
        for i, cid in enumerate(data.client_ids)
    ]
    return list(seq.run_cohort(g, ins)), list(vec.run_cohort(g, ins)), vec


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def _assert_same(seq: list[ClientUpdate], vec: list[ClientUpdate], tol: float = 1e-5) -> None:
    # paired by client: the vectorized engine yields chunk by chunk (clients by size, most examples first)
    assert sorted(u.client_id for u in vec) == sorted(u.client_id for u in seq) and len(vec) == len(seq)
    by_id = {u.client_id: u for u in vec}
    for s, v in ((s, by_id[s.client_id]) for s in seq):
        assert (v.num_examples, v.num_steps) == (s.num_examples, s.num_steps), s.client_id
        assert _rel(v.delta, s.delta) <= tol, (s.client_id, _rel(v.delta, s.delta))
        assert v.metrics["train_loss"] == pytest.approx(s.metrics["train_loss"], rel=1e-5)


def _mlp() -> nn.Module:
    return MLP(6, (16, 8), 3)


PROX = (ComponentSpec.of("proximal", mu=0.5),)
OPTIMIZERS = {
    "sgd": {"lr": 0.1},
    "momentum": {"lr": 0.05, "momentum": 0.9},
    "adam": {"lr": 0.01, "optimizer": "adam"},
}


@pytest.mark.parametrize("sigma", [0.0, 1.0], ids=["no-noise", "noise"])
@pytest.mark.parametrize(
    ("opt", "transforms"),
    [("sgd", ()), ("momentum", ()), ("adam", ()), ("sgd", PROX), ("momentum", PROX)],
    ids=["sgd", "momentum", "adam", "fedprox", "fedprox-momentum"],
)
def test_mlp_matches_sequential(opt: str, transforms: tuple, sigma: float) -> None:
    cfg = TrainConfig(epochs=2, batch_size=5, dp_clip_norm=0.5, dp_noise_multiplier=sigma, **OPTIMIZERS[opt])  # type: ignore[arg-type]
    seq, vec, engine = _run(_mlp, _dataset(), cfg, transforms)
    assert engine.mode == "lowered"
    assert [u.num_steps for u in seq] == [10, 4, 2, 16]
    _assert_same(seq, vec)


@pytest.mark.parametrize("sigma", [0.0, 1.0], ids=["no-noise", "noise"])
def test_mcmahan_2nn_matches_sequential(sigma: float) -> None:
    data = _dataset((30, 12, 50), d=784, classes=10)
    # lr = 1: in float32 a delta is only known to about one ulp of the PARAMETERS (~1e-8
    # here), so a tiny delta (lr = 0.05: ~3e-3) cannot match to 1e-5 of itself.
    cfg = TrainConfig(epochs=1, batch_size=10, lr=1.0, dp_clip_norm=1.0, dp_noise_multiplier=sigma)
    seq, vec, _ = _run(lambda: build_model("2nn", data.task), data, cfg)
    _assert_same(seq, vec)


@pytest.mark.parametrize("sigma", [0.0, 1.0], ids=["no-noise", "noise"])
def test_mcmahan_2nn_matches_sequential_to_float64_rounding(sigma: float) -> None:
    data = _dataset((30, 12, 50), d=784, classes=10)
    data = FederatedDataset(
        "toy64", data.task, {c: ClientData(Split(v.train.x.double(), v.train.y)) for c, v in data.clients.items()}
    )
    cfg = TrainConfig(epochs=1, batch_size=10, lr=0.05, momentum=0.5, dp_clip_norm=1.0, dp_noise_multiplier=sigma)
    seq, vec, _ = _run(lambda: build_model("2nn", data.task).double(), data, cfg)
    _assert_same(seq, vec, tol=1e-12)


def test_empty_batches_and_a_torch_func_model_match_sequential() -> None:
    data = _dataset((5, 8, 3))
    cfg = TrainConfig(epochs=1, batch_size=1, lr=0.1, momentum=0.5, dp_clip_norm=1.0, dp_noise_multiplier=1.0)
    batches = [poisson_batches(n, cfg, 100 + i) for i, n in enumerate((5, 8, 3))]
    assert any(len(b) == 0 for bs in batches for b in bs)  # q = 1/n: some steps draw nobody
    # ... and at some step no active client draws anybody (the chunk's batch is empty).
    assert any(all(len(bs[t]) == 0 for bs in batches if len(bs) > t) for t in range(8))
    seq, vec, engine = _run(_mlp, data, cfg)
    _assert_same(seq, vec)
    seq, vec, engine = _run(Residual, _dataset(), TrainConfig(epochs=1, batch_size=5, lr=0.1, dp_clip_norm=0.5, dp_noise_multiplier=1.0))
    assert engine.mode == "vmap"
    _assert_same(seq, vec)


def test_noise_follows_the_client_not_the_chunk() -> None:
    cfg = TrainConfig(epochs=2, batch_size=5, lr=0.1, dp_clip_norm=0.5, dp_noise_multiplier=1.0)
    seq, whole, _ = _run(_mlp, _dataset(), cfg)
    _, chunked, engine = _run(_mlp, _dataset(), cfg, chunk_size=1)
    assert engine.chunk_size == 1
    _assert_same(seq, chunked)
    for a, b in zip(whole, chunked, strict=True):
        assert _rel(a.delta, b.delta) <= 1e-5
    quiet = TrainConfig(epochs=2, batch_size=5, lr=0.1, dp_clip_norm=0.5)
    _, silent, _ = _run(_mlp, _dataset(), quiet)
    assert all(_rel(a.delta, b.delta) > 0.1 for a, b in zip(whole, silent, strict=True))  # the noise is there


def test_a_batchnorm_model_is_refused() -> None:
    data = _dataset()
    spec = ParamSpec.from_module(MLP(6, (8,), 3, batchnorm=True))
    engine = VectorizedEngine(model_fn=lambda: MLP(6, (8,), 3, batchnorm=True), dataset=data, spec=spec)
    assert engine.mode == "lowered"
    cfg = TrainConfig(batch_size=5, dp_clip_norm=1.0)
    ins = [ClientInstruction(round=1, client_id=c, train=cfg, seed=0) for c in data.client_ids]
    with pytest.raises(ConfigError, match="BatchNorm") as err:
        list(engine.run_cohort(spec.module_vector(MLP(6, (8,), 3, batchnorm=True)), ins))
    assert err.value.key == "client.dp_clip_norm"


def test_chunk_size_accounts_for_per_sample_gradients() -> None:
    data = _dataset()
    spec = ParamSpec.from_module(_mlp())
    engine = VectorizedEngine(model_fn=_mlp, dataset=data, spec=spec, memory_budget_bytes=2**34)
    plain = TrainConfig(batch_size=64)
    dp = TrainConfig(batch_size=64, dp_clip_norm=1.0)
    p = sum(e.numel for e in spec.entries if e.trainable)
    per_plain = 2**34 / engine.chunk_size_for(plain)  # bytes per client (the budget is large: little rounding)
    per_dp = 2**34 / engine.chunk_size_for(dp)
    # B + 3·sqrt(B) = 88 samples of P gradients (and inputs) each, in float32.
    assert per_dp - per_plain == pytest.approx(88 * (p + 6) * 4, rel=1e-3)
