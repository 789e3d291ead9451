"""The vectorized engine's device support on CPU: resident data, precision modes, chunk sizing, graphed steps."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

from fedloom.core.config import parse_config
from fedloom.core.errors import ConfigError
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, ComponentSpec, TrainConfig
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec
from fedloom.engines import VectorizedEngine
from fedloom.engines._device import (
    DEVICE_MEMORY_FRACTION,
    EagerGraphBackend,
    GraphedStep,
    ResidentData,
    check_precision,
    chunk_size_from_free,
    precision_scope,
)
from fedloom.engines.vectorized import _BatchPlan, local_engine
from fedloom.models import MLP, McMahanCNN

CLASSIFY = TaskSpec(kind="classification", input_shape=(6,), num_outputs=3, loss="cross_entropy", metrics=("accuracy",))
IMAGES = TaskSpec(kind="classification", input_shape=(1, 28, 28), num_outputs=10, loss="cross_entropy", metrics=("accuracy",))


def _dataset(sizes: tuple[int, ...] = (23, 7, 3, 40, 15), seed: int = 0) -> FederatedDataset:
    g = torch.Generator().manual_seed(seed)
    clients = {
        f"c{i}": ClientData(Split(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)))
        for i, n in enumerate(sizes)
    }
    return FederatedDataset("toy", CLASSIFY, clients)


def _images(sizes: tuple[int, ...], seed: int, noise: float = 0.6) -> tuple[FederatedDataset, Split]:
    """Ten learnable classes of 28x28 images: a fixed random template per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(99))

    def draw(n: int) -> Split:
        y = torch.randint(0, 10, (n,), generator=g)
        return Split(templates[y] + noise * torch.randn(n, 1, 28, 28, generator=g), y)

    clients = {f"c{i}": ClientData(draw(n)) for i, n in enumerate(sizes)}
    return FederatedDataset("blobs", IMAGES, clients), draw(300)


def _mlp() -> nn.Module:
    return MLP(6, (16, 8), 3)


def _setup(model_fn: Callable[[], nn.Module]) -> tuple[ParamSpec, torch.Tensor]:
    torch.manual_seed(0)
    model = model_fn()
    spec = ParamSpec.from_module(model)
    return spec, spec.module_vector(model)


def _instructions(data: FederatedDataset, cfg: TrainConfig, rnd: int = 1, transforms: tuple = ()) -> list[ClientInstruction]:
    return [
        ClientInstruction(round=rnd, client_id=cid, train=cfg, seed=100 * rnd + i, transforms=transforms)
        for i, cid in enumerate(data.client_ids)
    ]


def _deltas(engine: VectorizedEngine, g: torch.Tensor, ins: list[ClientInstruction]) -> torch.Tensor:
    return torch.stack([u.delta for u in engine.run_cohort(g, ins)])


# ----------------------------------------------------------------- resident data
@pytest.mark.parametrize(
    ("cfg", "transforms"),
    [
        (TrainConfig(epochs=2, batch_size=5, lr=0.1), ()),
        (TrainConfig(epochs=2, batch_size=5, lr=0.01, optimizer="adam"), ()),
        (TrainConfig(epochs=2, batch_size=5, lr=0.05, momentum=0.9), (ComponentSpec.of("proximal", mu=0.5),)),
        (TrainConfig(epochs=1, batch_size=5, lr=0.1, dp_clip_norm=0.5, dp_noise_multiplier=0.7), ()),
    ],
    ids=["sgd", "adam", "fedprox-momentum", "dpsgd"],
)
def test_resident_data_gives_bit_identical_updates(cfg: TrainConfig, transforms: tuple) -> None:
    """Indexing the engine's one resident copy == concatenating each chunk's splits (the former path)."""
    data = _dataset()
    spec, g = _setup(_mlp)
    resident = VectorizedEngine(model_fn=_mlp, dataset=data, spec=spec, chunk_size=2)
    per_chunk = VectorizedEngine(model_fn=_mlp, dataset=data, spec=spec, chunk_size=2)
    per_chunk._data = None  # forces the per-chunk concatenation
    assert resident._data is not None and resident._data.x.shape[0] == sum(len(c.train) for c in data.clients.values())
    ins = _instructions(data, cfg, transforms=transforms)
    assert torch.equal(_deltas(resident, g, ins), _deltas(per_chunk, g, ins))


def _reference_index(splits_len: list[int], orders: list[list[torch.Tensor]], b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The former per-step loop over a chunk's concatenated splits (offsets in row order)."""
    rows = sorted(range(len(orders)), key=lambda i: -len(orders[i]))
    horizon = len(orders[rows[0]])
    index = torch.zeros(horizon, len(rows), b, dtype=torch.long)
    counts = torch.zeros(horizon, len(rows), dtype=torch.long)
    offset = 0
    for r, i in enumerate(rows):
        for t, batch in enumerate(orders[i]):
            index[t, r, : len(batch)] = batch + offset
            index[t, r, len(batch) :] = (batch[0] if len(batch) else 0) + offset
            counts[t, r] = len(batch)
        offset += splits_len[i]
    return index, counts


def test_batch_plan_indexes_the_same_samples_as_the_former_loop() -> None:
    g = torch.Generator().manual_seed(3)
    sizes = [9, 4, 13, 1]
    # Poisson-like batches: varying sizes, some empty
    orders = [
        [torch.randperm(n, generator=g)[: int(torch.randint(0, min(n, 5) + 1, (), generator=g))] for _ in range(steps)]
        for n, steps in zip(sizes, (3, 5, 5, 2), strict=True)
    ]
    b = max(1, max(len(x) for o in orders for x in o))
    xs = [torch.randn(n, 2, generator=g) for n in sizes]
    split_x = torch.cat(xs)
    data = ResidentData(x=split_x, y=torch.arange(len(split_x)), offsets={}, sizes={})
    offsets = [0, 9, 13, 26]
    plan = _BatchPlan.build(data, offsets, orders, b, torch.device("cpu"), torch.float32)
    ref_index, ref_counts = _reference_index(sizes, orders, b)
    # the former plan indexed the chunk's splits concatenated in row order: compare the samples
    rows_concat = torch.cat([xs[i] for i in plan.rows])
    for t, ka in enumerate(plan.active):  # the rows that step at t (the others are never read)
        assert torch.equal(plan.x[plan.index[t, :ka]], rows_concat[ref_index[t, :ka]])
    assert torch.equal(plan.counts.long(), ref_counts)
    assert plan.full == [a == len(sizes) and all(c == b for c in cl) for a, cl in zip(plan.active, plan.count_lists)]


# ----------------------------------------------------------------- precision
def test_precision_errors_name_the_key() -> None:
    assert check_precision("bf16") == "bf16"
    for bad in ("fp16", "BF16", 16, None):
        with pytest.raises(ConfigError) as err:
            check_precision(bad)
        assert err.value.key == "run.precision"
    data = _dataset()
    spec, _ = _setup(_mlp)
    with pytest.raises(ConfigError) as err:
        VectorizedEngine(model_fn=_mlp, dataset=data, spec=spec, precision="half")
    assert err.value.key == "run.precision"
    with pytest.raises(ConfigError) as err:
        local_engine("sequential", model_fn=_mlp, dataset=data, spec=spec, precision="fp64")
    assert err.value.key == "run.precision"
    with pytest.raises(ConfigError) as err:
        VectorizedEngine(model_fn=_mlp, dataset=data, spec=spec, cuda_graphs="yes")  # type: ignore[arg-type]
    assert err.value.key == "run.cuda_graphs"


def test_precision_config_keys() -> None:
    base = {"data": {"name": "mnist"}, "model": {"name": "2nn"}}
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "run": {"precision": "fp16"}})
    assert err.value.key == "run.precision"
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "run": {"cuda_graphs": "sometimes"}})
    assert err.value.key == "run.cuda_graphs"
    default = parse_config(base)
    assert (default.run.precision, default.run.cuda_graphs) == ("fp32", False)
    # fp32 runs keep their identity; CUDA graphs change no result; bf16 does
    assert parse_config({**base, "run": {"precision": "fp32", "cuda_graphs": True}}).identity() == default.identity()
    assert parse_config({**base, "run": {"precision": "bf16"}}).identity() != default.identity()


def test_tf32_switches_are_cuda_only_and_restored() -> None:
    assert precision_scope("tf32", torch.device("cpu")).__class__.__name__ == "nullcontext"
    # The switches are process-wide: check nesting and restoring in a fresh interpreter.
    code = """
import torch
from fedloom.engines._device import _tf32, _tf32_get
before = _tf32_get()
with _tf32(True):
    on = _tf32_get()
    with _tf32(True):
        pass
    assert _tf32_get() == on, "an inner scope restored too early"
assert _tf32_get() == before, (before, _tf32_get())
with _tf32(False):
    off = _tf32_get()
assert on != off and _tf32_get() == before
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def _accuracy(model_fn: Callable[[], nn.Module], spec: ParamSpec, vec: torch.Tensor, test: Split) -> float:
    model = model_fn()
    spec.load_into(model, vec)
    model.eval()
    with torch.no_grad():
        return float((model(test.x).argmax(1) == test.y).float().mean())


def test_bf16_training_lands_within_tolerance_of_fp32() -> None:
    """A few FedAvg rounds of the McMahan CNN under bf16 autocast (CPU) reach fp32's accuracy and weights."""
    data, test = _images((40, 40, 30, 40), seed=1, noise=0.3)
    spec, g0 = _setup(McMahanCNN)
    cfg = TrainConfig(epochs=1, batch_size=10, lr=0.05)
    final = {}
    for precision in ("fp32", "bf16"):
        engine = VectorizedEngine(model_fn=McMahanCNN, dataset=data, spec=spec, precision=precision)
        assert engine.mode == "lowered"
        g = g0.clone()
        for rnd in range(1, 6):
            updates = list(engine.run_cohort(g, _instructions(data, cfg, rnd)))
            n = sum(u.num_examples for u in updates)
            g = g + sum(u.delta * (u.num_examples / n) for u in updates)
        final[precision] = g
    acc = {p: _accuracy(McMahanCNN, spec, v, test) for p, v in final.items()}
    assert acc["fp32"] > 0.9, acc
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.05, acc
    moved = (final["fp32"] - g0).norm()
    assert float((final["bf16"] - final["fp32"]).norm() / moved) < 0.25
    assert torch.isfinite(final["bf16"]).all()


@pytest.mark.parametrize("program", ["lowered", "vmap"])
def test_bf16_gradients_stay_float32_and_close(program: str) -> None:
    """Under bf16 the vmap program keeps float32 buffers; on CPU the lowered Linear layers stay float32."""
    from fedloom.engines._lockstep import VmapProgram

    data = _dataset()
    spec, g = _setup(_mlp)
    cfg = TrainConfig(epochs=1, batch_size=5, lr=0.1, momentum=0.5)  # gradients through the buffer (not fused SGD)
    ins = _instructions(data, cfg)
    out = {}
    for precision in ("fp32", "bf16"):
        prog = VmapProgram(_mlp(), spec) if program == "vmap" else None
        engine = VectorizedEngine(model_fn=_mlp, dataset=data, spec=spec, precision=precision, program=prog)
        assert engine.mode == program
        out[precision] = _deltas(engine, g, ins)
    assert out["bf16"].dtype == torch.float32
    if program == "lowered":  # an MLP is only Linear layers: float32 products on CPU (see _Linear)
        assert torch.equal(out["bf16"], out["fp32"])
        return
    assert not torch.equal(out["bf16"], out["fp32"])  # bf16 did run
    rel = float((out["bf16"] - out["fp32"]).norm() / out["fp32"].norm())
    assert rel < 0.1, rel


@pytest.mark.parametrize("fused", [False, True])
def test_stacked_linear_bf16_products_write_float32_gradients(fused: bool) -> None:
    """The CUDA path of the stacked Linear under bf16 (its own cast backward), run on CPU."""
    from fedloom.engines._lockstep import _StackedLinear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=gen, requires_grad=True)
    w = torch.randn(3, 4, 8, generator=gen)
    b = torch.randn(3, 4, generator=gen)
    up = torch.randn(3, 5, 4, generator=gen)
    ref_w = w.clone().requires_grad_(True)
    ref_b = b.clone().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    (torch.baddbmm(ref_b.unsqueeze(1), ref_x, ref_w.transpose(1, 2)) * up).sum().backward()
    wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    target = w.clone() if fused else torch.empty_like(w)
    out = _StackedLinear.apply(x, wl, bl, target, 0.5 if fused else None, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    (out.float() * up).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and bl.grad is not None and bl.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0.05, atol=0.05)
    torch.testing.assert_close(bl.grad, ref_b.grad, rtol=0.05, atol=0.05)
    expected = w - 0.5 * ref_w.grad if fused else ref_w.grad
    assert target.dtype == torch.float32
    torch.testing.assert_close(target, expected, rtol=0.05, atol=0.1)


# ----------------------------------------------------------------- chunk sizing
def test_chunk_size_from_free_memory() -> None:
    assert chunk_size_from_free(1000, 100) == int(1000 * DEVICE_MEMORY_FRACTION) // 100
    assert chunk_size_from_free(10, 100) == 1  # at least one client
    assert chunk_size_from_free(8 * 2**30, 2**20, fraction=0.25) == 2048
    with pytest.raises(ValueError):
        chunk_size_from_free(10, 0)
    data = _dataset()
    spec, _ = _setup(_mlp)
    cfg = TrainConfig(epochs=1, batch_size=5, lr=0.1)
    seen: list[torch.device] = []

    def free(device: torch.device) -> int:
        seen.append(device)
        return 2**20

    engine = VectorizedEngine(model_fn=_mlp, dataset=data, spec=spec, free_bytes=free)
    cpu_rule = VectorizedEngine(model_fn=_mlp, dataset=data, spec=spec, memory_budget_bytes=2**20)
    per_client = 2**20 // cpu_rule.chunk_size_for(cfg)  # the same per-client estimate, budget 1 MiB
    size = engine.chunk_size_for(cfg)
    assert seen == [torch.device("cpu")]
    assert size == pytest.approx(cpu_rule.chunk_size_for(cfg) * DEVICE_MEMORY_FRACTION, abs=1)
    assert size >= 1 and size * per_client <= 2**20
    # a fixed chunk size wins over the free-memory rule
    fixed = VectorizedEngine(model_fn=_mlp, dataset=data, spec=spec, free_bytes=free, chunk_size=3)
    assert fixed.chunk_size_for(cfg) == 3


# ----------------------------------------------------------------- graphed steps
class _FailingBackend(EagerGraphBackend):
    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        raise RuntimeError("capture refused")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graphed_steps_run_the_eager_function(precision: str) -> None:
    """The graphed path (static buffers, warm-up, capture, replay) through the eager backend == eager steps."""
    data = _dataset((20, 20, 20, 13))  # full steps for all, then a partial last step
    spec, g = _setup(_mlp)
    for cfg in (TrainConfig(epochs=2, batch_size=5, lr=0.1), TrainConfig(epochs=2, batch_size=5, lr=0.01, optimizer="adam")):
        ins = _instructions(data, cfg)
        eager = VectorizedEngine(model_fn=_mlp, dataset=data, spec=spec, precision=precision)
        graphed = VectorizedEngine(model_fn=_mlp, dataset=data, spec=spec, precision=precision, graph_backend=EagerGraphBackend)
        assert torch.equal(_deltas(graphed, g, ins), _deltas(eager, g, ins))
        assert graphed.graph_replays > 0 and graphed.graph_failure is None
        failing = VectorizedEngine(model_fn=_mlp, dataset=data, spec=spec, precision=precision, graph_backend=_FailingBackend)
        assert torch.equal(_deltas(failing, g, ins), _deltas(eager, g, ins))
        assert failing.graph_replays == 0 and "capture refused" in (failing.graph_failure or "")


def test_graphs_skip_dropout_and_stay_off_on_cpu() -> None:
    data = _dataset((20, 20, 20))
    spec, g = _setup(lambda: MLP(6, (16,), 3, dropout=0.2))
    model_fn = lambda: MLP(6, (16,), 3, dropout=0.2)  # noqa: E731
    engine = VectorizedEngine(model_fn=model_fn, dataset=data, spec=spec, graph_backend=EagerGraphBackend)
    _deltas(engine, g, _instructions(data, TrainConfig(epochs=1, batch_size=5, lr=0.1)))
    assert engine.mode == "lowered" and engine.graph_replays == 0  # dropout draws: not graph-safe
    spec2, g2 = _setup(_mlp)
    cpu = VectorizedEngine(model_fn=_mlp, dataset=data, spec=spec2, cuda_graphs=True)  # CUDA only: eager on CPU
    _deltas(cpu, g2, _instructions(data, TrainConfig(epochs=1, batch_size=5, lr=0.1)))
    assert cpu.cuda_graphs and cpu.graph_replays == 0


def test_graphed_step_copies_inputs_into_static_buffers() -> None:
    calls: list[tuple[int, int]] = []
    step = GraphedStep(
        lambda ix, cnt: calls.append((ix.data_ptr(), int(ix.sum()))),
        torch.zeros(2, 3, dtype=torch.long),
        torch.zeros(2),
        EagerGraphBackend(),
        warmup=1,
    )
    for t in range(4):
        step(torch.full((2, 3), t, dtype=torch.long), torch.ones(2))
    assert [s for _, s in calls] == [0, 6, 12, 18]
    assert {p for p, _ in calls} == {step.index.data_ptr()}  # always the static buffer
    assert (step.calls, step.replays) == (4, 3)
