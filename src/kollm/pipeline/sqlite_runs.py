"""kollm's own run bookkeeping written into an MLflow SQLite tracking store with the standard library's sqlite3.

Why: `import mlflow` takes about 3 s and every call through MLflow's SQLAlchemy store several ms, so a fully
cached `kollm run` (seven runs of a few rows each) was slower than `dvc repro`. When the project's SQLite store
was already created by MLflow and its schema is at a revision listed in SCHEMA_REVISIONS, kollm writes the same
rows MLflow's SqlAlchemyStore writes for create_run / log_batch / set_terminated (tables runs, tags, params,
metrics, latest_metrics), in one short transaction per call. They are ordinary MLflow runs: MLflow, its UI,
`kollm runs` and `kollm show` read them back; MLflow stays the one source of truth.

Anything else returns None / False so that the caller uses MLflow's own client, whose checks and errors then
apply: a store or experiment that does not exist yet, another schema revision (a newer or older MLflow),
PostgreSQL and other databases, workspaces, a changed param value, an overlong or odd key or value, the run-name
tag, a run that is not active. tests/pipeline/test_sqlite_runs.py checks that the rows match MLflow's own.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import sqlite3
import threading
import time
import uuid
from types import TracebackType
from urllib.parse import quote

# Alembic revisions of MLflow's tracking schema this writer was checked against (MLflow 3.17). A store at any
# other revision is written through MLflow. A test fails when the installed MLflow's schema head is not listed.
SCHEMA_REVISIONS = frozenset({"dc11669786a5"})

MAX_KEY_LEN = 250  # MLflow's MAX_ENTITY_KEY_LENGTH
MAX_PARAM_VAL_LEN = 6000  # MAX_PARAM_VAL_LENGTH
MAX_TAG_VAL_LEN = 8000  # MAX_TAG_VAL_LENGTH
RUN_NAME_TAG = "mlflow.runName"
_NAME_OK = re.compile(r"^[/\w.\- :]*$")
# artifact locations whose run artifact URI is simply LOCATION/<run id>/artifacts (no query, params or fragment)
_PLAIN_LOCATION = re.compile(r"^(?:[a-z][a-z0-9+.\-]*://[^/?#;]*)?/[^?#;]*$")


def bad_key(name: str) -> bool:
    """True when MLflow would reject `name` as a metric, param or tag key (its characters, or MLflow's
    path_not_unique: a key that is not its own normal path, `.`, or one reaching above or starting at `/`)."""
    norm = posixpath.normpath(name)
    return not name or not _NAME_OK.match(name) or norm != name or norm == "." or norm.startswith(("..", "/"))


def safe_key(name: str) -> str:
    """`name` with each character MLflow refuses in a key replaced by `_` (`registry:NAME@champion` ->
    `registry:NAME_champion`), for keys made from free text such as a step's references."""
    return re.sub(r"[^/\w.\- :]", "_", name)


def _key_ok(key: object) -> bool:
    return isinstance(key, str) and len(key) <= MAX_KEY_LEN and not bad_key(key)


def _now_ms() -> int:
    return int(time.time() * 1000)


class SqliteRuns:
    """Runs of one experiment in an MLflow SQLite store; `open` returns None where MLflow must do the writing."""

    def __init__(self, conn: sqlite3.Connection, experiment_id: str, artifact_location: str):
        self._conn = conn
        self._lock = threading.Lock()
        self.experiment_id = experiment_id
        self._artifact_location = artifact_location.rstrip("/")

    @classmethod
    def open(cls, uri: str, experiment: str) -> SqliteRuns | None:
        if (
            not uri.startswith("sqlite:///")
            or "?" in uri
            or os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in ("1", "true")
        ):
            return None
        path = uri.removeprefix("sqlite:///")
        if not os.path.isfile(path):
            return None  # a new store: MLflow creates the schema
        try:
            conn = sqlite3.connect(
                f"file:{quote(os.path.abspath(path))}?mode=rw",
                uri=True,
                timeout=30,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error:
            return None
        try:
            revisions = [r[0] for r in conn.execute("SELECT version_num FROM alembic_version")]
            row = conn.execute(
                "SELECT experiment_id, artifact_location, lifecycle_stage FROM experiments WHERE name = ? AND workspace = 'default'",
                (experiment,),
            ).fetchone()
            if len(revisions) != 1 or revisions[0] not in SCHEMA_REVISIONS or row is None or row[2] != "active":
                conn.close()
                return None
            if not isinstance(row[1], str) or not _PLAIN_LOCATION.match(row[1]):
                conn.close()
                return None
            # as kollm's MLflow connections do (tracking._sqlite_wal): WAL, one fsync per checkpoint
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error:
            conn.close()
            return None
        return cls(conn, str(row[0]), row[1])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def experiment_tag(self, key: str) -> str | None:
        """The value of one tag of this experiment (None: not set). Read only: experiment tags are MLflow's to write."""
        with self._lock:
            row = self._conn.execute(
                "SELECT value FROM experiment_tags WHERE experiment_id = ? AND key = ?", (int(self.experiment_id), key)
            ).fetchone()
        return None if row is None else str(row[0])

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn, self._lock)

    def create_run(self, run_name: str, tags: dict[str, str]) -> str | None:
        """The new run's id, as MlflowClient.create_run(experiment_id, run_name=..., tags=...) makes it; None: use MLflow."""
        if RUN_NAME_TAG in tags or not run_name or len(run_name) > MAX_KEY_LEN:
            return None
        if not all(_key_ok(k) and isinstance(v, str) and len(v) <= MAX_TAG_VAL_LEN for k, v in tags.items()):
            return None
        run_id = uuid.uuid4().hex
        artifact_uri = f"{self._artifact_location}/{run_id}/artifacts"
        with self._transaction() as cur:
            row = cur.execute(
                "SELECT lifecycle_stage FROM experiments WHERE experiment_id = ?", (int(self.experiment_id),)
            ).fetchone()
            if row is None or row[0] != "active":
                raise _UseMlflow
            cur.execute(
                "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, user_id, status, start_time,"
                " end_time, deleted_time, source_version, lifecycle_stage, artifact_uri, experiment_id)"
                " VALUES (?, ?, 'UNKNOWN', '', '', ?, 'RUNNING', ?, NULL, NULL, '', 'active', ?, ?)",
                (
                    run_id,
                    run_name,
                    tags.get("mlflow.user", "unknown"),
                    _now_ms(),
                    artifact_uri,
                    int(self.experiment_id),
                ),
            )
            cur.executemany(
                "INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?)",
                [(k, v, run_id) for k, v in tags.items()] + [(RUN_NAME_TAG, run_name, run_id)],
            )
        return None if cur.use_mlflow else run_id

    def log_batch(
        self,
        run_id: str,
        params: dict[str, str],
        metrics: dict[str, float],
        tags: dict[str, str],
        *,
        timestamp: int,
        step: int,
    ) -> bool:
        """MlflowClient.log_batch for one run; False: nothing was written, use MLflow."""
        if RUN_NAME_TAG in tags:
            return False
        if not all(_key_ok(k) for k in (*params, *metrics, *tags)):
            return False
        if not all(isinstance(v, str) and len(v) <= MAX_PARAM_VAL_LEN for v in params.values()):
            return False
        if not all(isinstance(v, str) and len(v) <= MAX_TAG_VAL_LEN for v in tags.values()):
            return False
        if (
            not all(isinstance(v, float) for v in metrics.values())
            or type(step) is not int
            or type(timestamp) is not int
        ):
            return False
        rows = [(k, *_sanitize(v)) for k, v in metrics.items()]
        with self._transaction() as cur:
            if not _active(cur, run_id):
                raise _UseMlflow
            if params:
                marks = ",".join("?" * len(params))
                existing = cur.execute(
                    f"SELECT key, value FROM params WHERE run_uuid = ? AND key IN ({marks})", (run_id, *params)
                ).fetchall()
                if any(params[k] != v for k, v in existing):
                    raise _UseMlflow  # a changed param: MLflow refuses it with its own message
                cur.executemany(
                    "INSERT OR IGNORE INTO params (key, value, run_uuid) VALUES (?, ?, ?)",
                    [(k, v, run_id) for k, v in params.items()],
                )
            if rows:
                cur.executemany(
                    "INSERT OR IGNORE INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, ?)",
                    [(k, value, timestamp, run_id, step, is_nan) for k, is_nan, value in rows],
                )
                # latest_metrics keeps the value with the greatest (step, timestamp, value), as MLflow does
                cur.executemany(
                    "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (key, run_uuid) DO UPDATE SET value = excluded.value, timestamp = excluded.timestamp,"
                    " step = excluded.step, is_nan = excluded.is_nan"
                    " WHERE (excluded.step, excluded.timestamp, excluded.value) > (latest_metrics.step, latest_metrics.timestamp, latest_metrics.value)",
                    [(k, value, timestamp, step, is_nan, run_id) for k, is_nan, value in rows],
                )
            if tags:
                cur.executemany(
                    "INSERT INTO tags (key, value, run_uuid) VALUES (?, ?, ?) ON CONFLICT (key, run_uuid) DO UPDATE SET value = excluded.value",
                    [(k, v, run_id) for k, v in tags.items()],
                )
        return not cur.use_mlflow

    def set_terminated(self, run_id: str, status: str) -> bool:
        """MlflowClient.set_terminated; False: use MLflow."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            return False
        with self._transaction() as cur:
            updated = cur.execute(
                "UPDATE runs SET status = ?, end_time = ? WHERE run_uuid = ? AND lifecycle_stage = 'active'",
                (status, _now_ms(), run_id),
            ).rowcount
            if updated != 1:
                raise _UseMlflow
        return not cur.use_mlflow

    def log_dataset_input(
        self, run_id: str, name: str, digest: str, source_type: str, source: str, profile: str, tags: dict[str, str]
    ) -> bool:
        """MlflowClient.log_inputs(run_id, datasets=[DatasetInput(Dataset(name, digest, source_type, source,
        profile=profile), tags)]) for a run of this experiment: the dataset row (reused when the experiment has one of
        that name and digest), the run's input edge to it and the edge's tags. False: nothing written, use MLflow."""
        if not (
            0 < len(name) <= 500 and 0 < len(digest) <= 36 and len(source) <= 65535 and len(profile) <= 16777215
        ) or not all(0 < len(k) <= 255 and len(v) <= 500 for k, v in tags.items()):
            return False
        with self._transaction() as cur:
            run = cur.execute(
                "SELECT lifecycle_stage, experiment_id FROM runs WHERE run_uuid = ?", (run_id,)
            ).fetchone()
            if run is None or run[0] != "active" or str(run[1]) != self.experiment_id:
                raise _UseMlflow
            exp = int(self.experiment_id)
            row = cur.execute(
                "SELECT dataset_uuid FROM datasets WHERE experiment_id = ? AND name = ? AND digest = ?",
                (exp, name, digest),
            ).fetchone()
            dataset_uuid = row[0] if row else uuid.uuid4().hex
            if row is None:
                cur.execute(
                    "INSERT INTO datasets (dataset_uuid, experiment_id, name, digest, dataset_source_type,"
                    " dataset_source, dataset_schema, dataset_profile) VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                    (dataset_uuid, exp, name, digest, source_type, source, profile),
                )
            edge = cur.execute(
                "SELECT 1 FROM inputs WHERE source_type = 'DATASET' AND source_id = ? AND destination_type = 'RUN'"
                " AND destination_id = ?",
                (dataset_uuid, run_id),
            ).fetchone()
            if edge is None:  # as MLflow: an edge the run already has keeps its tags
                input_uuid = uuid.uuid4().hex
                cur.execute(
                    "INSERT INTO inputs (input_uuid, source_type, source_id, destination_type, destination_id, step)"
                    " VALUES (?, 'DATASET', ?, 'RUN', ?, 0)",
                    (input_uuid, dataset_uuid, run_id),
                )
                cur.executemany(
                    "INSERT INTO input_tags (input_uuid, name, value) VALUES (?, ?, ?)",
                    [(input_uuid, k, v) for k, v in tags.items()],
                )
        return not cur.use_mlflow

    def local_artifact_dir(self, run_id: str) -> str | None:
        """The local folder of an active run's artifacts (its artifact URI is a plain file:// URI or an absolute
        path); None: somewhere else (an object store, a tracking server's proxy), or no such active run."""
        with self._lock:
            row = self._conn.execute(
                "SELECT artifact_uri, lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)
            ).fetchone()
        if row is None or row[1] != "active" or not isinstance(row[0], str):
            return None
        uri = row[0]
        if uri.startswith("file://"):
            rest = uri.removeprefix("file://")
            if not rest.startswith("/") or any(c in rest for c in "?#;%"):  # a host, or anything to unquote
                return None
            return rest
        return uri if uri.startswith("/") and not any(c in uri for c in "?#;") else None

    def running_runs(self, host: str, limit: int = 200) -> list[tuple[str, str | None]]:
        """(run id, kollm.pid tag) of this experiment's active RUNNING runs tagged with kollm.host = host, newest first."""
        with self._lock:
            return self._conn.execute(
                "SELECT r.run_uuid, p.value FROM runs r"
                " JOIN tags h ON h.run_uuid = r.run_uuid AND h.key = 'kollm.host'"
                " LEFT JOIN tags p ON p.run_uuid = r.run_uuid AND p.key = 'kollm.pid'"
                " WHERE r.experiment_id = ? AND r.status = 'RUNNING' AND r.lifecycle_stage = 'active' AND h.value = ?"
                " ORDER BY r.start_time DESC LIMIT ?",
                (int(self.experiment_id), host, limit),
            ).fetchall()


def _sanitize(value: float) -> tuple[int, float]:
    """(is_nan, stored value) as MLflow's SqlAlchemyStore.sanitize_metric_value stores a metric."""
    if math.isnan(value):
        return 1, 0.0
    if math.isinf(value):
        return 0, 1.7976931348623157e308 if value > 0 else -1.7976931348623157e308
    return 0, value


def _active(cur: _Transaction, run_id: str) -> bool:
    row = cur.execute("SELECT lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    return row is not None and row[0] == "active"


class _UseMlflow(Exception):
    """Raised inside a transaction: roll it back and let MLflow's client do this write."""


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT; rolled back on any error. `_UseMlflow` is swallowed and sets `use_mlflow`."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock):
        self._conn, self._lock = conn, lock
        self.use_mlflow = False

    def __enter__(self) -> _Transaction:
        self._lock.acquire()
        try:
            self._cur = self._conn.cursor()
            self._cur.execute("BEGIN IMMEDIATE")
        except BaseException:
            self._lock.release()
            raise
        return self

    def execute(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        return self._cur.execute(sql, args)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        self._cur.executemany(sql, rows)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        try:
            if exc_type is None:
                try:
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            else:
                self._conn.execute("ROLLBACK")
        finally:
            self._cur.close()
            self._lock.release()
        if exc_type is _UseMlflow:
            self.use_mlflow = True
            return True
        return False


def alias_versions(uri: str, name: str, aliases: list[str]) -> dict[str, str | None] | None:
    """The version each alias of registered model `name` points at (None: unset), read from an MLflow SQLite
    store at a known schema revision without importing MLflow; None where MLflow must answer instead."""
    if (
        not uri.startswith("sqlite:///")
        or "?" in uri
        or os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in ("1", "true")
    ):
        return None
    path = uri.removeprefix("sqlite:///")
    if not os.path.isfile(path):
        return dict.fromkeys(aliases)  # no store yet: nothing is registered
    try:
        conn = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, timeout=30)
        try:
            revisions = [r[0] for r in conn.execute("SELECT version_num FROM alembic_version")]
            if len(revisions) != 1 or revisions[0] not in SCHEMA_REVISIONS:
                return None
            rows = dict(
                conn.execute(
                    "SELECT alias, version FROM registered_model_aliases WHERE name = ? AND workspace = 'default'",
                    (name,),
                ).fetchall()
            )
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return {a: (str(rows[a]) if a in rows else None) for a in aliases}
