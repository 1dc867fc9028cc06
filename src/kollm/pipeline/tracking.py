"""MLflow tracking: a pipeline run is a parent MLflow run, each step a nested run.

MLflow is the one source of truth for runs and lineage. The default store is SQLite under
`<project>/.kollm/mlflow.db`; `tracking.uri` in kollm.yaml or $MLFLOW_TRACKING_URI point elsewhere
(e.g. postgresql://user@host:5432/db).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kollm.errors import KollmError
from kollm.redact import mask_text, mask_uri
from kollm.pipeline.sqlite_runs import SqliteRuns, bad_key

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from kollm.config import ProjectConfig
    from kollm.pipeline.step import Artifact

MAX_PARAM_LEN = 6000
BATCH = 100
# MLflow 3's UI opens an experiment without this tag in GenAI mode (traces, prompts); kollm's experiments hold
# training runs and models: "Machine learning" mode. Set when kollm creates the experiment, or finds it untagged.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"
# The user's own $MLFLOW_TRACKING_URI, read once: mlflow.set_tracking_uri() writes that variable too, so reading
# it later would make one project's store leak into the next project opened in the same process. A process kollm
# pointed at a project's store marks the value it wrote (KOLLM_SET_TRACKING_URI), so that child processes started
# later (kfp.local's, a Ray worker's, a script's) do not take it for the user's own either.
_MARK = "KOLLM_SET_TRACKING_URI"
USER_TRACKING_URI = (
    None
    if os.environ.get("MLFLOW_TRACKING_URI") == os.environ.get(_MARK, "")
    else os.environ.get("MLFLOW_TRACKING_URI")
)
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


def artifact_location(uri: str, project_dir: Path, cfg: ProjectConfig | None = None) -> str | None:
    """Where a new experiment of the project keeps its artifacts: kollm.yaml's tracking.artifact_location; else a
    tracking server chooses (its --artifacts-destination, served to every client); a local store keeps them beside it
    in .kollm/mlartifacts (never MLflow's default ./mlruns in the current folder)."""
    if cfg is None and (project_dir / "kollm.yaml").exists():
        from kollm.config import load_config

        cfg, _ = load_config(project_dir)
    if cfg is not None and cfg.tracking.artifact_location:
        return cfg.tracking.artifact_location
    return (
        None if uri.startswith(("http://", "https://")) else (project_dir / ".kollm" / "mlartifacts").resolve().as_uri()
    )


def client_for(uri: str) -> MlflowClient:
    """An MlflowClient for `uri` (tracking and registry), with a clear error when the store cannot be reached."""
    from mlflow import MlflowClient

    if uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
        _probe_database(uri)
    if uri.startswith("sqlite:///"):
        _sqlite_wal(uri)
    _point_mlflow_at(uri)
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
        def _pragmas(dbapi_conn, _record) -> None:
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

    engine = sqlalchemy.create_engine(
        uri, connect_args={"connect_timeout": 5} if uri.startswith(("postgresql", "mysql")) else {}
    )
    try:
        with engine.connect():
            pass
    except Exception as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:300]
        raise KollmError(
            f"cannot open the MLflow tracking store {mask_uri(uri)}: {mask_text(reason)}",
            hint="check tracking.uri in kollm.yaml or $MLFLOW_TRACKING_URI, and that the database server is running",
        ) from None
    finally:
        engine.dispose()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def source_tags(source_name: str) -> dict[str, str]:
    """MLflow's system tags for who ran a run and from what (the UI's User and Source columns), as MLflow's own
    default run context sets them: mlflow.user (the OS user), mlflow.source.name, mlflow.source.type LOCAL (what
    MLflow sets outside Databricks; its JOB type is for Databricks jobs). kollm's source is the kollm.yaml run,
    whether by `kollm run`, the API or `kollm step run` in a child process, a pod or a Ray task."""
    return {"mlflow.user": _user(), "mlflow.source.name": source_name, "mlflow.source.type": "LOCAL"}


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
            out[key] = mask_text(text)[:MAX_PARAM_LEN]
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
    try:
        yield
    except Exception as e:
        exceptions = sys.modules.get("mlflow.exceptions")  # only MLflow can have raised one of its errors
        from_mlflow = exceptions is not None and isinstance(e, exceptions.MlflowException)
        if not (from_mlflow or isinstance(e, sqlite3.Error)):  # sqlite3: kollm's own writes (sqlite_runs)
            raise
        raise KollmError(f"MLflow tracking failed: {mask_text(str(e).splitlines()[0][:300])}") from None


def _point_mlflow_at(uri: str) -> None:
    """What client_for() does for MLflow's global URIs (step code may use mlflow's fluent API), without importing
    MLflow when nothing has yet: MLflow reads these variables when it first needs a URI."""
    if "mlflow" in sys.modules:
        import mlflow

        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = uri
        os.environ["MLFLOW_REGISTRY_URI"] = uri
    if uri == USER_TRACKING_URI:
        os.environ.pop(_MARK, None)
    else:
        os.environ[_MARK] = uri


class RunWriter:
    """Creates, logs to and ends runs in one tracking store: through kollm's SQLite writer where it applies
    (see sqlite_runs), otherwise, and for anything that writer declines, through MLflow's own client."""

    def __init__(self, uri: str, fast: SqliteRuns | None = None, client: MlflowClient | None = None):
        self.uri = uri
        self.fast = fast
        self._client = client

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = client_for(self.uri)
        return self._client

    def create_run(self, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
        tags = {k: mask_text(v) for k, v in tags.items()}
        with _store_errors():
            if self.fast is not None and self.fast.experiment_id == experiment_id:
                run_id = self.fast.create_run(run_name, tags)
                if run_id is not None:
                    return run_id
            return self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

    def log_batch(
        self, run_id: str, params: dict[str, str], metrics: dict[str, float], tags: dict[str, str], step: int = 0
    ) -> None:
        ts = int(time.time() * 1000)
        with _store_errors():
            if self.fast is not None and max(len(params), len(metrics), len(tags)) <= 1000:
                if self.fast.log_batch(run_id, params, metrics, tags, timestamp=ts, step=step):
                    return
            from mlflow.entities import Metric, Param, RunTag

            p = [Param(k, v) for k, v in params.items()]
            m = [Metric(k, v, ts, step) for k, v in metrics.items()]
            t = [RunTag(k, v) for k, v in tags.items()]
            for i in range(0, max(len(p), len(m), len(t)), BATCH):
                self.client.log_batch(
                    run_id, params=p[i : i + BATCH], metrics=m[i : i + BATCH], tags=t[i : i + BATCH], synchronous=True
                )

    def log_dataset_input(
        self, run_id: str, *, name: str, digest: str, source_type: str, source: str, profile: str, tags: dict[str, str]
    ) -> None:
        with _store_errors():
            if self.fast is not None and self.fast.log_dataset_input(
                run_id, name, digest, source_type, source, profile, tags
            ):
                return
            from mlflow.entities import Dataset, DatasetInput, InputTag

            ds = Dataset(name=name, digest=digest, source_type=source_type, source=source, profile=profile)
            self.client.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag(k, v) for k, v in tags.items()])])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """One file into the run's artifacts under ARTIFACT_PATH. A run whose artifacts are a local folder gets a
        copy written as MLflow's LocalArtifactRepository writes it (a hidden temp file in the destination folder,
        its mode and times copied, then renamed): no MLflow import for a step that logs a report."""
        with _store_errors():
            base = self.fast.local_artifact_dir(run_id) if self.fast is not None else None
            if base is not None and (artifact_path is None or not bad_key(artifact_path)):
                folder = os.path.join(base, artifact_path) if artifact_path else base
                os.makedirs(folder, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=folder, prefix=".artifact.uploading.")
                try:
                    with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                        shutil.copyfileobj(src, out)
                    shutil.copystat(path, tmp)
                    os.replace(tmp, os.path.join(folder, path.name))
                except BaseException:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(tmp)
                    raise
                return
            self.client.log_artifact(run_id, str(path), artifact_path)

    def set_terminated(self, run_id: str, status: str) -> None:
        with _store_errors():
            if self.fast is not None and self.fast.set_terminated(run_id, status):
                return
            self.client.set_terminated(run_id, status=status)

    def close(self) -> None:
        if self.fast is not None:
            self.fast.close()
            self.fast = None


class StepTracker:
    """Logging into one (nested) MLflow run. Step code uses this through `ctx.tracker`."""

    def __init__(self, writer: RunWriter, run_id: str):
        self._writer = writer
        self.run_id = run_id

    def log(
        self,
        *,
        params: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, Any] | None = None,
        step: int | None = None,
    ) -> None:
        """Params, metrics and tags in as few store writes as possible (1 for up to 100 of each)."""
        self._writer.log_batch(
            self.run_id,
            params=flatten(params or {}),
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            tags={k: mask_text(str(v))[:MAX_PARAM_LEN] for k, v in (tags or {}).items()},
            step=step or 0,
        )

    def log_params(self, params: dict[str, Any]) -> None:
        self.log(params=params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.log(metrics=metrics, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.log(tags=tags)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._writer.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self._writer.log_artifact(self.run_id, path, artifact_path)

    def log_dataset(self, artifact: Artifact, name: str, context: str) -> None:
        """Record a dataset artifact as an MLflow run input (name, digest, source, row counts)."""
        self._writer.log_dataset_input(
            self.run_id,
            name=name,
            digest=artifact.digest.removeprefix("sha256:")[:32],
            source_type="local",
            source=json.dumps({"uri": str(artifact.path), "type": artifact.type}),
            profile=json.dumps(artifact.meta, default=str)[:MAX_PARAM_LEN],
            tags={"mlflow.data.context": context},
        )

    def end(self, status: str) -> None:
        self._writer.set_terminated(self.run_id, status)


class PipelineTracker:
    """The parent MLflow run of one pipeline run, and the nested runs of its steps.

    Every run it creates carries source_tags(source_name): the kollm.yaml that was run (default:
    <project_dir>/kollm.yaml), source type LOCAL, and the user."""

    def __init__(self, cfg: ProjectConfig, project_dir: Path, *, source_name: str | None = None):
        self.uri = tracking_uri(project_dir, cfg)
        self.source_tags = source_tags(source_name or str(Path(project_dir).resolve() / "kollm.yaml"))
        name = cfg.tracking.experiment or cfg.project
        fast = SqliteRuns.open(self.uri, name)  # an existing SQLite store and experiment: no MLflow import needed
        if fast is not None and fast.experiment_tag(EXPERIMENT_KIND_TAG) is None:
            fast.close()  # an experiment made before kollm tagged its kind: MLflow's client tags it once, below
            fast = None
        if fast is not None:
            _point_mlflow_at(self.uri)
            self.experiment_id = fast.experiment_id
            self.writer = RunWriter(self.uri, fast=fast)
            self.run_id: str | None = None
            return
        try:
            client = client_for(self.uri)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                location = artifact_location(self.uri, project_dir, cfg)
                self.experiment_id = client.create_experiment(
                    name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND}
                )
            else:
                self.experiment_id = exp.experiment_id
                if EXPERIMENT_KIND_TAG not in exp.tags:  # a kind the user chose in the UI stays
                    client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND)
        except KollmError:
            raise
        except Exception as e:  # the store is unreachable or misconfigured: say which URI
            raise KollmError(
                f"cannot open the MLflow tracking store {mask_uri(self.uri)}: {type(e).__name__}: {mask_text(str(e).splitlines()[0][:300])}",
                hint="check tracking.uri in kollm.yaml or $MLFLOW_TRACKING_URI",
            ) from None
        # MLflow has now created the store and the experiment; kollm's writer may take over from here
        self.writer = RunWriter(self.uri, fast=SqliteRuns.open(self.uri, name), client=client)
        self.run_id = None

    def start(self, project: str, tags: dict[str, Any]) -> str:
        self._end_stale_runs()
        self.run_id = self.writer.create_run(
            self.experiment_id,
            f"{project}-{time.strftime('%Y%m%d-%H%M%S')}",
            {
                **self.source_tags,
                "kollm.pipeline": "true",
                "kollm.host": socket.gethostname(),
                "kollm.pid": str(os.getpid()),
                **{k: str(v) for k, v in tags.items()},
            },
        )
        return self.run_id

    def step(self, name: str, kind: str, tags: dict[str, Any]) -> StepTracker:
        run_id = self.writer.create_run(
            self.experiment_id,
            name,
            {
                **self.source_tags,
                "mlflow.parentRunId": self._started(),
                "kollm.step": name,
                "kollm.kind": kind,
                **{k: str(v) for k, v in tags.items()},
            },
        )
        return StepTracker(self.writer, run_id)

    def finish(self, status: str, metrics: dict[str, float] | None = None) -> None:
        run_id = self._started()
        if metrics:
            StepTracker(self.writer, run_id).log_metrics(metrics)
        self.writer.set_terminated(run_id, status)

    def _started(self) -> str:
        """The pipeline run's id: `start` made it, or the caller set `run_id` to an existing run's."""
        if self.run_id is None:
            raise RuntimeError("PipelineTracker: start() the pipeline run (or set run_id) first")
        return self.run_id

    def close(self) -> None:
        self.writer.close()

    def _end_stale_runs(self) -> None:
        """Runs left RUNNING by a killed process on this host are marked KILLED, so `kollm runs` tells the truth."""
        host = socket.gethostname()
        with _store_errors():
            if self.writer.fast is not None:
                stale = self.writer.fast.running_runs(host)
            else:
                runs = self.writer.client.search_runs(
                    [self.experiment_id],
                    filter_string=f"attributes.status = 'RUNNING' and tags.`kollm.host` = '{host}'",
                    max_results=200,
                )
                stale = [(r.info.run_id, r.data.tags.get("kollm.pid")) for r in runs]
        for run_id, pid in stale:
            if pid and pid.isdigit() and not _pid_alive(int(pid)):
                self.writer.set_terminated(run_id, "KILLED")
