"""The vectorized engine checks and sums each chunk where it was trained: one partial per chunk.

The round loop then merges one float64 sum per chunk instead of checking and adding every
update; the run must be the per-update run's (up to float64 summation order), refuse the
same updates for the same reasons, count the same bytes, and not depend on the thread count.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from fedloom.core.params import ParamSpec
from fedloom.core.types import ClientInstruction, TrainConfig
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec
from fedloom.engines import VectorizedEngine
from fedloom.engines.vectorized import even_chunks
from fedloom.federation import Federation
from fedloom.pipeline import Pipeline, StageContext
from fedloom.strategies import FedAvg, FedProx, Scaffold
from _models import Branchy, Residual

TASK = TaskSpec(kind="classification", input_shape=(6,), num_outputs=3, loss="cross_entropy", metrics=("accuracy",))
SIZES = (23, 7, 3, 40, 12, 9, 30, 5)


def _data() -> FederatedDataset:
    g = torch.Generator().manual_seed(3)
    clients = {
        f"c{i}": ClientData(Split(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)))
        for i, n in enumerate(SIZES)
    }
    return FederatedDataset("tab", TASK, clients)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _federation(strategy, *, threads: int, partials: bool, limit: int | None = None, model_fn=_mlp):  # noqa: ANN001, ANN202
    data = _data()
    torch.manual_seed(0)
    model = model_fn()
    spec = ParamSpec.from_module(model)
    engine = VectorizedEngine(model_fn=model_fn, dataset=data, spec=spec, chunk_size=3, threads=threads)
    if not partials:
        engine.partials = False  # type: ignore[misc]  # the per-update path
    fed = Federation(strategy=strategy, engine=engine, spec=spec, initial=spec.module_vector(model), max_examples=limit)
    return fed, engine


STRATEGIES = {
    "fedavg": lambda: FedAvg(train=TrainConfig(epochs=1, batch_size=5, lr=0.1), fraction=1.0),
    "fedprox": lambda: FedProx(train=TrainConfig(epochs=2, batch_size=4, lr=0.05), fraction=0.75, mu=0.1),
    "scaffold": lambda: Scaffold(train=TrainConfig(epochs=1, batch_size=5, lr=0.1), fraction=0.5),
}


@pytest.mark.parametrize(
    ("name", "model_fn", "mode"),
    [
        ("fedavg", _mlp, "lowered"),
        ("fedprox", _mlp, "lowered"),
        ("scaffold", _mlp, "lowered"),
        ("fedavg", Residual, "vmap"),
        ("fedavg", Branchy, "sequential"),
    ],
)
def test_partial_run_is_the_per_update_run(name: str, model_fn, mode: str) -> None:  # noqa: ANN001
    limit = max(SIZES) - 1  # the largest client declares more examples than allowed: refused in both paths
    runs = {}
    for partials in (True, False):
        fed, engine = _federation(STRATEGIES[name](), threads=2, partials=partials, limit=limit, model_fn=model_fn)
        assert engine.mode == mode
        try:
            history = fed.run(3)
        finally:
            engine.close()
        runs[partials] = (fed.state.params.clone(), history, dict(engine.client_states.to_tensors()))
    (got, got_h, got_s), (want, want_h, want_s) = runs[True], runs[False]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert [r.clients for r in got_h] == [r.clients for r in want_h]  # chunk order in both
    assert [r.rejected for r in got_h] == [r.rejected for r in want_h]
    assert [r.bytes_up for r in got_h] == [r.bytes_up for r in want_h]
    assert [r.metrics.get("train_loss") for r in got_h] == pytest.approx([r.metrics.get("train_loss") for r in want_h], abs=1e-9)
    refused = [r.rejected for r in want_h if r.rejected]
    assert refused and all("exceeds the limit" in reason for rej in refused for reason in rej.values())
    assert got_s.keys() == want_s.keys()  # SCAFFOLD's c_i kept for the same clients
    for k, v in want_s.items():
        torch.testing.assert_close(got_s[k], v, rtol=0, atol=1e-6)


def test_partial_runs_are_bit_identical_for_any_thread_count() -> None:
    finals = []
    for threads in (1, 2, 3):
        fed, engine = _federation(STRATEGIES["fedprox"](), threads=threads, partials=True)
        try:
            fed.run(3)
        finally:
            engine.close()
        finals.append(fed.state.params.clone())
    assert torch.equal(finals[0], finals[1]) and torch.equal(finals[0], finals[2])


def test_one_partial_per_chunk_in_chunk_order() -> None:
    fed, engine = _federation(STRATEGIES["fedavg"](), threads=2, partials=True)
    try:
        cfg = TrainConfig(epochs=1, batch_size=5, lr=0.1)
        ins = [ClientInstruction(round=1, client_id=c, train=cfg, seed=i) for i, c in enumerate(engine.dataset.client_ids)]
        ins.append(ClientInstruction(round=1, client_id="c0", train=TrainConfig(epochs=2, batch_size=5, lr=0.1), seed=99))
        agg = fed.strategy.aggregator(fed.state, 1)
        ctx = StageContext(fed.spec, 1, fed.state.params.dtype)
        items = list(engine.run_partials(fed.state.params, ins, aggregator=agg, pipe=Pipeline(), ctx=ctx))
        rejected = engine.take_rejections()
    finally:
        engine.close()
    # 8 clients of one config, by size (most examples first), at most 3 per chunk (and one chunk
    # per core at least); c0's second instruction (another config) is a chunk of its own.
    by_size = sorted(ins[:-1], key=lambda i: -SIZES[int(i.client_id[1:])])
    chunks = [tuple(i.client_id for i in c) for c in even_chunks(by_size, 3, len(os.sched_getaffinity(0)))]
    if len(os.sched_getaffinity(0)) <= 3:
        assert chunks == [("c3", "c6", "c0"), ("c4", "c5", "c1"), ("c7", "c2")]
    parts = [p for p, _ in items]
    assert [p.client_ids for p in parts] == [*chunks, ("c0",)]
    assert [n for _, n in items] == [len(p.client_ids) * fed.spec.numel * 4 for p in parts]  # float32 deltas
    assert [p.source for p in parts] == [f"chunk-{i}" for i in range(len(chunks) + 1)]
    sizes = dict(zip(engine.dataset.client_ids, SIZES, strict=True))
    assert [p.client_examples for p in parts] == [tuple(sizes[c] for c in ids) for ids in [*chunks, ("c0",)]]
    assert all(p.delta_sum.dtype == torch.float64 for p in parts)
    assert not agg.client_ids  # the template stays empty: each chunk sums into its own copy
    assert rejected == {}
