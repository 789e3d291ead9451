"""Buffered asynchronous rounds (FedBuff): equivalence with synchronous FedAvg, staleness, resume."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import toy

from fedloom.core.errors import ConfigError
from fedloom.core.types import TrainConfig
from fedloom.data.base import FederatedDataset
from fedloom.engines.sequential import SequentialEngine
from fedloom.engines.vectorized import VectorizedEngine
from fedloom.federation.buffered import BufferPolicy
from fedloom.federation.loop import Federation
from fedloom.federation.timing import LatencyModel
from fedloom.store import Store
from fedloom.strategies.fedavg import FedAvg
from fedloom.strategies.scaffold import Scaffold

TRAIN = TrainConfig(loss="mse", epochs=1, batch_size=4, lr=0.05)


def _dataset(sizes: Sequence[int]) -> FederatedDataset:
    return toy.dataset(sizes)


def _federation(ds: FederatedDataset, strategy, *, engine_cls=SequentialEngine, **kw) -> Federation:
    return toy.federation(ds, strategy, engine_cls=engine_cls, **kw)


SIZES = [13, 7, 21, 9, 16, 11, 8, 12]


@pytest.mark.parametrize("engine_cls", [SequentialEngine, VectorizedEngine])
def test_equal_latencies_and_k_equal_cohort_is_synchronous_fedavg(engine_cls) -> None:
    strategy = FedAvg(train=TRAIN, fraction=0.5, seed=3)  # cohort 4 of 8
    sync = _federation(_dataset(SIZES), strategy, engine_cls=engine_cls)
    sync.run(5)
    buf = _federation(
        _dataset(SIZES), strategy, engine_cls=engine_cls, buffer=BufferPolicy(size=4, concurrency=4), latency=LatencyModel("fixed", median=2.0)
    )
    buf.run(5)
    assert [r.clients for r in buf.history] == [sorted(r.clients) for r in sync.history]
    torch.testing.assert_close(buf.state.params, sync.state.params, rtol=0, atol=1e-6)
    assert [r.metrics["clock_s"] for r in buf.history] == [2.0, 4.0, 6.0, 8.0, 10.0]
    assert all(r.metrics["staleness_max"] == 0.0 for r in buf.history)


def test_staleness_weights_by_hand() -> None:
    p = BufferPolicy(size=2, concurrency=4)
    assert [p.weight(t) for t in (0, 1, 3, 8)] == [1.0, 2**-0.5, 0.5, 1 / 3]
    h = BufferPolicy(size=2, concurrency=4, staleness="hinge", exponent=0.5, hinge=2)
    assert [h.weight(t) for t in (0, 2, 3, 6)] == [1.0, 1.0, 1 / 1.5, 1 / 3]
    assert BufferPolicy(size=1, concurrency=1, staleness="constant").weight(50) == 1.0
    with pytest.raises(ConfigError, match="buffer.concurrency"):
        BufferPolicy(size=5, concurrency=4)
    with pytest.raises(ConfigError, match="buffer.max_staleness"):
        BufferPolicy(size=1, concurrency=1, max_staleness=-1)


def test_a_stale_update_is_scaled_by_its_weight() -> None:
    """Two clients, K=1: the slow one's update lands one version late, scaled by 1/sqrt(2)."""
    ds = _dataset([10, 10])
    strategy = FedAvg(train=TrainConfig(loss="mse", epochs=1, batch_size=10, lr=0.1), fraction=1.0, seed=0)
    lat = LatencyModel("fixed", median=1.0, speeds={"c0": 1.0, "c1": 0.6})  # c1 takes 1/0.6 s
    fed = _federation(ds, strategy, buffer=BufferPolicy(size=1, concurrency=2), latency=lat)
    w0 = fed.state.params.clone()
    # what each client's full-batch step from w0 gives (the same seed-free full batch)
    ref = _federation(_dataset([10, 10]), strategy)
    ups = {u.client_id: u for u in ref.engine.run_cohort(w0, [strategy.client_config(ref.state, 1, c) for c in ("c0", "c1")])}
    r1 = fed.step()
    assert r1.clients == ["c0"] and r1.metrics["clock_s"] == 1.0
    # a buffer of one: FedAvg's weighted mean is that update (run_cohort without the weighting stage: raw deltas)
    torch.testing.assert_close(fed.state.params, w0 + ups["c0"].delta, rtol=0, atol=1e-7)
    w1 = fed.state.params.clone()
    r2 = fed.step()  # c0 re-dispatched at 1.0 from w1 and due at 2.0; c1 (from w0) due at 1.667
    assert r2.clients == ["c1"] and r2.metrics["staleness_max"] == 1.0
    assert r2.metrics["clock_s"] == pytest.approx(1 / 0.6)
    torch.testing.assert_close(fed.state.params, w1 + 2**-0.5 * ups["c1"].delta, rtol=0, atol=1e-7)


def test_staleness_beyond_the_bound_is_refused_with_the_reason() -> None:
    ds = _dataset([10, 10, 10])
    strategy = FedAvg(train=TRAIN, fraction=1.0, seed=0)
    lat = LatencyModel("fixed", median=1.0, speeds={"c2": 0.2})  # c2 takes 5 s, the others 1 s
    fed = _federation(ds, strategy, buffer=BufferPolicy(size=1, concurrency=3, max_staleness=2), latency=lat)
    hist = fed.run(10)
    # the fast pair brings two versions per second; c2, sent version 0, lands at t = 5 s against version 8
    late = [r for r in hist if "c2" in r.rejected]
    assert [r.round for r in late] == [9]
    assert late[0].rejected["c2"] == "staleness 8 is beyond max_staleness 2"
    assert late[0].metrics["clock_s"] == 5.0 and late[0].clients == ["c0"]
    assert all("c2" not in r.clients for r in hist)


def test_resume_mid_buffer_re_dispatches_in_flight_work_and_matches_an_uninterrupted_run(tmp_path) -> None:
    strategy = FedAvg(train=TRAIN, fraction=0.5, seed=1)
    lat = LatencyModel("lognormal", median=1.0, sigma=1.0, jitter=0.3, seed=1)
    policy = BufferPolicy(size=2, concurrency=5)
    whole = _federation(_dataset(SIZES), strategy, buffer=policy, latency=lat)
    whole.run(8)

    store = Store.open(tmp_path / "runs.db")
    ident = {"test": "buffered"}

    def open_run() -> Federation:
        return _federation(
            _dataset(SIZES), strategy, buffer=policy, latency=lat, store=store,
            run_handle=store.start_or_resume_run("b", ident), checkpoint_every=4,
        )  # fmt: skip

    first = open_run()
    first.run(4)  # checkpointed at version 4
    flying = first.state.meta["schedule"]["flights"]
    assert len(flying) == 4  # concurrency 5, less the arrival that closed the buffer
    assert {int(k.rsplit(".", 1)[1]) for k in first.state.tensors if k.startswith("schedule.base.")} == {f[1] for f in flying}
    first.step()
    first.step()  # versions 5 and 6 applied, then the process dies before the next checkpoint
    second = open_run()
    assert second.resumed_from == 4 and len(second.history) == 4
    second.run(8)
    assert [r.clients for r in second.history] == [r.clients for r in whole.history]
    assert [r.metrics["clock_s"] for r in second.history] == [r.metrics["clock_s"] for r in whole.history]
    torch.testing.assert_close(second.state.params, whole.state.params, rtol=0, atol=0)
    store.close()


def test_long_tailed_latencies_make_buffered_rounds_faster_in_simulated_time() -> None:
    strategy = FedAvg(train=TRAIN, fraction=0.5, seed=0)
    lat = LatencyModel("lognormal", median=1.0, sigma=1.5, seed=4)
    sync = _federation(_dataset(SIZES), strategy, latency=lat)
    sync.run(6)
    buf = _federation(_dataset(SIZES), strategy, buffer=BufferPolicy(size=2, concurrency=4), latency=lat)
    buf.run(6)
    # a synchronous round waits for its slowest client: the clock is the sum of each round's maximum
    expected = 0.0
    for r in sync.history:
        expected += max(lat.base(c) for c in r.clients)
        assert r.metrics["clock_s"] == pytest.approx(expected)
    assert buf.history[-1].metrics["clock_s"] < sync.history[-1].metrics["clock_s"]


def test_strategies_that_need_synchronous_rounds_refuse_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="scaffold.*needs synchronous rounds"):
        _federation(_dataset(SIZES), Scaffold(train=TRAIN, fraction=0.5), buffer=BufferPolicy(size=2, concurrency=4))


def test_a_buffered_round_whose_dispatches_all_fail_closes_instead_of_spinning() -> None:
    class NoUpdates(SequentialEngine):
        def run_cohort(self, global_vec, instructions, **kw):  # type: ignore[no-untyped-def]
            return iter(())

    fed = _federation(
        _dataset(SIZES), FedAvg(train=TRAIN, fraction=0.5, seed=0), engine_cls=NoUpdates,
        buffer=BufferPolicy(size=2, concurrency=4), latency=LatencyModel("fixed", median=1.0),
    )  # fmt: skip
    w0 = fed.state.params.clone()
    rec = fed.step()
    assert rec.status == "insufficient" and rec.clients == []
    assert set(rec.rejected.values()) == {"the engine returned no update"}
    assert torch.equal(fed.state.params, w0)
    assert fed._serial == 4  # concurrency 4, round_retries 0: four failed arrivals close the round
