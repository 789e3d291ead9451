"""The SQLite Store: a durable record of runs, rounds, clients and checkpoints, so a restarted run resumes.

Records live in SQLite (stdlib :mod:`sqlite3`); checkpoints are safetensors files in a
``checkpoints/`` directory next to the database, referenced from it by relative path and
SHA-256::

    <dir>/fedloom.db
    <dir>/checkpoints/<run>-<token>/round-000012.safetensors

A checkpoint holds the :class:`~fedloom.strategies.base.ServerState` (tensors, and its
``meta`` as JSON), the engine's client states and the
:class:`~fedloom.core.params.ParamSpec` (:mod:`fedloom.store.checkpoint`).

Crash safety rests on one write order:

1. a checkpoint file is written to a temporary file in its final directory, fsynced,
   renamed over its final name (:func:`os.replace`) and the directory fsynced;
2. only then is the row that references it committed;
3. only after that commit are checkpoints beyond the retention deleted (rows, then files).

A kill before 2 leaves at most an unreferenced file (ignored, and deleted by the next
save); a committed row always names a complete, durable file. The round loop commits a
round's record before that round's checkpoint, so a checkpoint at round k implies records
for rounds 1..k; on resume, records after the latest valid checkpoint are dropped
(:meth:`Store.truncate`) and those rounds rerun.

The database runs in WAL mode (readers such as ``fedloom runs`` never block the writer) with
``synchronous=FULL``: a commit is durable on return even across power loss, so no deleted
old checkpoint can be the only one a rolled-back database still references. The price is
one fsync of the WAL per commit, a few per round, negligible next to a round's training
and the checkpoint file's own fsync.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from fedloom.core.errors import StoreError
from fedloom.core.history import History, RoundRecord
from fedloom.core.params import ParamSpec
from fedloom.store.checkpoint import CHECKPOINT_FORMAT, Checkpoint, UnusableCheckpoint, decode_checkpoint, encode_checkpoint
from fedloom.store.checkpoint import atomic_write as _atomic_write
from fedloom.store.checkpoint import mkdir_durable as _mkdir_durable
from fedloom.strategies.base import ServerState

__all__ = [
    "CHECKPOINT_FORMAT",
    "SCHEMA_VERSION",
    "Checkpoint",
    "CheckpointInfo",
    "ClientInfo",
    "RunHandle",
    "RunInfo",
    "Store",
    "config_hash",
]

log = logging.getLogger("fedloom.store")

SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    config TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    checkpoint_dir TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    round INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    clients TEXT NOT NULL,
    num_examples INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL,
    bytes_up INTEGER NOT NULL,
    seconds REAL NOT NULL,
    status TEXT NOT NULL,
    rejected TEXT NOT NULL,
    recorded REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    client_metrics TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS clients (
    client_id TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    last_status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS participation (
    run_id INTEGER NOT NULL,
    round INTEGER NOT NULL,
    client_id TEXT NOT NULL,
    status TEXT NOT NULL,
    PRIMARY KEY (run_id, round, client_id),
    FOREIGN KEY (run_id, round) REFERENCES rounds(run_id, round) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS participation_by_client ON participation(client_id);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    round INTEGER NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (run_id, round)
);
"""


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``config`` (sorted keys, no whitespace)."""
    return hashlib.sha256(_canonical(config).encode()).hexdigest()


def _canonical(config: Mapping[str, Any]) -> str:
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"run config is not JSON-serializable: {exc}") from None


@dataclass(frozen=True)
class RunHandle:
    """A run opened in a :class:`Store`; pass it to the store's per-run methods.

    ``resumed`` is True when the store already held this run with the same config.
    """

    id: int
    name: str
    config_hash: str
    checkpoint_dir: Path
    resumed: bool


@dataclass(frozen=True)
class RunInfo:
    """One run as listed by :meth:`Store.list_runs`.

    ``rounds_done`` is the last recorded round (0 if none), ``last_checkpoint`` the round
    of the newest checkpoint row (None if none), ``latest_metrics`` that last round's metrics.
    """

    name: str
    status: str
    created: float
    config_hash: str
    rounds_done: int
    last_checkpoint: int | None
    latest_metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientInfo:
    """A client of the registry: when it was first and last seen, and how it took part.

    ``rounds_participated`` counts recorded rounds (over all runs) that accepted its update.
    """

    client_id: str
    first_seen: float
    last_seen: float
    rounds_participated: int
    last_status: str


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint row of a run: its round (the model version), file and creation time."""

    round: int
    path: Path
    sha256: str
    created: float


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:40] or "run"


class Store:
    """Runs, rounds, a client registry and checkpoints in one SQLite file plus a directory.

    Open with :meth:`open`. One process writes (the server loop); any number may read
    concurrently. Every method holds an internal lock, so the writer may be called from
    more than one thread. ``keep_checkpoints`` is how many checkpoints per run survive.
    """

    def __init__(
        self, path: str | Path, *, keep_checkpoints: int = 3, create: bool = True, read_only: bool = False
    ) -> None:
        if keep_checkpoints < 1:
            raise StoreError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
        self.path = Path(path).resolve()
        self.root = self.path.parent
        self.keep_checkpoints = keep_checkpoints
        self.read_only = read_only
        self._lock = threading.RLock()
        if not self.path.exists():
            if not create or read_only:
                raise StoreError(f"no store at {self.path}")
            self.root.mkdir(parents=True, exist_ok=True)
        try:
            if read_only:  # a reader (fedloom serve) never writes: SQLite refuses any write on this connection
                uri = f"{self.path.as_uri()}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None, check_same_thread=False)
            else:
                self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from None
        self._db.row_factory = sqlite3.Row
        try:
            if not read_only:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"{self.path} is not a usable fedloom store: {exc}") from None
        except StoreError:
            self._db.close()
            raise

    @classmethod
    def open(
        cls, path: str | Path, *, keep_checkpoints: int = 3, create: bool = True, read_only: bool = False
    ) -> Store:
        """Open (or, with ``create``, create) the store at ``path``; checkpoints go next to it.

        ``read_only`` opens an existing store for reading only (the model service, the
        dashboard): every write method raises :class:`StoreError`, and SQLite itself refuses
        writes on the connection; the writer process is never blocked (WAL).
        """
        return cls(path, keep_checkpoints=keep_checkpoints, create=create, read_only=read_only)

    def _init_schema(self) -> None:
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables and self.read_only:
            raise StoreError(f"{self.path} is not a fedloom store (no meta table)")
        if "meta" not in tables:
            if tables - {"sqlite_sequence"}:
                raise StoreError(f"{self.path} is an SQLite database but not a fedloom store (no meta table)")
            # IF NOT EXISTS / OR IGNORE: two processes creating the same new store both succeed.
            self._db.executescript(
                f"BEGIN IMMEDIATE;{_SCHEMA}"
                f"INSERT OR IGNORE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');COMMIT;"
            )
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = int(row[0]) if row is not None and str(row[0]).isdigit() else None
        if version is None:
            raise StoreError(f"{self.path}: meta table has no valid schema_version")
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this fedloom supports "
                f"({SCHEMA_VERSION}); upgrade fedloom to open it"
            )
        if version == 1 and not self.read_only:  # v2 adds rounds.reason (why a round was insufficient or aborted)
            self._db.executescript(
                "BEGIN IMMEDIATE;"
                "ALTER TABLE rounds ADD COLUMN reason TEXT NOT NULL DEFAULT '';"
                "UPDATE meta SET value='2' WHERE key='schema_version';COMMIT;"
            )
            version = 2
        if version == 2 and not self.read_only:  # v3 adds rounds.client_metrics (each client's own evaluation)
            self._db.executescript(
                "BEGIN IMMEDIATE;"
                "ALTER TABLE rounds ADD COLUMN client_metrics TEXT NOT NULL DEFAULT '{}';"
                "UPDATE meta SET value='3' WHERE key='schema_version';COMMIT;"
            )
            version = 3
        if version < 1:
            raise StoreError(f"{self.path} has schema version {version}; no migration to {SCHEMA_VERSION} exists")

    # ----------------------------------------------------------------- plumbing
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any error."""
        if self.read_only:
            raise StoreError(f"store {self.path} is open read-only")
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"store {self.path}: {exc}") from None
                raise

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from None

    def close(self) -> None:
        """Close the database connection (idempotent)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --------------------------------------------------------------------- runs
    def start_or_resume_run(self, name: str, config: Mapping[str, Any], *, fresh: bool = False) -> RunHandle:
        """Open run ``name``: resume it if the store holds it with the same config, else create it.

        A run of that name with a different config hash is a :class:`StoreError` unless
        ``fresh``, which deletes the old run (records and checkpoints) and starts over.
        """
        text = _canonical(config)
        digest = hashlib.sha256(text.encode()).hexdigest()
        old_dir: str | None = None
        with self._tx() as db:
            row = db.execute("SELECT id, config_hash, checkpoint_dir FROM runs WHERE name=?", (name,)).fetchone()
            if row is not None and not fresh:
                if row["config_hash"] != digest:
                    raise StoreError(
                        f"run {name!r} in {self.path} was started with a different config "
                        f"(hash {row['config_hash'][:12]}, now {digest[:12]}); run it with the same config "
                        "to resume, or start over with fresh=True (fedloom run --fresh)"
                    )
                db.execute("UPDATE runs SET status='running' WHERE id=?", (row["id"],))
                return RunHandle(row["id"], name, digest, self.root / row["checkpoint_dir"], resumed=True)
            if row is not None:
                db.execute("DELETE FROM runs WHERE id=?", (row["id"],))
                old_dir = row["checkpoint_dir"]
            ckpt_dir = f"checkpoints/{_slug(name)}-{secrets.token_hex(4)}"
            cur = db.execute(
                "INSERT INTO runs (name, config, config_hash, created, status, checkpoint_dir) "
                "VALUES (?, ?, ?, ?, 'running', ?)",
                (name, text, digest, time.time(), ckpt_dir),
            )
            run_id = cur.lastrowid
        assert run_id is not None
        if old_dir is not None:
            shutil.rmtree(self.root / old_dir, ignore_errors=True)
        return RunHandle(run_id, name, digest, self.root / ckpt_dir, resumed=False)

    def set_status(self, run: RunHandle, status: str) -> None:
        """Set the run's status (``running``, ``completed``, ``failed``, ``interrupted``)."""
        with self._tx() as db:
            db.execute("UPDATE runs SET status=? WHERE id=?", (status, run.id))

    def list_runs(self) -> list[RunInfo]:
        """Every run in the store, oldest first, with its progress and latest metrics."""
        rows = self._query(
            "SELECT r.name, r.status, r.created, r.config_hash,"
            " (SELECT max(round) FROM rounds WHERE run_id=r.id) AS rounds_done,"
            " (SELECT max(round) FROM checkpoints WHERE run_id=r.id) AS last_checkpoint,"
            " (SELECT metrics FROM rounds WHERE run_id=r.id ORDER BY round DESC LIMIT 1) AS metrics "
            "FROM runs r ORDER BY r.created, r.id"
        )
        return [
            RunInfo(
                name=r["name"],
                status=r["status"],
                created=r["created"],
                config_hash=r["config_hash"],
                rounds_done=r["rounds_done"] or 0,
                last_checkpoint=r["last_checkpoint"],
                latest_metrics=json.loads(r["metrics"]) if r["metrics"] else {},
            )
            for r in rows
        ]

    def find_run(self, name: str) -> RunHandle | None:
        """The handle of run ``name`` for reading (history, checkpoints), or None if absent."""
        rows = self._query("SELECT id, config_hash, checkpoint_dir FROM runs WHERE name=?", (name,))
        if not rows:
            return None
        r = rows[0]
        return RunHandle(r["id"], name, r["config_hash"], self.root / r["checkpoint_dir"], resumed=True)

    def run_config(self, run: RunHandle) -> dict[str, Any]:
        """The config the run was started with (its identity: see ``RunConfig.identity``)."""
        rows = self._query("SELECT config FROM runs WHERE id=?", (run.id,))
        if not rows:
            raise StoreError(f"run {run.name!r} is no longer in {self.path}")
        return dict(json.loads(rows[0]["config"]))

    def run_status(self, run: RunHandle) -> str:
        """The run's status now (``running``, ``completed``, ...)."""
        rows = self._query("SELECT status FROM runs WHERE id=?", (run.id,))
        if not rows:
            raise StoreError(f"run {run.name!r} is no longer in {self.path}")
        return str(rows[0]["status"])

    def checkpoints(self, run: RunHandle) -> list[CheckpointInfo]:
        """The run's checkpoint rows, oldest first (the newest ``keep_checkpoints`` survive)."""
        rows = self._query("SELECT round, path, sha256, created FROM checkpoints WHERE run_id=? ORDER BY round", (run.id,))
        return [CheckpointInfo(r["round"], self.root / r["path"], r["sha256"], r["created"]) for r in rows]

    def load_checkpoint(self, run: RunHandle, round: int) -> tuple[Checkpoint, ParamSpec]:
        """The checkpoint of ``run`` at ``round`` and its layout; :class:`StoreError` if absent or unusable."""
        rows = self._query("SELECT round, path, sha256 FROM checkpoints WHERE run_id=? AND round=?", (run.id, round))
        if not rows:
            raise StoreError(f"run {run.name!r} has no checkpoint of round {round}")
        try:
            return self._load(run, rows[0])
        except UnusableCheckpoint as exc:
            raise StoreError(f"run {run.name!r}: checkpoint of round {round} is unusable: {exc}") from None

    # ------------------------------------------------------------------- rounds
    def record_round(self, run: RunHandle, record: RoundRecord) -> None:
        """Record one round (replacing an earlier record of it) and register its clients.

        Accepted clients count as having participated; rejected ones are registered with
        ``rejected: <reason>`` as their last status. One transaction.
        """
        now = time.time()
        with self._tx() as db:
            db.execute("DELETE FROM rounds WHERE run_id=? AND round=?", (run.id, record.round))
            db.execute(
                "INSERT INTO rounds (run_id, round, metrics, clients, num_examples, bytes_down, bytes_up,"
                " seconds, status, rejected, recorded, reason, client_metrics) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run.id,
                    record.round,
                    json.dumps(record.metrics),
                    json.dumps(record.clients),
                    record.num_examples,
                    record.bytes_down,
                    record.bytes_up,
                    record.seconds,
                    record.status,
                    json.dumps(record.rejected),
                    now,
                    record.reason,
                    json.dumps(record.to_dict()["client_metrics"]),
                ),
            )
            # Rejected first: a client rejected and then accepted in the same round counts as ok.
            entries = [(cid, "rejected", f"rejected: {why}") for cid, why in record.rejected.items()]
            entries += [(cid, "ok", "ok") for cid in record.clients]
            for cid, part, status in entries:
                db.execute(
                    "INSERT OR REPLACE INTO participation VALUES (?, ?, ?, ?)", (run.id, record.round, cid, part)
                )
                self._upsert_client(db, cid, status, now)

    def history(self, run: RunHandle) -> History:
        """The run's recorded rounds, in order."""
        rows = self._query("SELECT * FROM rounds WHERE run_id=? ORDER BY round", (run.id,))
        return History(
            [
                RoundRecord(
                    round=r["round"],
                    metrics=json.loads(r["metrics"]),
                    clients=json.loads(r["clients"]),
                    num_examples=r["num_examples"],
                    bytes_down=r["bytes_down"],
                    bytes_up=r["bytes_up"],
                    seconds=r["seconds"],
                    rejected=json.loads(r["rejected"]),
                    status=r["status"],
                    reason=r["reason"] if "reason" in r.keys() else "",  # a read-only v1 store has none
                    client_metrics=RoundRecord.from_dict(
                        {"round": r["round"], "client_metrics": json.loads(r["client_metrics"])}
                    ).client_metrics if "client_metrics" in r.keys() else {},  # fmt: skip
                )
                for r in rows
            ]
        )

    def truncate(self, run: RunHandle, *, after_round: int) -> None:
        """Drop the run's round records and checkpoints after ``after_round`` (to rerun them)."""
        with self._tx() as db:
            db.execute("DELETE FROM rounds WHERE run_id=? AND round>?", (run.id, after_round))
            db.execute("DELETE FROM checkpoints WHERE run_id=? AND round>?", (run.id, after_round))
        self._prune_files(run)

    # ------------------------------------------------------------------ clients
    @staticmethod
    def _upsert_client(db: sqlite3.Connection, client_id: str, status: str, seen: float) -> None:
        db.execute(
            "INSERT INTO clients (client_id, first_seen, last_seen, last_status) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(client_id) DO UPDATE SET last_seen=excluded.last_seen, last_status=excluded.last_status",
            (client_id, seen, seen, status),
        )

    def update_client(self, client_id: str, *, status: str, seen: float | None = None) -> None:
        """Register ``client_id`` (or update it): last seen at ``seen`` (default now) with ``status``."""
        with self._tx() as db:
            self._upsert_client(db, client_id, status, time.time() if seen is None else seen)

    def clients(self) -> list[ClientInfo]:
        """The client registry, by client id."""
        rows = self._query(
            "SELECT c.*, (SELECT count(*) FROM participation p WHERE p.client_id=c.client_id AND p.status='ok')"
            " AS n FROM clients c ORDER BY c.client_id"
        )
        return [ClientInfo(r["client_id"], r["first_seen"], r["last_seen"], r["n"], r["last_status"]) for r in rows]

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(
        self,
        run: RunHandle,
        state: ServerState,
        client_states: Mapping[str, torch.Tensor],
        spec: ParamSpec,
    ) -> Path:
        """Checkpoint ``state`` and the engine's ``client_states`` at round ``state.round``.

        The file is made durable before its row is committed; checkpoints beyond the newest
        ``keep_checkpoints`` are deleted afterwards. Returns the file's path.
        """
        data = encode_checkpoint(state, client_states, spec, run=run.name, config_hash=run.config_hash)
        digest = hashlib.sha256(data).hexdigest()
        path = run.checkpoint_dir / f"round-{state.round:06d}.safetensors"
        try:
            _mkdir_durable(run.checkpoint_dir)
            _atomic_write(path, data)
        except OSError as exc:
            raise StoreError(f"cannot write checkpoint {path}: {exc}") from None
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO checkpoints (run_id, round, path, sha256, created) VALUES (?, ?, ?, ?, ?)",
                (run.id, state.round, path.relative_to(self.root).as_posix(), digest, time.time()),
            )
            db.execute(
                "DELETE FROM checkpoints WHERE run_id=? AND round NOT IN "
                "(SELECT round FROM checkpoints WHERE run_id=? ORDER BY round DESC LIMIT ?)",
                (run.id, run.id, self.keep_checkpoints),
            )
        self._prune_files(run)
        return path

    def latest_checkpoint(self, run: RunHandle, *, spec: ParamSpec | None = None) -> Checkpoint | None:
        """The newest valid checkpoint of ``run``, or None if it has none.

        A checkpoint whose file is missing, fails its SHA-256 check or is malformed is
        skipped with a logged warning, falling back to the previous one. With ``spec``, a
        valid checkpoint of a different model layout is a :class:`StoreError`.
        """
        rows = self._query("SELECT round, path, sha256 FROM checkpoints WHERE run_id=? ORDER BY round DESC", (run.id,))
        for row in rows:
            try:
                ckpt, stored_spec = self._load(run, row)
            except UnusableCheckpoint as exc:
                log.warning(
                    "run %r: checkpoint of round %d (%s) is unusable: %s; falling back to an earlier one",
                    run.name, row["round"], row["path"], exc,
                )  # fmt: skip
                continue
            if spec is not None and stored_spec != spec:
                raise StoreError(
                    f"run {run.name!r}: checkpoint of round {row['round']} holds a different model layout "
                    "than this run's; start over with fresh=True (fedloom run --fresh)"
                )
            return ckpt
        if rows:
            log.warning("run %r: no usable checkpoint among %d; starting from round 0", run.name, len(rows))
        return None

    def _load(self, run: RunHandle, row: sqlite3.Row) -> tuple[Checkpoint, ParamSpec]:
        try:
            data = (self.root / row["path"]).read_bytes()
        except OSError as exc:
            raise UnusableCheckpoint(f"cannot read file: {exc.strerror or exc}") from None
        if hashlib.sha256(data).hexdigest() != row["sha256"]:
            raise UnusableCheckpoint("sha256 mismatch")
        ckpt, spec = decode_checkpoint(data, config_hash=run.config_hash)
        if ckpt.state.round != row["round"]:
            raise UnusableCheckpoint(f"holds round {ckpt.state.round}")
        return ckpt, spec

    def _prune_files(self, run: RunHandle) -> None:
        """Delete files in the run's checkpoint directory that no row references (old, temp, orphaned)."""
        if not run.checkpoint_dir.is_dir():
            return
        keep = {self.root / r["path"] for r in self._query("SELECT path FROM checkpoints WHERE run_id=?", (run.id,))}
        for f in run.checkpoint_dir.iterdir():
            if f not in keep and f.is_file():
                f.unlink(missing_ok=True)
