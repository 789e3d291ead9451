"""Chunks on worker threads: same updates bit for bit whatever the thread count, results in order."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

from fedloom.core.config import load_config
from fedloom.core.errors import ConfigError
from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, ClientUpdate, TrainConfig
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec
from fedloom.engines import VectorizedEngine
from fedloom.engines._parallel import ChunkPool
from fedloom.engines.vectorized import even_chunks

IMAGE = TaskSpec(kind="classification", input_shape=(1, 8, 8), num_outputs=3, loss="cross_entropy", metrics=("accuracy",))
SIZES = (23, 7, 3, 40, 12, 9, 30)


def _images(sizes: tuple[int, ...] = SIZES) -> FederatedDataset:
    g = torch.Generator().manual_seed(5)
    clients = {
        f"c{i}": ClientData(Split(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)))
        for i, n in enumerate(sizes)
    }
    return FederatedDataset("images", IMAGE, clients)


def _cnn() -> nn.Module:
    """Convolutions, pooling, BatchNorm and dropout: every lowered op whose kernels thread differently."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(64, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def _run(threads: int, cfg: TrainConfig, chunk_size: int = 2) -> tuple[list[ClientUpdate], VectorizedEngine]:
    data = _images()
    torch.manual_seed(0)
    model = _cnn()
    spec = ParamSpec.from_module(model)
    engine = VectorizedEngine(model_fn=_cnn, dataset=data, spec=spec, chunk_size=chunk_size, threads=threads)
    assert engine.mode == "lowered"
    ins = [ClientInstruction(round=1, client_id=c, train=cfg, seed=10 + i) for i, c in enumerate(data.client_ids)]
    try:
        return list(engine.run_cohort(spec.module_vector(model), ins)), engine
    finally:
        engine.close()


@pytest.mark.parametrize(
    "cfg",
    [
        TrainConfig(epochs=1, batch_size=5, lr=0.1),
        TrainConfig(epochs=2, batch_size=4, lr=0.05, optimizer="adam"),
        TrainConfig(epochs=1, batch_size=5, lr=0.1, momentum=0.9),
    ],
)
def test_updates_are_bit_identical_for_any_thread_count(cfg: TrainConfig) -> None:
    runs = {t: _run(t, cfg)[0] for t in (1, 2, 3)}
    ref = runs[1]
    # chunk order (clients by size, most examples first), not finishing order
    assert [u.client_id for u in ref] == [f"c{i}" for i in sorted(range(len(SIZES)), key=lambda i: -SIZES[i])]
    for t in (2, 3):
        assert [u.client_id for u in runs[t]] == [u.client_id for u in ref]
        for a, b in zip(runs[t], ref, strict=True):
            assert torch.equal(a.delta, b.delta), (t, a.client_id)
            assert a.metrics == b.metrics


def test_parallel_chunks_leave_the_global_rng_alone() -> None:
    data = _images()
    model = _cnn()
    spec = ParamSpec.from_module(model)
    engine = VectorizedEngine(model_fn=_cnn, dataset=data, spec=spec, chunk_size=1, threads=3)
    cfg = TrainConfig(epochs=1, batch_size=5, lr=0.1)
    ins = [ClientInstruction(round=1, client_id=c, train=cfg, seed=i) for i, c in enumerate(data.client_ids)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    try:
        assert len(list(engine.run_cohort(spec.module_vector(model), ins))) == len(SIZES)
    finally:
        engine.close()
    assert torch.equal(torch.get_rng_state(), before)


def test_threads_setting_is_restored() -> None:
    n = torch.get_num_threads()
    _, engine = _run(2, TrainConfig(epochs=1, batch_size=5, lr=0.1))
    assert engine.threads == 2
    assert torch.get_num_threads() == n


@pytest.mark.parametrize(
    ("n", "size", "least", "expected"),
    [
        (10, 9, 1, [5, 5]),
        (7, 3, 1, [3, 2, 2]),
        (100, 25, 1, [25] * 4),
        (1, 4, 1, [1]),
        (9, 1, 1, [1] * 9),
        (0, 3, 1, []),
        (10, 25, 2, [5, 5]),  # one chunk per core at least: both cores busy
        (10, 25, 4, [3, 3, 2, 2]),
        (3, 25, 8, [1, 1, 1]),  # never more chunks than clients
        (100, 25, 2, [25] * 4),  # the budget already gives more
    ],
)
def test_even_chunks(n: int, size: int, least: int, expected: list[int]) -> None:
    group = [ClientInstruction(round=1, client_id=f"c{i}", train=TrainConfig(), seed=i) for i in range(n)]
    chunks = even_chunks(group, size, least)
    assert [len(c) for c in chunks] == expected
    assert [ins.client_id for c in chunks for ins in c] == [g.client_id for g in group]


def test_pool_yields_in_order_while_jobs_overlap() -> None:
    pool = ChunkPool(2)
    running, peak, lock = [0], [0], threading.Lock()

    def job(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05 if i % 2 == 0 else 0.01)  # even jobs finish after the odd ones started with them
        with lock:
            running[0] -= 1
        assert torch.get_num_threads() == 1  # single-threaded kernels in every worker
        return i * i

    try:
        assert list(pool.ordered(job, range(8))) == [i * i for i in range(8)]
    finally:
        pool.close()
    assert peak[0] == 2


def test_pool_raises_at_the_failing_jobs_turn_and_cancels_the_rest() -> None:
    pool = ChunkPool(2)
    started: list[int] = []

    def job(i: int) -> int:
        started.append(i)
        if i == 2:
            raise RuntimeError("chunk 2 broke")
        return i

    out: list[int] = []
    with pytest.raises(RuntimeError, match="chunk 2 broke"):
        for r in pool.ordered(job, range(100)):
            out.append(r)
    pool.close()
    assert out == [0, 1]
    assert len(started) <= 5  # submitted ahead by at most the thread count, not the whole cohort


def test_pool_of_one_runs_in_the_callers_thread() -> None:
    pool = ChunkPool(1)
    me = threading.get_ident()
    assert list(pool.ordered(lambda i: (i, threading.get_ident() == me, torch.get_num_threads()), range(3))) == [
        (0, True, 1),
        (1, True, 1),
        (2, True, 1),
    ]


def test_bad_thread_counts_are_refused_with_the_key() -> None:
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        ChunkPool(0)
    data = _images()
    spec = ParamSpec.from_module(_cnn())
    with pytest.raises(ConfigError) as err:
        VectorizedEngine(model_fn=_cnn, dataset=data, spec=spec, threads=0)
    assert err.value.key == "run.threads"


def test_run_threads_in_config(tmp_path) -> None:  # noqa: ANN001 - pytest fixture
    path = tmp_path / "run.toml"
    path.write_text('[run]\nthreads = 0\n[data]\nname = "x"\n[model]\nname = "y"\n')
    with pytest.raises(ConfigError, match="threads"):
        load_config(path)


def test_mcmahan_cnn_updates_do_not_depend_on_the_thread_count() -> None:
    """The McMahan CNN at one client per chunk: its convolutions sum in another order when split over threads."""
    from fedloom.models import McMahanCNN

    task = TaskSpec(kind="classification", input_shape=(1, 28, 28), num_outputs=10, loss="cross_entropy", metrics=("accuracy",))
    g = torch.Generator().manual_seed(1)
    data = FederatedDataset(
        "digits",
        task,
        {f"c{i}": ClientData(Split(torch.rand(20, 1, 28, 28, generator=g), torch.randint(0, 10, (20,), generator=g))) for i in range(4)},
    )
    torch.manual_seed(0)
    model = McMahanCNN()
    spec = ParamSpec.from_module(model)
    cfg = TrainConfig(epochs=1, batch_size=10, lr=0.05)
    ins = [ClientInstruction(round=1, client_id=c, train=cfg, seed=i) for i, c in enumerate(data.client_ids)]
    deltas = {}
    for threads in (1, 2):
        engine = VectorizedEngine(model_fn=McMahanCNN, dataset=data, spec=spec, chunk_size=1, threads=threads)
        try:
            deltas[threads] = torch.stack([u.delta for u in engine.run_cohort(spec.module_vector(model), ins)])
        finally:
            engine.close()
    assert torch.equal(deltas[1], deltas[2])


def test_chunks_per_core_only_where_a_chunk_step_pays() -> None:
    """At least one chunk per core, unless a chunk's step would then fall below PARALLEL_MIN_MACS."""
    from fedloom.engines.vectorized import PARALLEL_MIN_MACS
    from fedloom.models import McMahanCNN
    from fedloom.models.mnist import McMahan2NN

    task = TaskSpec(kind="classification", input_shape=(1, 28, 28), num_outputs=10, loss="cross_entropy", metrics=("accuracy",))
    g = torch.Generator().manual_seed(2)
    data = FederatedDataset(
        "mnist-like", task, {f"c{i}": ClientData(Split(torch.rand(12, 1, 28, 28, generator=g), torch.randint(0, 10, (12,), generator=g))) for i in range(3)}
    )
    cfg = TrainConfig(epochs=1, batch_size=10, lr=0.1)
    assert PARALLEL_MIN_MACS == 24_000_000
    for model_fn, macs in ((McMahan2NN, 784 * 200 + 200 * 200 + 200 * 10), (McMahanCNN, 12_273_152)):
        spec = ParamSpec.from_module(model_fn())
        engine = VectorizedEngine(model_fn=model_fn, dataset=data, spec=spec)
        try:
            assert engine._macs == macs  # forward multiply-accumulates per sample, by hand
            engine._min_chunks = 4  # as on a 4-core machine
            step = 10 * macs
            got = [engine._least_chunks(n, cfg) for n in (1, 10, 20, 100)]
            assert got == [max(1, min(4, n * step // PARALLEL_MIN_MACS)) for n in (1, 10, 20, 100)]
        finally:
            engine.close()
        if model_fn is McMahan2NN:  # 10 clients: 19.9M MACs a step -> one chunk; 20: 39.8M -> still one; 100 -> 4
            assert got == [1, 1, 1, 4]
        else:  # 123M MACs a client-step: one chunk per core (even_chunks never cuts more chunks than clients)
            assert got == [4, 4, 4, 4]


def test_a_lone_linear_chunk_borrows_the_idle_threads_and_keeps_its_bits() -> None:
    """Fewer chunks than threads: a Linear chain's chunk runs with the idle threads as intra-op
    threads (its batched products give the same bits with any thread count); a convolution's does not."""
    from fedloom.models import McMahanCNN
    from fedloom.models.mnist import McMahan2NN

    task = TaskSpec(kind="classification", input_shape=(1, 28, 28), num_outputs=10, loss="cross_entropy", metrics=("accuracy",))
    g = torch.Generator().manual_seed(4)
    data = FederatedDataset(
        "mnist-like", task, {f"c{i}": ClientData(Split(torch.rand(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,), generator=g))) for i in range(3)}
    )
    cfg = TrainConfig(epochs=2, batch_size=10, lr=0.1)
    ins = [ClientInstruction(round=1, client_id=c, train=cfg, seed=i) for i, c in enumerate(data.client_ids)]
    torch.manual_seed(0)
    spec = ParamSpec.from_module(McMahan2NN())
    start = spec.module_vector(McMahan2NN())
    runs, seen = {}, {}
    for threads in (1, 2, 3):
        engine = VectorizedEngine(model_fn=McMahan2NN, dataset=data, spec=spec, threads=threads)
        real = engine._train_job
        engine._train_job = lambda *a, real=real, t=threads: (seen.setdefault(t, torch.get_num_threads()), real(*a))[1]  # type: ignore[method-assign]
        try:
            assert engine.program.thread_invariant and len(engine._jobs(ins)) == 1  # 3 clients x 2M MACs: one chunk
            runs[threads] = list(engine.run_cohort(start, ins))
        finally:
            engine.close()
    assert seen == {1: 1, 2: 2, 3: 3}  # the one chunk ran with every chunk thread as an intra-op thread
    for t in (2, 3):
        for a, b in zip(runs[t], runs[1], strict=True):
            assert a.client_id == b.client_id and torch.equal(a.delta, b.delta), (t, a.client_id)
    cnn_spec = ParamSpec.from_module(McMahanCNN())
    cnn = VectorizedEngine(model_fn=McMahanCNN, dataset=data, spec=cnn_spec, threads=2)
    try:
        assert not cnn.program.thread_invariant and cnn._intra(1) == 1
    finally:
        cnn.close()
