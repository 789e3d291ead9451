"""The Store: schema and versioning, round records, checkpoints (atomicity, fallback,
retention), config-hash checks, resume after a simulated crash at every write point, and
a real SIGKILL of ``fedloom run`` mid-run that resumes to the bit-identical model."""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import fedloom.store.sqlite as store_mod
from fedloom.cli import app
from fedloom.core.config import load_config
from fedloom.core.errors import StoreError
from fedloom.core.history import RoundRecord
from fedloom.core.params import ParamSpec
from fedloom.core.types import TrainConfig
from fedloom.data.base import ClientData, FederatedDataset, Split, TaskSpec
from fedloom.engines.sequential import SequentialEngine
from fedloom.federation.loop import Federation
from fedloom.store import SCHEMA_VERSION, RunHandle, Store
from fedloom.strategies.base import ServerState
from fedloom.strategies.scaffold import Scaffold

TASK = TaskSpec(kind="regression", input_shape=(3,), num_outputs=1, loss="mse", metrics=("mae", "loss"))
CONFIG = {"data": "toy", "strategy": "scaffold", "seed": 3}


class _Killed(BaseException):
    """Stands in for SIGKILL in the in-process crash tests (not an Exception: nothing catches it)."""


def _dataset(sizes: Sequence[int] = (13, 7, 21, 9)) -> FederatedDataset:
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([1.0, -2.0, 0.5])
    clients = {}
    for i, n in enumerate(sizes):
        x = torch.randn(n, 3, generator=g)
        clients[f"c{i}"] = ClientData(train=Split(x, x @ w + 0.3 * i), test=Split(x[:4], (x @ w)[:4]))
    x = torch.randn(16, 3, generator=g)
    return FederatedDataset("toy", TASK, clients, server_test=Split(x, x @ w))


def _federation(store: Store | None = None, run: RunHandle | None = None, *, checkpoint_every: int = 1) -> Federation:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    spec = ParamSpec.from_module(model)
    train = TrainConfig(loss="mse", epochs=2, batch_size=4, lr=0.05)
    return Federation(
        strategy=Scaffold(train=train, fraction=0.5, seed=3),
        engine=SequentialEngine(model_fn=lambda: nn.Linear(3, 1), dataset=_dataset(), spec=spec),
        spec=spec,
        initial=spec.module_vector(model),
        evaluate=lambda v: {"norm": float(v.norm())},
        store=store,
        run_handle=run,
        checkpoint_every=checkpoint_every,
    )


def _record(rnd: int, **kw: object) -> RoundRecord:
    base: dict = {
        "round": rnd,
        "metrics": {"test_loss": 1.0 / rnd, "train_loss": 2.0 / rnd},
        "clients": ["a", "b"],
        "num_examples": 30,
        "bytes_down": 100,
        "bytes_up": 90,
        "seconds": 0.5,
    }
    base.update(kw)
    return RoundRecord(**base)


def _state(rnd: int, value: float = 0.0) -> tuple[ServerState, ParamSpec]:
    spec = ParamSpec.from_state_dict({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    params = torch.arange(9, dtype=torch.float32) + value
    return ServerState(params=params, round=rnd, tensors={"m": params * 2}), spec


def _files(run: RunHandle) -> list[str]:
    return sorted(p.name for p in run.checkpoint_dir.iterdir())


# ------------------------------------------------------------------- schema
def test_schema_is_created_versioned_and_a_newer_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "fedloom.db"
    with Store.open(db):
        pass
    con = sqlite3.connect(db)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "runs", "rounds", "clients", "participation", "checkpoints"} <= tables
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Store.open(db):  # reopening an existing store is fine
        pass
    con.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    con.commit()
    con.close()
    with pytest.raises(StoreError, match=r"schema version 4, newer than this fedloom supports \(3\)"):
        Store.open(db)


def test_a_version_1_store_is_migrated_and_keeps_its_rounds(tmp_path: Path) -> None:
    """v2 added rounds.reason, v3 rounds.client_metrics: a v1 store opens, gains both, and its old rounds read back."""
    db = tmp_path / "fedloom.db"
    with Store.open(db) as store:
        run = store.start_or_resume_run("r", {"a": 1}, fresh=True)
        store.record_round(run, RoundRecord(round=1, metrics={"x": 1.0}, clients=["c"], num_examples=3,
                                            bytes_down=1, bytes_up=2, seconds=0.5))
    con = sqlite3.connect(db)
    con.execute("ALTER TABLE rounds DROP COLUMN reason")  # as version 1 wrote it
    con.execute("ALTER TABLE rounds DROP COLUMN client_metrics")
    con.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    con.commit()
    con.close()
    with Store.open(db, read_only=True) as store:  # read-only: read as it is, no reason
        assert store.history(store.find_run("r")).records[0].reason == ""
    with Store.open(db) as store:
        run = store.find_run("r")
        assert [r.num_examples for r in store.history(run)] == [3]
        store.record_round(run, RoundRecord(round=2, metrics={}, clients=[], num_examples=0, bytes_down=0,
                                            bytes_up=0, seconds=0.1, status="aborted", reason="too few",
                                            client_metrics={"c": {"pers_mae": 1.5}}))
        assert [(r.status, r.reason) for r in store.history(run)] == [("ok", ""), ("aborted", "too few")]
        assert [r.client_metrics for r in store.history(run)] == [{}, {"c": {"pers_mae": 1.5}}]
    con = sqlite3.connect(db)
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "3"


def test_open_refuses_what_is_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store at"):
        Store.open(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.close()
    with pytest.raises(StoreError, match="not a fedloom store"):
        Store.open(other)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable fedloom store"):
        Store.open(junk)


# ------------------------------------------------------------------- rounds
def test_round_records_round_trip_and_register_clients(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        run = store.start_or_resume_run("r", CONFIG)
        records = [
            _record(1),
            _record(2, clients=["b"], rejected={"a": "update has NaN/Inf"}, status="ok"),
            _record(3, clients=[], metrics={}, num_examples=0, status="insufficient"),
        ]
        for rec in records:
            store.record_round(run, rec)
        assert store.history(run).records == records
        store.record_round(run, _record(4, metrics={"test_loss": float("nan")}))
        assert math.isnan(store.history(run)[-1].metrics["test_loss"])

        clients = {c.client_id: c for c in store.clients()}
        assert clients["a"].rounds_participated == 2 and clients["a"].last_status == "ok"
        assert clients["b"].rounds_participated == 3
        assert clients["a"].first_seen <= clients["a"].last_seen
        store.record_round(run, _record(4, clients=["b"]))  # re-recording a round replaces it
        store.truncate(run, after_round=2)  # dropping rounds drops their participation
        assert [r.round for r in store.history(run)] == [1, 2]
        assert {c.client_id: c.rounds_participated for c in store.clients()} == {"a": 1, "b": 2}
        store.update_client("phone-7", status="connected", seen=123.0)
        phone = next(c for c in store.clients() if c.client_id == "phone-7")
        assert (phone.first_seen, phone.last_seen, phone.rounds_participated, phone.last_status) == (
            123.0, 123.0, 0, "connected",
        )  # fmt: skip
        [info] = store.list_runs()
        assert (info.name, info.status, info.rounds_done, info.last_checkpoint) == ("r", "running", 2, None)
        assert info.latest_metrics == _record(2).metrics


# -------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_layout_and_metadata(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        run = store.start_or_resume_run("my run", CONFIG)
        state, spec = _state(4)
        clients = {"c0/control": torch.ones(9), "c1/control": torch.full((9,), 2.0)}
        path = store.save_checkpoint(run, state, clients, spec)
        assert path.parent.parent == tmp_path / "checkpoints" and path.name == "round-000004.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert ParamSpec.from_json(meta["spec"]) == spec and meta["config_hash"] == run.config_hash
        assert meta["round"] == "4"
        ckpt = store.latest_checkpoint(run, spec=spec)
        assert ckpt is not None
        loaded, loaded_clients = ckpt
        assert loaded.round == 4 and torch.equal(loaded.params, state.params)
        assert torch.equal(loaded.tensors["m"], state.tensors["m"])
        assert loaded_clients.keys() == clients.keys()
        assert all(torch.equal(loaded_clients[k], v) for k, v in clients.items())
        other = ParamSpec.from_state_dict({"w": torch.zeros(9)})
        with pytest.raises(StoreError, match="different model layout"):
            store.latest_checkpoint(run, spec=other)


def test_checkpoint_keeps_the_server_state_meta(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        run = store.start_or_resume_run("r", CONFIG)
        state, spec = _state(3)
        state = replace(state, meta={"a": [1, 2], "b": "x"})
        path = store.save_checkpoint(run, state, {}, spec)
        with safe_open(str(path), "pt") as f:
            assert json.loads(f.metadata()["server_meta"]) == {"a": [1, 2], "b": "x"}
        ckpt = store.latest_checkpoint(run, spec=spec)
        assert ckpt is not None
        assert dict(ckpt.state.meta) == {"a": [1, 2], "b": "x"} and ckpt.state.round == 3
        assert torch.equal(ckpt.state.params, state.params) and torch.equal(ckpt.state.tensors["m"], state.tensors["m"])


def test_leftover_temp_and_orphan_files_are_ignored_then_cleaned(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        run = store.start_or_resume_run("r", CONFIG)
        state, spec = _state(1)
        store.save_checkpoint(run, state, {}, spec)
        # A kill mid-write leaves a temp file; a kill before the commit leaves an unreferenced file.
        (run.checkpoint_dir / ".round-000002.safetensors.k3j2.tmp").write_bytes(b"\x00partial")
        (run.checkpoint_dir / "round-000002.safetensors").write_bytes(b"garbage, never committed")
        ckpt = store.latest_checkpoint(run)
        assert ckpt is not None and ckpt.state.round == 1
        store.save_checkpoint(run, _state(2, 1.0)[0], {}, spec)
        assert _files(run) == ["round-000001.safetensors", "round-000002.safetensors"]
        ckpt = store.latest_checkpoint(run)
        assert ckpt is not None and torch.equal(ckpt.state.params, _state(2, 1.0)[0].params)


def test_corrupt_or_missing_latest_checkpoint_falls_back_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Store.open(tmp_path / "s.db") as store:
        run = store.start_or_resume_run("r", CONFIG)
        _, spec = _state(0)
        paths = [store.save_checkpoint(run, _state(rnd, rnd)[0], {}, spec) for rnd in (1, 2, 3)]
        data = bytearray(paths[2].read_bytes())
        data[-1] ^= 0xFF  # one flipped bit in the tensor data
        paths[2].write_bytes(bytes(data))
        with caplog.at_level(logging.WARNING, logger="fedloom.store"):
            ckpt = store.latest_checkpoint(run)
        assert ckpt is not None and ckpt.state.round == 2
        assert "round 3" in caplog.text and "sha256 mismatch" in caplog.text
        caplog.clear()
        paths[1].unlink()
        with caplog.at_level(logging.WARNING, logger="fedloom.store"):
            ckpt = store.latest_checkpoint(run)
        assert ckpt is not None and ckpt.state.round == 1 and torch.equal(ckpt.state.params, _state(1, 1)[0].params)
        assert "round 2" in caplog.text and "cannot read file" in caplog.text
        paths[0].write_bytes(b"")
        with caplog.at_level(logging.WARNING, logger="fedloom.store"):
            assert store.latest_checkpoint(run) is None
        assert "no usable checkpoint among 3" in caplog.text


def test_only_the_newest_checkpoints_are_kept(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db", keep_checkpoints=2) as store:
        run = store.start_or_resume_run("r", CONFIG)
        _, spec = _state(0)
        for rnd in range(1, 6):
            store.save_checkpoint(run, _state(rnd)[0], {}, spec)
        assert _files(run) == ["round-000004.safetensors", "round-000005.safetensors"]
        assert store.list_runs()[0].last_checkpoint == 5
    with Store.open(tmp_path / "s.db") as store:  # the default keeps 3
        run = store.start_or_resume_run("r", CONFIG)
        for rnd in range(6, 10):
            store.save_checkpoint(run, _state(rnd)[0], {}, spec)
        assert _files(run) == [f"round-00000{r}.safetensors" for r in (7, 8, 9)]


# ------------------------------------------------------------------ configs
def test_same_config_resumes_other_config_is_an_error_unless_fresh(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store:
        run = store.start_or_resume_run("r", CONFIG)
        assert not run.resumed
        store.record_round(run, _record(1))
        state, spec = _state(1)
        store.save_checkpoint(run, state, {}, spec)
        again = store.start_or_resume_run("r", dict(reversed(CONFIG.items())))  # key order is irrelevant
        assert again.resumed and again.id == run.id
        with pytest.raises(StoreError, match=r"run 'r' .* different config .*fedloom run --fresh"):
            store.start_or_resume_run("r", {**CONFIG, "seed": 4})
        new = store.start_or_resume_run("r", {**CONFIG, "seed": 4}, fresh=True)
        assert not new.resumed and new.id != run.id
        assert len(store.history(new)) == 0 and store.latest_checkpoint(new) is None
        assert not run.checkpoint_dir.exists()
        assert [i.name for i in store.list_runs()] == ["r"]
        with pytest.raises(StoreError, match="not JSON-serializable"):
            store.start_or_resume_run("x", {"f": object()})


def test_federation_needs_store_and_run_handle_together(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as store, pytest.raises(ValueError, match="go together"):
        _federation(store, None)


# ---------------------------------------------------- simulated crash points
@pytest.mark.parametrize("kill_point", ["after_record", "after_checkpoint_file", "mid_round_between_checkpoints"])
def test_resume_after_a_crash_at_each_write_point_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kill_point: str
) -> None:
    reference = _federation()
    reference.run(5)

    every = 2 if kill_point == "mid_round_between_checkpoints" else 1
    db = tmp_path / "s.db"
    store = Store.open(db)
    fed = _federation(store, store.start_or_resume_run("toy", CONFIG), checkpoint_every=every)
    callback = None
    with monkeypatch.context() as m:
        if kill_point == "after_record":  # round 3 recorded, its checkpoint never started
            real_save = Store.save_checkpoint

            def save(self: Store, run: RunHandle, state: ServerState, *a: object) -> Path:
                if state.round == 3:
                    raise _Killed
                return real_save(self, run, state, *a)  # type: ignore[arg-type]

            m.setattr(Store, "save_checkpoint", save)
        elif kill_point == "after_checkpoint_file":  # round-000003 durable on disk, its row not committed
            real_write = store_mod._atomic_write

            def write(path: Path, data: bytes) -> None:
                real_write(path, data)
                if path.name == "round-000003.safetensors":
                    raise _Killed

            m.setattr(store_mod, "_atomic_write", write)
        else:  # checkpoint every 2: round 3 recorded, killed while training round 4

            def callback(rec: RoundRecord, _state: ServerState) -> None:
                if rec.round == 3:
                    raise _Killed

        with pytest.raises(_Killed):
            fed.run(5, callback=callback)
    store.close()

    with Store.open(db) as store2:
        run = store2.start_or_resume_run("toy", CONFIG)
        assert run.resumed
        resumed = _federation(store2, run, checkpoint_every=every)
        assert resumed.resumed_from == 2 and [r.round for r in resumed.history] == [1, 2]
        assert [p.name for p in run.checkpoint_dir.iterdir() if "000003" in p.name] == []
        resumed.run(5)
        assert torch.equal(resumed.state.params, reference.state.params)
        assert torch.equal(resumed.state.tensors["control"], reference.state.tensors["control"])
        for h in (resumed.history, store2.history(run)):
            assert [r.round for r in h] == [1, 2, 3, 4, 5]
            assert [(r.clients, r.metrics) for r in h] == [(r.clients, r.metrics) for r in reference.history]
        [info] = store2.list_runs()
        assert (info.status, info.rounds_done, info.last_checkpoint) == ("completed", 5, 5)
        participated = {c.client_id: c.rounds_participated for c in store2.clients()}
        expected: dict[str, int] = {}
        for r in reference.history:
            for cid in r.clients:
                expected[cid] = expected.get(cid, 0) + 1
        assert participated == expected


# ----------------------------------------------------------------- the CLI
EQUIPMENT = """
[run]
name = "eq"
seed = 3
rounds = {rounds}
store = "{store}"
checkpoint_every = 2

[data]
name = "equipment"

[model]
name = "linear"

[strategy]
name = "fedadam"
fraction = 0.67

[client]
batch_size = 64
lr = 0.01
max_steps = 10
"""


def test_cli_resumes_lists_runs_and_refuses_a_changed_config(tmp_path: Path) -> None:
    cfg = tmp_path / "eq.toml"
    db = tmp_path / "store" / "fedloom.db"
    cfg.write_text(EQUIPMENT.format(rounds=2, store=db))
    runner = CliRunner()
    first = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out"), "-q"])
    assert first.exit_code == 0, first.output
    assert "resumed" not in first.output
    again = runner.invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out"), "-q"])
    assert again.exit_code == 0 and "resumed from round 2" in again.output, again.output
    longer = runner.invoke(app, ["run", str(cfg), "--set", "run.rounds=3", "--out", str(tmp_path / "out3"), "-q"])
    assert longer.exit_code == 0 and "resumed from round 2" in longer.output, longer.output
    assert [h["round"] for h in json.loads((tmp_path / "out3" / "history.json").read_text())] == [1, 2, 3]
    changed = runner.invoke(app, ["run", str(cfg), "--set", "client.lr=0.02", "-q"])
    assert changed.exit_code == 2 and "different config" in changed.output and "--fresh" in changed.output
    assert "Traceback" not in changed.output
    fresh = runner.invoke(
        app, ["run", str(cfg), "--set", "client.lr=0.02", "--fresh", "-q", "--out", str(tmp_path / "o2")]
    )
    assert fresh.exit_code == 0 and "resumed" not in fresh.output, fresh.output
    listing = runner.invoke(app, ["runs", "--store", str(db)])
    assert listing.exit_code == 0, listing.output
    assert re.search(r"eq\s+│\s+completed\s+│\s+2\s+│\s+2", listing.output), listing.output
    assert "test_f1=" in listing.output
    missing = runner.invoke(app, ["runs", "--store", str(tmp_path / "nope.db")])
    assert missing.exit_code == 2 and "no store at" in missing.output


# ------------------------------------------------------------ a real SIGKILL
def _kill_mid_run(proc: subprocess.Popen[bytes], db: Path, *, after_round: int, timeout: float = 300.0) -> str:
    """SIGKILL ``proc`` once the store shows ``after_round`` recorded; return where it died.

    The kill happens while this process holds the store's write lock, so the run cannot
    get further (or finish) meanwhile: it dies either blocked at the commit of a checkpoint
    whose file it has already written, or training the next round.
    """
    end = time.monotonic() + timeout

    def alive() -> None:
        assert proc.poll() is None, "the run finished before it could be killed"
        assert time.monotonic() < end, "timed out waiting for the run"

    while not db.exists():
        alive()
        time.sleep(0.01)
    con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=60.0, isolation_level=None)
    try:
        while True:
            alive()
            try:
                (done,) = con.execute("SELECT coalesce(max(round), 0) FROM rounds").fetchone()
            except sqlite3.OperationalError:  # schema not there yet
                done = 0
            if done >= after_round:
                break
            time.sleep(0.002)
        con.execute("BEGIN IMMEDIATE")
        (rnd,) = con.execute("SELECT max(round) FROM rounds").fetchone()
        (ckpt,) = con.execute("SELECT coalesce(max(round), 0) FROM checkpoints").fetchone()
        where = f"training round {rnd + 1}"
        if rnd % 2 == 0 and ckpt < rnd:  # the checkpoint of `rnd` is due and not committed yet
            pending = db.parent / "checkpoints"
            while not any(pending.rglob(f"round-{rnd:06d}.safetensors")):
                alive()
                time.sleep(0.002)
            where = f"checkpoint file of round {rnd} written, row not committed"
        else:
            time.sleep(0.1)
        alive()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        con.execute("ROLLBACK")
    finally:
        con.close()
    return where


def test_sigkill_mid_run_then_rerun_equals_uninterrupted_bit_for_bit(tmp_path: Path) -> None:
    rounds = 6
    cfg = tmp_path / "eq.toml"
    cfg.write_text(EQUIPMENT.format(rounds=rounds, store="store/fedloom.db"))

    def cli(out: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "fedloom.cli", "run", str(cfg), "--out", out, "-q", *extra]

    # The uninterrupted reference runs alongside, with its own store.
    ref = subprocess.Popen(
        cli("ref", "--set", "run.store='ref/fedloom.db'"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with (tmp_path / "killed.log").open("wb") as log:
            proc = subprocess.Popen(cli("out"), cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
            try:
                where = _kill_mid_run(proc, tmp_path / "store" / "fedloom.db", after_round=4)
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert proc.returncode == -signal.SIGKILL
        assert not (tmp_path / "out" / "model.safetensors").exists()

        resumed = subprocess.run(cli("out"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        k = int(re.search(r"resumed from round (\d+)", resumed.stdout).group(1))  # type: ignore[union-attr]
        assert 2 <= k < rounds, (k, where)
        ref_out, _ = ref.communicate(timeout=300)
    finally:
        if ref.poll() is None:
            ref.kill()
    assert ref.returncode == 0, ref_out.decode()

    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[n], want[n]) for n in want), where
    hist = json.loads((tmp_path / "out" / "history.json").read_text())
    ref_hist = json.loads((tmp_path / "ref" / "history.json").read_text())
    assert [h["round"] for h in hist] == list(range(1, rounds + 1))
    assert [(h["clients"], h["metrics"]) for h in hist] == [(h["clients"], h["metrics"]) for h in ref_hist]
    identity = load_config(cfg).identity()
    final = []
    for name in ("store", "ref"):
        with Store.open(tmp_path / name / "fedloom.db", create=False) as store:
            [info] = store.list_runs()
            assert (info.status, info.rounds_done, info.last_checkpoint) == ("completed", rounds, rounds)
            run = store.start_or_resume_run("eq", identity)
            assert [r.round for r in store.history(run)] == list(range(1, rounds + 1))
            ckpt = store.latest_checkpoint(run)
            assert ckpt is not None
            final.append(ckpt.state)
    assert torch.equal(final[0].params, final[1].params)
    assert final[0].tensors.keys() == final[1].tensors.keys() != set()
    assert all(torch.equal(final[0].tensors[n], final[1].tensors[n]) for n in final[1].tensors), where
