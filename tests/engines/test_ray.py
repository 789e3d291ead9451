"""The ray engine: cohorts sharded over Ray workers give the in-process engine's results.

Local tests start an in-process Ray instance; the slow test starts a real two-node cluster
on this machine (``ray start --head`` and a second ``ray start --address``, as separate
processes) and checks that the workers land on both nodes. Every Ray instance gets its own
short temp dir under /tmp (Unix socket paths are limited to ~107 bytes) and a throwaway
auth token in the environment (never ~/.ray), and every process it leaves is killed by pid.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from fedloom.core.config import parse_config  # noqa: E402
from fedloom.core.errors import EngineError  # noqa: E402
from fedloom.core.keys import CLIENT_CONTROL  # noqa: E402
from fedloom.core.params import ParamSpec  # noqa: E402
from fedloom.core.types import ClientInstruction, ClientUpdate, TrainConfig  # noqa: E402
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec  # noqa: E402
from fedloom.engines import VectorizedEngine  # noqa: E402
from fedloom.engines.ray import RayEngine, shard  # noqa: E402
from fedloom.federation import Federation  # noqa: E402
from fedloom.models import MLP  # noqa: E402
from fedloom.run import build_run  # noqa: E402
from fedloom.strategies.scaffold import Scaffold  # noqa: E402
from fedloom.strategies.fedavg import FedAvg  # noqa: E402

TASK = TaskSpec(kind="classification", input_shape=(6,), num_outputs=3, loss="cross_entropy", metrics=("accuracy",))
SIZES = (23, 7, 3, 40, 15, 11)  # unequal; client 2 is smaller than one batch of 5
MODEL_FN = functools.partial(MLP, 6, (16, 8), 3)  # picklable by reference: workers import fedloom
RAY_CLI = Path(sys.executable).parent / "ray"


def _dataset() -> FederatedDataset:
    g = torch.Generator().manual_seed(0)
    clients = {}
    for i, n in enumerate(SIZES):
        train = Split(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
        test = Split(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g))
        clients[f"c{i}"] = ClientData(train, test)
    return FederatedDataset("toy", TASK, clients)


def _setup() -> tuple[FederatedDataset, ParamSpec, torch.Tensor]:
    torch.manual_seed(0)
    model = MODEL_FN()
    spec = ParamSpec.from_module(model)
    return _dataset(), spec, spec.module_vector(model)


def _instructions(data: FederatedDataset, cfg: TrainConfig) -> list[ClientInstruction]:
    return [ClientInstruction(round=1, client_id=c, train=cfg, seed=100 + i) for i, c in enumerate(data.client_ids)]


def _close(actual: torch.Tensor, expected: torch.Tensor, scale: float) -> None:
    """Within 1e-5 relative, or 1e-6 of ``scale`` (the parameters' magnitude) absolute."""
    scale = max(scale, float(expected.abs().max())) or 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * scale)


def _assert_same(got: list[ClientUpdate], want: list[ClientUpdate], g: torch.Tensor) -> None:
    assert sorted(u.client_id for u in got) == sorted(u.client_id for u in want)
    by_id = {u.client_id: u for u in want}
    for u in got:
        w = by_id[u.client_id]
        assert (u.round, u.num_examples, u.num_steps) == (w.round, w.num_examples, w.num_steps)
        _close(u.delta, w.delta, float(g.abs().max()))
        assert u.metrics["train_loss"] == pytest.approx(w.metrics["train_loss"], rel=1e-5)


# --------------------------------------------------------------- process hygiene
def _processes_under(tmp: Path) -> list[int]:
    """Pids of the processes whose command line names ``tmp`` (the Ray instance's own dir)."""
    if not Path("/proc").is_dir():  # not Linux: Ray's own shutdown has to do
        return []
    key = str(tmp).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if key in cmdline:
            pids.append(int(entry))
    return pids


def _reap(tmp: Path, grace_s: float = 20.0) -> None:
    """Wait for the Ray processes of ``tmp`` to exit; SIGKILL (by pid) those that do not."""
    deadline = time.monotonic() + grace_s
    while _processes_under(tmp) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in _processes_under(tmp):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _short_tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))


def _reload_ray_auth() -> None:
    """Make this process's Ray re-read the RAY_AUTH_* environment (it caches it)."""
    try:
        from ray._private.authentication_test_utils import reset_auth_token_state
    except ImportError:  # a Ray without token authentication: nothing cached
        return
    reset_auth_token_state()


@pytest.fixture(scope="module", autouse=True)
def _ray_env() -> Iterator[None]:
    """A throwaway auth token for this module's Ray instances (never ~/.ray); no usage stats."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "token")
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
        mp.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        _reload_ray_auth()
        try:
            yield
        finally:
            if ray.is_initialized():
                ray.shutdown()
    _reload_ray_auth()


def _local_options(tmp: Path, num_cpus: int) -> dict[str, object]:
    return {"num_cpus": num_cpus, "include_dashboard": False, "_temp_dir": str(tmp), "log_to_driver": False}


# --------------------------------------------------------------------- no Ray
def test_shard_is_contiguous_and_balanced() -> None:
    assert shard(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard([1, 2], 4) == [[1], [2]]
    assert shard([], 2) == []
    with pytest.raises(ValueError):
        shard([1], 0)


def test_ray_settings_do_not_change_a_runs_identity() -> None:
    base = {"data": {"name": "equipment"}, "model": {"name": "linear"}}
    cfg = parse_config({**base, "run": {"engine": "ray", "ray_address": "auto", "ray_workers": 4}})
    assert (cfg.run.ray_address, cfg.run.ray_workers) == ("auto", 4)
    assert cfg.identity() == parse_config({**base, "run": {"engine": "ray"}}).identity()


def test_without_ray_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    data, spec, _ = _setup()
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(EngineError, match=r"pip install 'fedloom\[ray\]'"):
        RayEngine(model_fn=MODEL_FN, dataset=data, spec=spec)


# ------------------------------------------------------------ local Ray (owned)
def test_local_cohort_matches_vectorized_and_uses_two_workers() -> None:
    data, spec, g = _setup()
    tmp = _short_tmp()
    engine: RayEngine | None = None
    try:
        engine = RayEngine(
            model_fn=MODEL_FN, dataset=data, spec=spec, num_workers=2, init_options=_local_options(tmp, 2)
        )
        assert engine.num_workers == 2 and engine.mode == "lowered"
        assert len(set(engine.worker_pids)) == 2 and os.getpid() not in engine.worker_pids
        vec = VectorizedEngine(model_fn=MODEL_FN, dataset=data, spec=spec)
        ins = _instructions(data, TrainConfig(epochs=2, batch_size=5, lr=0.1, momentum=0.5))
        got = list(engine.run_cohort(g, ins))
        _assert_same(got, list(vec.run_cohort(g, ins)), g)
        # Contiguous shards: c0..c2 on one worker, c3..c5 on the other.
        pids = engine.last_worker_pids
        assert set(pids) == set(data.client_ids) and set(pids.values()) == set(engine.worker_pids)
        assert len({pids[c] for c in ("c0", "c1", "c2")}) == 1 and pids["c0"] != pids["c3"]
        # Federated evaluation, sharded the same way.
        evals = sorted(engine.evaluate_clients(g, data.client_ids))
        assert evals == sorted(vec.evaluate_clients(g, data.client_ids))
        with pytest.raises(EngineError, match="unknown client"):
            list(engine.run_cohort(g, [ClientInstruction(round=1, client_id="nope", train=ins[0].train, seed=0)]))
    finally:
        if engine is not None:
            engine.close()
        if ray.is_initialized():
            ray.shutdown()
        _reap(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not ray.is_initialized()  # the engine started Ray, so close() stopped it
    with pytest.raises(EngineError, match="closed"):
        list(engine.run_cohort(g, ins))


# ------------------------------------------------------- local Ray (shared)
@pytest.fixture(scope="class")
def local_ray() -> Iterator[None]:
    """A local Ray instance started by the test (4 logical CPUs), stopped after the class."""
    tmp = _short_tmp()
    try:
        ray.init(address="local", **_local_options(tmp, 4))  # type: ignore[arg-type]
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        _reap(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.usefixtures("local_ray")
class TestOnSharedLocalRay:
    """Engines that find Ray already initialized use it and leave it running."""

    def test_scaffold_federation_matches_in_process(self) -> None:
        data, spec, g = _setup()
        train = TrainConfig(epochs=1, batch_size=5, lr=0.05)
        results = []
        for engine in (
            VectorizedEngine(model_fn=MODEL_FN, dataset=data, spec=spec),
            RayEngine(model_fn=MODEL_FN, dataset=data, spec=spec, num_workers=2),
        ):
            try:
                strategy = Scaffold(train=train, fraction=0.67, seed=3)  # 4 of the 6 clients a round
                fed = Federation(strategy=strategy, engine=engine, spec=spec, initial=g.clone())
                history = fed.run(2)
                store = engine.client_states
                states = {c: store.get(c)[CLIENT_CONTROL] for c in data.client_ids if store.get(c)}
                results.append((fed.state, [r.clients for r in history], states))
            finally:
                engine.close()
        assert ray.is_initialized()  # not this engine's to stop
        (want, want_clients, want_states), (got, got_clients, got_states) = results
        assert [sorted(c) for c in got_clients] == [sorted(c) for c in want_clients]
        assert set(want_clients[0]) & set(want_clients[1])  # some clients train twice: their c_i is reused
        scale = float(g.abs().max())
        _close(got.params, want.params, scale)
        _close(got.tensors["control"], want.tensors["control"], scale / train.lr)
        assert got_states.keys() == want_states.keys()
        for cid, c in want_states.items():
            _close(got_states[cid], c, scale / train.lr)

    def test_workers_send_one_partial_each_and_the_run_matches_in_process(self) -> None:
        """FedAvg over 2 workers: each checks and sums its shard, the driver gets 2 partials, not 6 updates."""
        data, spec, g = _setup()
        train = TrainConfig(epochs=1, batch_size=5, lr=0.05)
        limit = sorted(len(c.train) for c in data.clients.values())[-1] - 1  # the largest client declares too many
        runs = {}
        for name, engine in (
            ("in-process", VectorizedEngine(model_fn=MODEL_FN, dataset=data, spec=spec)),
            ("partials", RayEngine(model_fn=MODEL_FN, dataset=data, spec=spec, num_workers=2)),
            ("updates", RayEngine(model_fn=MODEL_FN, dataset=data, spec=spec, num_workers=2)),
        ):
            if name == "updates":
                engine.partials = False  # type: ignore[misc]  # the path before partials: every update to the driver
            try:
                fed = Federation(strategy=FedAvg(train=train, fraction=1.0), engine=engine, spec=spec, initial=g.clone(), max_examples=limit)
                history = fed.run(2)
                runs[name] = (fed.state.params, history, getattr(engine, "driver_bytes", 0))
            finally:
                engine.close()
        want, want_hist, _ = runs["in-process"]
        for name in ("partials", "updates"):
            got, hist, _ = runs[name]
            _close(got, want, float(g.abs().max()))
            assert [sorted(r.clients) for r in hist] == [sorted(r.clients) for r in want_hist]
            assert [r.rejected for r in hist] == [r.rejected for r in want_hist]
            assert [r.bytes_up for r in hist] == [r.bytes_up for r in want_hist]
        assert want_hist[0].rejected and "exceeds the limit" in next(iter(want_hist[0].rejected.values()))
        n = len(data.client_ids)
        assert runs["updates"][2] == 2 * n * spec.numel * 4  # every update, float32, both rounds
        assert runs["partials"][2] == 2 * 2 * spec.numel * 8  # one float64 sum per worker and round

    def test_a_failing_client_is_an_engine_error_and_the_engine_goes_on(self) -> None:
        data, spec, g = _setup()
        engine = RayEngine(model_fn=MODEL_FN, dataset=data, spec=spec, num_workers=2)
        try:
            bad = _instructions(data, TrainConfig(batch_size=5, loss="bce"))  # 3 logits vs 1 target: ValueError
            good = _instructions(data, TrainConfig(batch_size=5, lr=0.1))
            for ordered in (False, True):
                engine.ordered = ordered
                with pytest.raises(EngineError, match="ray worker failed.*ValueError"):
                    list(engine.run_cohort(g, bad))
                got = list(engine.run_cohort(g, good))
                assert len(got) == len(data.client_ids)
            assert [u.client_id for u in got] == data.client_ids  # ordered: shard by shard
        finally:
            engine.close()

    def test_build_run_with_ray_engine(self) -> None:
        cfg = parse_config(
            {
                "run": {"rounds": 1, "seed": 1, "engine": "ray", "ray_workers": 2, "federated_eval_every": 1},
                "data": {"name": "equipment"},
                "model": {"name": "linear"},
                "strategy": {"name": "fedavg", "fraction": 1.0},
                "client": {"epochs": 1, "batch_size": 256, "lr": 0.05},
            }
        )
        run = build_run(cfg)
        try:
            assert isinstance(run.engine, RayEngine) and run.engine.num_workers == 2
            record = run.federation.run(1)[-1]
            assert sorted(record.clients) == sorted(run.dataset.clients)
            assert len(set(run.engine.last_worker_pids.values())) == 2
            assert any(k.startswith("fed_") for k in record.metrics)
        finally:
            run.engine.close()


# ----------------------------------------------------------- a real cluster
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_node(args: list[str], log: Path, timeout_s: float = 90.0) -> subprocess.Popen[bytes]:
    """``ray start ARGS --block`` in its own process group; returns once the node is up."""
    cmd = [str(RAY_CLI), "start", *args, "--num-cpus=1", "--node-ip-address=127.0.0.1"]
    cmd += ["--disable-usage-stats", "--block"]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while "block forever" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_node(proc)
            raise AssertionError(f"ray start {' '.join(args)} failed:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)
    return proc


def _stop_node(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a ``ray start --block`` (it stops its node's processes), then SIGKILL its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what this node started
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_node_cluster_on_loopback() -> None:
    if not RAY_CLI.exists():
        pytest.skip(f"no `ray` command next to {sys.executable}")
    assert not ray.is_initialized()
    data, spec, g = _setup()
    tmp = _short_tmp()
    port = _free_port()
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        nodes.append(
            _start_node(
                [
                    "--head",
                    f"--port={port}",
                    f"--temp-dir={tmp}",
                    "--include-dashboard=false",
                    f"--dashboard-port={_free_port()}",
                    f"--ray-client-server-port={_free_port()}",
                    f"--dashboard-agent-listen-port={_free_port()}",
                ],
                tmp / "head.log",
            )
        )
        nodes.append(
            _start_node(
                [f"--address=127.0.0.1:{port}", f"--dashboard-agent-listen-port={_free_port()}"], tmp / "node.log"
            )
        )
        # One CPU per node and one per worker: the two workers must run on different nodes.
        engine = RayEngine(
            model_fn=MODEL_FN,
            dataset=data,
            spec=spec,
            address=f"127.0.0.1:{port}",
            num_workers=2,
            startup_timeout_s=120,
        )
        try:
            alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
            assert len(alive) == 2
            assert set(engine.worker_nodes) == set(alive)
            assert len(set(engine.worker_pids)) == 2
            cfg = TrainConfig(epochs=2, batch_size=5, lr=0.1)
            ins = _instructions(data, cfg)
            got = list(engine.run_cohort(g, ins))
            want = list(VectorizedEngine(model_fn=MODEL_FN, dataset=data, spec=spec).run_cohort(g, ins))
            _assert_same(got, want, g)
            assert set(engine.last_worker_pids.values()) == set(engine.worker_pids)
        finally:
            engine.close()  # disconnects this driver; the cluster keeps running
        assert not ray.is_initialized()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for proc in reversed(nodes):
            _stop_node(proc)
        _reap(tmp)
        left = _processes_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not left, f"ray processes left behind: {left}"
