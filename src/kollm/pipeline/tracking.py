"""MLflow tracking: a pipeline run is a parent MLflow run, each step a nested run.

MLflow is the one source of truth for runs and lineage. The default store is SQLite under
`<project>/.kollm/mlflow.db`; `tracking.uri` in kollm.yaml or $MLFLOW_TRACKING_URI point elsewhere
(e.g. postgresql://user@host:5432/db).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import socket
import time
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kollm.errors import KollmError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from kollm.config import ProjectConfig
    from kollm.pipeline.step import Artifact

MAX_PARAM_LEN = 6000
BATCH = 100
# The user's own $MLFLOW_TRACKING_URI, read once: mlflow.set_tracking_uri() writes that variable too, so reading
# it later would make one project's store leak into the next project opened in the same process.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")
# kollm runs offline by default: MLflow's usage telemetry stays off unless the user asks for it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def tracking_uri(project_dir: Path | None = None, cfg: ProjectConfig | None = None) -> str:
    """The MLflow tracking URI for a project: kollm.yaml's tracking.uri, else $MLFLOW_TRACKING_URI, else SQLite in .kollm/."""
    if cfg is None and project_dir is not None and (project_dir / "kollm.yaml").exists():
        from kollm.config import load_config

        cfg, _ = load_config(project_dir)
    if cfg is not None and cfg.tracking.uri:
        return cfg.tracking.uri
    if USER_TRACKING_URI:
        return USER_TRACKING_URI
    base = (project_dir or Path.cwd()).resolve() / ".kollm"
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


def client_for(uri: str) -> MlflowClient:
    """An MlflowClient for `uri` (tracking and registry), with a clear error when the store cannot be reached."""
    import mlflow
    from mlflow import MlflowClient

    if uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
        _probe_database(uri)
    if uri.startswith("sqlite:///"):
        _sqlite_wal(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


_wal_files: set[str] = set()


def _sqlite_wal(uri: str) -> None:
    """WAL journal with synchronous=NORMAL on kollm's SQLite tracking stores: one fsync per checkpoint instead
    of one per commit. Durable against a killed process (kill -9); only a power loss may drop the last few
    tracking writes. Other SQLite databases in the process are left alone."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not _wal_files:

        @event.listens_for(Engine, "connect")
        def _pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            if type(dbapi_conn).__module__ != "sqlite3":
                return
            cur = dbapi_conn.cursor()
            files = {os.path.realpath(row[2]) for row in cur.execute("PRAGMA database_list") if row[2]}
            if files & _wal_files:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    _wal_files.add(os.path.realpath(uri.removeprefix("sqlite:///")))


def _probe_database(uri: str) -> None:
    """One quick connection attempt: MLflow itself retries an unreachable database for about 100 s."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5} if uri.startswith(("postgresql", "mysql")) else {})
    try:
        with engine.connect():
            pass
    except Exception as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:300]
        raise KollmError(
            f"cannot open the MLflow tracking store {uri}: {reason}",
            hint="check tracking.uri in kollm.yaml or $MLFLOW_TRACKING_URI, and that the database server is running",
        ) from None
    finally:
        engine.dispose()


_NAME_OK = re.compile(r"^[/\w.\- :]*$")


def bad_metric_name(name: str) -> bool:
    """True when MLflow would reject `name` as a metric or param key."""
    norm = posixpath.normpath(name)
    return not name or not _NAME_OK.match(name) or norm != name or norm.startswith(("..", "/"))


def _param_key(key: str) -> str:
    """Config keys become param names; characters MLflow rejects are replaced (the full config is in the cache key)."""
    return re.sub(r"[^/\w.\- :]", "_", key) or "_"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{_param_key(str(k))}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
            out[key] = text[:MAX_PARAM_LEN]
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """An MLflow store error while logging becomes one clear KollmError instead of a traceback."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise KollmError(f"MLflow tracking failed: {str(e).splitlines()[0][:300]}") from None


class StepTracker:
    """Logging into one (nested) MLflow run. Step code uses this through `ctx.tracker`."""

    def __init__(self, client: MlflowClient | None, run_id: str | None):
        self._client = client
        self.run_id = run_id

    def log(self, *, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
            tags: dict[str, Any] | None = None, step: int | None = None) -> None:
        """Params, metrics and tags in as few MLflow calls as the store allows (1 for up to 100 of each)."""
        from mlflow.entities import Metric, Param, RunTag

        ts = int(time.time() * 1000)
        p = [Param(k, v) for k, v in flatten(params or {}).items()]
        m = [Metric(k, float(v), ts, step or 0) for k, v in (metrics or {}).items()]
        t = [RunTag(k, str(v)[:MAX_PARAM_LEN]) for k, v in (tags or {}).items()]
        with _store_errors():
            for i in range(0, max(len(p), len(m), len(t)), BATCH):
                self._client.log_batch(self.run_id, params=p[i : i + BATCH], metrics=m[i : i + BATCH], tags=t[i : i + BATCH], synchronous=True)

    def log_params(self, params: dict[str, Any]) -> None:
        self.log(params=params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.log(metrics=metrics, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.log(tags=tags)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset(self, artifact: Artifact, name: str, context: str) -> None:
        """Record a dataset artifact as an MLflow run input (name, digest, source, row counts)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(
            name=name,
            digest=artifact.digest.removeprefix("sha256:")[:32],
            source_type="local",
            source=json.dumps({"uri": str(artifact.path), "type": artifact.type}),
            profile=json.dumps(artifact.meta, default=str)[:MAX_PARAM_LEN],
        )
        self._client.log_inputs(self.run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])

    def end(self, status: str) -> None:
        self._client.set_terminated(self.run_id, status=status)


class PipelineTracker:
    """The parent MLflow run of one pipeline run, and the nested runs of its steps."""

    def __init__(self, cfg: ProjectConfig, project_dir: Path):
        self.uri = tracking_uri(project_dir, cfg)
        try:
            self.client = client_for(self.uri)
            name = cfg.tracking.experiment or cfg.project
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                location = cfg.tracking.artifact_location or (project_dir / ".kollm" / "mlartifacts").resolve().as_uri()
                self.experiment_id = self.client.create_experiment(name, artifact_location=location)
            else:
                self.experiment_id = exp.experiment_id
        except KollmError:
            raise
        except Exception as e:  # the store is unreachable or misconfigured: say which URI
            raise KollmError(
                f"cannot open the MLflow tracking store {self.uri}: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                hint="check tracking.uri in kollm.yaml or $MLFLOW_TRACKING_URI",
            ) from None
        self.run_id: str | None = None

    def start(self, project: str, tags: dict[str, Any]) -> str:
        self._end_stale_runs()
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{project}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"kollm.pipeline": "true", "kollm.host": socket.gethostname(), "kollm.pid": str(os.getpid()), **tags},
        )
        self.run_id = run.info.run_id
        return self.run_id

    def step(self, name: str, kind: str, tags: dict[str, Any]) -> StepTracker:
        with _store_errors():
            run = self.client.create_run(
            self.experiment_id,
                run_name=name,
                tags={"mlflow.parentRunId": self.run_id, "kollm.step": name, "kollm.kind": kind, **tags},
            )
        return StepTracker(self.client, run.info.run_id)

    def finish(self, status: str, metrics: dict[str, float] | None = None) -> None:
        if metrics:
            StepTracker(self.client, self.run_id).log_metrics(metrics)
        self.client.set_terminated(self.run_id, status=status)

    def _end_stale_runs(self) -> None:
        """Runs left RUNNING by a killed process on this host are marked KILLED, so `kollm runs` tells the truth."""
        host = socket.gethostname()
        stale = self.client.search_runs(
            [self.experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`kollm.host` = '{host}'", max_results=200
        )
        for run in stale:
            pid = run.data.tags.get("kollm.pid")
            if pid and pid.isdigit() and not _pid_alive(int(pid)):
                self.client.set_terminated(run.info.run_id, status="KILLED")
