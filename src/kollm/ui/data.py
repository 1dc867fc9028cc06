"""What the pages show, read from MLflow (runs, metrics, artifacts, the registry) and the project's `.kollm/`.

Everything here is read-only except `promote`/`rollback` (kollm.registry) and the rollout commands (the gateway's
admin API through kollm.rollout.client). Runs are read through kollm.pipeline.history where it has what a page
needs, and through the MLflow client for the structured tags the runner writes on every step run
(`kollm.step`, `kollm.kind`, `kollm.cache_key`, `kollm.cache_hit`, `kollm.input.<name>.ref|digest`,
`kollm.output.<name>.digest`, `kollm.error`), so pages work while a run is in progress.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from kollm.config import load_config
from kollm.errors import KollmError, NotFound
from kollm.eval.report import TRAINING_KINDS
from kollm.pipeline import history
from kollm.pipeline.tracking import client_for, tracking_uri

_OPEN = threading.Lock()  # opening an MLflow store (creating its tables) one at a time
MAX_RUNS = 2000  # runs scanned for the forward lineage of a digest
TERMINAL = ("FINISHED", "FAILED", "KILLED")
NOT_CHARTED = ("epoch", "tokens", "duration_s")  # logged per step, but a counter, not a curve worth a chart


@dataclass(frozen=True)
class Project:
    dir: Path
    name: str  # the project (and default registered model) name
    experiment: str
    uri: str

    @property
    def state(self) -> Path:
        return self.dir / ".kollm"


def open_project(path: Path) -> Project:
    cfg, file = load_config(path)
    return Project(
        file.parent.resolve(), cfg.project, cfg.tracking.experiment or cfg.project, tracking_uri(file.parent, cfg)
    )


class Store:
    """One project's MLflow client, opened on first use (a database store that is down gives a clear error)."""

    def __init__(self, project: Project):
        self.project = project
        self._client: Any = None
        self._history: dict[str, dict[str, list[tuple[float, float]]]] = {}  # of ended runs: fixed
        self._summaries: dict[str, RunSummary] = {}  # of ended pipeline runs: fixed
        self._experiment_id: str | None = None

    def warm(self) -> None:
        """Open the store and run the runs list's queries once: importing MLflow and setting up its database
        take seconds, which the first page would otherwise wait for. An error is left for the page to show."""
        try:
            list_runs(self)
        except Exception:  # noqa: BLE001  (the page reports it)
            pass

    def history(self, run_id: str) -> dict[str, list[tuple[float, float]]]:
        """Every metric of a run logged at more than one step, as (step, value) points; kept once the run ended."""
        if run_id in self._history:
            return self._history[run_id]
        run = self.client.get_run(run_id)
        out = {}
        for key in sorted(run.data.metrics):
            if key in NOT_CHARTED or key.startswith("timing."):
                continue
            points = sorted(
                (float(m.step), float(m.value))
                for m in self.client.get_metric_history(run_id, key)
                if math.isfinite(m.value)
            )
            if len(points) > 1:
                out[key] = points
        if run.info.status in TERMINAL:
            self._history[run_id] = out
        return out

    @property
    def client(self) -> Any:
        with _OPEN:  # the warm-up thread and a request (or two apps of one process) may open a store at once
            if self._client is None:
                client = client_for(self.project.uri)
                client.get_experiment_by_name(self.project.experiment)  # sets the store up (tables) here
                self._client = client
        return self._client

    def experiment_id(self) -> str | None:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.project.experiment)
            self._experiment_id = None if exp is None else exp.experiment_id
        return self._experiment_id


# --- runs and steps ------------------------------------------------------------------------------------------


@dataclass
class StepNode:
    """One step of a run: a finished, running or failed step run, or a step that has not started yet."""

    name: str
    kind: str
    status: str  # FINISHED | RUNNING | FAILED | KILLED | PENDING
    run_id: str | None = None
    cache_hit: bool = False
    duration_s: float | None = None
    key: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (ref, digest)
    outputs: dict[str, str] = field(default_factory=dict)  # name -> digest
    error: str = ""
    method: str = ""  # align's preference objective (dpo, orpo, ...), from the run's params
    source_run_id: str | None = None  # the step run that computed the result: itself, or for a cache hit an earlier one
    pipeline_run_id: str | None = None  # the pipeline run it belongs to (its MLflow parent)

    @property
    def shown_metrics(self) -> dict[str, float]:
        return {k: v for k, v in sorted(self.metrics.items()) if k != "duration_s" and not k.startswith("timing.")}


def step_from_run(r: Any) -> StepNode:
    tags, m = r.data.tags, r.data.metrics
    inputs: dict[str, tuple[str, str]] = {}
    outputs: dict[str, str] = {}
    for k, v in tags.items():
        parts = k.split(".")
        if len(parts) == 4 and parts[0] == "kollm" and parts[1] == "input":
            ref, digest = inputs.get(parts[2], ("", ""))
            inputs[parts[2]] = (v, digest) if parts[3] == "ref" else (ref, v)
        elif len(parts) == 4 and parts[0] == "kollm" and parts[1] == "output" and parts[3] == "digest":
            outputs[parts[2]] = v
    return StepNode(
        name=tags.get("kollm.step", r.info.run_name),
        kind=tags.get("kollm.kind", "?"),
        status=r.info.status,
        run_id=r.info.run_id,
        cache_hit=tags.get("kollm.cache_hit") == "true",
        duration_s=m.get("duration_s") if "duration_s" in m else _elapsed(r.info.start_time, r.info.end_time),
        key=tags.get("kollm.cache_key", ""),
        metrics=dict(m),
        inputs=dict(sorted(inputs.items())),
        outputs=dict(sorted(outputs.items())),
        error=tags.get("kollm.error", ""),
        method=r.data.params.get("method", ""),
        source_run_id=None if tags.get("kollm.cache_hit") == "true" else r.info.run_id,
        pipeline_run_id=tags.get("mlflow.parentRunId"),
    )


def _elapsed(start: int | None, end: int | None) -> float | None:
    if not start:
        return None
    return ((end or time.time() * 1000) - start) / 1000


@dataclass(frozen=True)
class Series:
    """One metric's history in one training step run (MLflow), e.g. cpt's loss per optimizer step."""

    step: str
    kind: str
    objective: str  # what a loss measures: "cross-entropy" (cpt, sft) or the align method ("DPO", "ORPO", ...)
    metric: str
    run_id: str  # the MLflow run the points come from (for a cache hit, the run that computed the step)
    points: list[tuple[float, float]]


@dataclass
class RunView:
    info: history.RunRow
    tags: dict[str, str]
    steps: list[StepNode]
    series: list[Series]

    @property
    def active(self) -> bool:
        return self.info.status == "RUNNING"


HEADLINE_METRICS = ("perplexity", "chrf", "exact", "contains", "accuracy", "judge_score")
HEADLINE_PARAMS = ("base_model", "preset", "method", "lr", "max_steps", "epochs", "batch_size", "lora.r")


@dataclass
class RunSummary:
    """A pipeline run as the runs list and the compare view show it."""

    row: history.RunRow
    name: str
    gate: str  # passed | failed | "" (no gate ran)
    gate_reasons: list[str]
    failed_step: str  # the step that failed a FAILED run, "" otherwise
    metrics: dict[str, float]  # the evaluate steps' metrics, then each training step's final loss
    params: dict[str, str]  # <step>.<setting> of the training steps' headline settings


def list_runs(store: Store, limit: int = 50, query: str = "") -> list[RunSummary]:
    """The newest pipeline runs (their name or id containing `query`), each with its gate, headline metrics and
    parameters; one MLflow search for the runs and one for their step runs."""
    exp = store.experiment_id()
    if exp is None:
        return []
    q = query.strip().replace("'", "").replace("%", "")
    flt = "tags.`kollm.pipeline` = 'true'"
    runs = store.client.search_runs(
        [exp], filter_string=flt, max_results=1000 if q else limit, order_by=["attributes.start_time DESC"]
    )
    if q:
        runs = [r for r in runs if q.lower() in r.info.run_name.lower() or r.info.run_id.startswith(q.lower())][:limit]
    todo = [r for r in runs if r.info.run_id not in store._summaries]
    children: dict[str, list[Any]] = {}
    if todo:
        oldest = min(r.info.start_time or 0 for r in todo)
        for c in store.client.search_runs(
            [exp],
            filter_string=f"tags.`kollm.step` != '' and attributes.start_time >= {oldest}",
            max_results=MAX_RUNS,
            order_by=["attributes.start_time ASC"],
        ):
            children.setdefault(c.data.tags.get("mlflow.parentRunId", ""), []).append(c)
    out = []
    for r in runs:
        rid = r.info.run_id
        summary = store._summaries.get(rid) or summarize(r, children.get(rid, []))
        if r.info.status in TERMINAL:
            store._summaries[rid] = summary
        out.append(summary)
    return out


def summarize(run: Any, children: list[Any]) -> RunSummary:
    steps = [step_from_run(c) for c in children]
    m = run.data.metrics
    row = history.RunRow(
        run_id=run.info.run_id,
        started=history._fmt_time(run.info.start_time),
        status=run.info.status,
        steps=int(m["steps"]) if "steps" in m else len(steps),
        cache_hits=int(m.get("cache_hits", sum(s.cache_hit for s in steps))),
        duration=history._fmt_duration(run.info.start_time, run.info.end_time),
    )
    gate, reasons = "", list[str]()
    metrics: dict[str, float] = {}
    params: dict[str, str] = {}
    for c, s in zip(children, steps):
        if s.kind == "evaluate":
            g, rs = gate_of(c.data.tags)
            gate, reasons = g or gate, rs or reasons
            found = {k: v for k, v in s.shown_metrics.items() if "." not in k and k != "gate_passed"}
            first = [k for k in HEADLINE_METRICS if k in found]
            metrics.update({k: found[k] for k in first + sorted(set(found) - set(first))})
    for c, s in zip(children, steps):
        if s.kind in TRAINING_KINDS:
            for k in ("final_loss", "train_loss", "loss"):
                if k in s.metrics:
                    metrics[f"{s.name}.{k}"] = s.metrics[k]
                    break
            params.update({f"{s.name}.{k}": c.data.params[k] for k in HEADLINE_PARAMS if k in c.data.params})
    failed = next((s.name for s in steps if s.status == "FAILED"), "")
    if failed and not gate and any(s.kind == "evaluate" and s.status == "FAILED" and "gate" in s.error for s in steps):
        gate = "failed"
    return RunSummary(row, run.info.run_name, gate, reasons, failed, metrics, params)


def compare_runs(store: Store, a: str, b: str) -> list[RunSummary]:
    out = []
    for rid in (a, b):
        info, _ = history.show_run(store.project.dir, rid)
        run = store.client.get_run(info.run_id)
        children = store.client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{info.run_id}'",
            max_results=1000,
            order_by=["attributes.start_time ASC"],
        )
        out.append(summarize(run, children))
    return out


def run_view(store: Store, run_id: str) -> RunView:
    """A pipeline run with all its steps: those MLflow knows, plus (while it runs) the ones still to come."""
    info, _ = history.show_run(store.project.dir, run_id)
    c = store.client
    run = c.get_run(info.run_id)
    children = c.search_runs(
        [run.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{info.run_id}'",
        max_results=1000,
        order_by=["attributes.start_time ASC"],
    )
    steps = [step_from_run(r) for r in children]
    for s in steps:
        if s.cache_hit:
            s.source_run_id = computing_run(store, s)
    if info.status == "RUNNING":
        steps += _pending_steps(store.project, {s.name for s in steps})
    elif info.status in ("FAILED", "KILLED"):
        steps += _pending_steps(store.project, {s.name for s in steps}, "SKIPPED")
    series = [x for s in steps if s.kind in TRAINING_KINDS for x in training_series(store, s)]
    return RunView(info, dict(run.data.tags), steps, series)


def _pending_steps(project: Project, started: set[str], status: str = "PENDING") -> list[StepNode]:
    """Steps of kollm.yaml not started (yet: PENDING in a running pipeline; SKIPPED in one that failed), none if
    kollm.yaml no longer loads."""
    from kollm.pipeline.spec import load_pipeline

    try:
        pipe = load_pipeline(project.dir)
    except KollmError:
        return []
    return [
        StepNode(s.name, s.kind, status, inputs={k: (str(ref), "") for k, ref in s.inputs.items()})
        for s in pipe.steps
        if s.name not in started
    ]


def computing_run(store: Store, node: StepNode) -> str | None:
    """The step run that computed a cache hit's result: named in the cache entry's manifest, else the finished
    computing run of the same cache key in MLflow; None when neither is left."""
    if not node.key:
        return None
    manifest = _read_json(store.project.state / "steps" / node.key / "step.json")
    if manifest and isinstance(manifest.get("run_id"), str):
        return str(manifest["run_id"])
    exp = store.experiment_id()
    found = (
        store.client.search_runs(
            [exp],
            filter_string=f"tags.`kollm.cache_key` = '{node.key}' and tags.`kollm.cache_hit` = 'false' "
            "and attributes.status = 'FINISHED'",
            max_results=1,
        )
        if exp is not None
        else []
    )
    return found[0].info.run_id if found else None


def training_series(store: Store, step: StepNode) -> list[Series]:
    """A training step's logged metrics: the MLflow metric history of the run that computed it (its own run, or
    for a cache hit the earlier run the cache entry names), never another run's."""
    rid = step.source_run_id
    if not rid:
        return []
    from mlflow.exceptions import MlflowException

    try:
        found = store.history(rid)
    except MlflowException:  # the computing run was deleted
        return []
    objective = (step.method or "dpo").upper() if step.kind == "align" else "cross-entropy"
    return [Series(step.name, step.kind, objective, k, rid, pts) for k, pts in found.items()]


@dataclass
class StepView:
    node: StepNode
    pipeline_run_id: str | None
    config: dict[str, Any]
    artifacts: list[str]  # artifact paths of the step run, e.g. prepare/report.html
    output_dirs: dict[str, str]  # output name -> folder under .kollm/steps/<key>/
    logs: list[str]  # runner events for this step (JSON lines)
    training_log: list[str]  # the tail of the training log lines the computing run wrote
    series: list[Series]
    tags: dict[str, str]

    @property
    def reports(self) -> list[str]:
        return [a for a in self.artifacts if a.endswith(".html")]


def step_view(store: Store, run_id: str) -> StepView:
    c = store.client
    run = _get_run(c, run_id)
    node = step_from_run(run)
    if node.cache_hit:
        node.source_run_id = computing_run(store, node)
    parent = run.data.tags.get("mlflow.parentRunId")
    state = store.project.state
    folder = state / "steps" / node.key
    manifest = _read_json(folder / "step.json") if node.key else None
    config = (
        manifest["config"]
        if manifest and isinstance(manifest.get("config"), dict)
        else dict(sorted(run.data.params.items()))
    )
    outputs = {n: str(folder / n) for n in node.outputs if (folder / n).is_dir()}
    logs = []
    if parent:
        log = state / "logs" / "system" / f"{parent}.jsonl"
        if log.is_file():
            logs = [
                line
                for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
                if _json_line(line).get("step") == node.name
            ]
    training_log: list[str] = []
    series: list[Series] = []
    if node.kind in TRAINING_KINDS and node.source_run_id:
        source = run if node.source_run_id == run.info.run_id else _get_run(c, node.source_run_id)
        training_log = own_log_lines(state / "logs" / "training" / f"{node.name}.jsonl", source)[-40:]
        series = training_series(store, node)
    return StepView(
        node,
        parent,
        config,
        _artifacts(c, run_id),
        outputs,
        logs[-100:],
        training_log,
        series,
        dict(sorted(run.data.tags.items())),
    )


@dataclass
class OutputFile:
    path: str  # relative to the output folder, with '/'
    size: int

    @property
    def viewable(self) -> bool:
        return self.path.endswith(TEXT_SUFFIXES) and self.size <= MAX_VIEW_BYTES


TEXT_SUFFIXES = (".json", ".jsonl", ".txt", ".md", ".yaml", ".yml", ".csv", ".html", ".log")
MAX_VIEW_BYTES = 2 * 2**20  # larger files are listed, not shown


@dataclass
class OutputView:
    """One output folder of a step run (under .kollm/steps/<key>/<name>/): its digest and files."""

    step: StepView
    name: str
    digest: str
    folder: str
    files: list[OutputFile]


def output_view(store: Store, run_id: str, name: str) -> OutputView:
    view = step_view(store, run_id)
    if name not in view.node.outputs:
        outs = ", ".join(view.node.outputs) or "none"
        raise NotFound(f"step run {run_id} has no output '{name}'", hint=f"its outputs: {outs}")
    folder = view.output_dirs.get(name)
    if folder is None:
        raise NotFound(
            f"output '{name}' of step run {run_id} is not in this project's store ({store.project.state}/steps)",
            hint="it was written to another artifact store (--store); the digest still traces it",
        )
    root = Path(folder)
    files = [
        OutputFile(f.relative_to(root).as_posix(), f.stat().st_size)
        for f in sorted(root.rglob("*"))
        if f.is_file() and not f.is_symlink()
    ]
    return OutputView(view, name, view.node.outputs[name], folder, files)


def output_file(store: Store, run_id: str, name: str, path: str) -> bytes:
    """One file of an output folder, named by its path inside the folder (nothing outside it)."""
    out = output_view(store, run_id, name)
    listed = {f.path: f for f in out.files}
    f = listed.get(path)
    if f is None or not f.viewable:
        raise NotFound(
            f"output '{name}' of step run {run_id} has no viewable file '{path}'",
            hint=f"text files up to {MAX_VIEW_BYTES // 2**20} MiB listed on its output page",
        )
    return (Path(out.folder) / f.path).read_bytes()


def own_log_lines(path: Path, run: Any) -> list[str]:
    """The lines of a training log (shared by every run of the step) that `run` wrote: those naming its run id,
    and lines without one (older logs) written between its start and end."""
    if not path.is_file():
        return []
    rid = run.info.run_id
    start = (run.info.start_time or 0) / 1000 - 1
    end = (run.info.end_time or time.time() * 1000) / 1000 + 1
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        rec = _json_line(line)
        if "run_id" in rec:
            if rec["run_id"] == rid:
                out.append(line)
            continue
        try:
            ts = datetime.fromisoformat(str(rec.get("ts"))).timestamp()
        except ValueError:
            continue
        if start <= ts <= end:
            out.append(line)
    return out


def _get_run(c: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_run(run_id)
    except MlflowException:
        raise NotFound(f"no MLflow run '{run_id}'", hint="follow a link from the runs page") from None


def _artifacts(c: Any, run_id: str, path: str | None = None, depth: int = 0) -> list[str]:
    out: list[str] = []
    try:
        entries = c.list_artifacts(run_id, path)
    except Exception:  # an artifact store that cannot be listed from here: show none rather than fail the page
        return out
    for e in entries:
        if e.is_dir and depth < 2:
            out += _artifacts(c, run_id, e.path, depth + 1)
        elif not e.is_dir:
            out.append(e.path)
    return out


def artifact_bytes(store: Store, run_id: str, path: str) -> bytes:
    """One artifact file of a run (a report) read through MLflow, wherever the artifact store is."""
    if path not in _artifacts(store.client, run_id):
        raise NotFound(f"run {run_id} has no artifact '{path}'")
    with tempfile.TemporaryDirectory(prefix="kollm-ui-") as tmp:
        local = store.client.download_artifacts(run_id, path, dst_path=tmp)
        return Path(local).read_bytes()


def _json_line(line: str) -> dict[str, Any]:
    try:
        data = json.loads(line)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- registry ----------------------------------------------------------------------------------------------


@dataclass
class ModelView:
    name: str
    versions: list[Any]  # kollm.registry.VersionInfo, newest first
    aliases: dict[str, str]  # alias -> version
    audit: list[Any]  # kollm.registry.AuditEntry, newest first


def registry_models(project: Project) -> list[str]:
    from kollm import registry

    return registry.list_models(project.dir)


def model_view(project: Project, name: str) -> ModelView:
    from kollm import registry

    versions = registry.list_versions(name, project.dir)
    aliases = {a: v.version for v in versions for a in v.aliases}
    audit = list(reversed(registry.audit_trail(name, project.dir)))
    return ModelView(name, versions, dict(sorted(aliases.items())), audit)


def gate_of(tags: dict[str, str]) -> tuple[str, list[str]]:
    """('passed' | 'failed' | '', reasons) from a version's tags."""
    return tags.get("kollm.gate", ""), [r for r in tags.get("kollm.gate.reasons", "").splitlines() if r]


def trouble_of(tags: dict[str, str]) -> str:
    """Why a version should not be promoted without a second look: its canary rollout failed or it was rolled
    back ("" when neither)."""
    result = tags.get("kollm.rollout.result", "")
    if result in ("rolled_back", "aborted"):
        why = tags.get("kollm.rollout.reason", "")
        return f"its canary rollout was {result.replace('_', ' ')}" + (f": {why}" if why else "")
    if tags.get("kollm.rolled_back_at"):
        why = tags.get("kollm.rolled_back_reason", "")
        return "it was rolled back as champion" + (f": {why}" if why else "")
    return ""


def versus(candidate: dict[str, str], champion: dict[str, str]) -> list[dict[str, Any]]:
    """The candidate's metrics against the champion's, metric by metric: values, difference and which is better
    (lower is better for perplexity and nll, higher for the rest)."""
    from kollm.eval.report import LOWER_IS_BETTER

    a, b = metrics_of(candidate), metrics_of(champion)
    rows = []
    for k in sorted(set(a) | set(b)):
        try:
            x, y = float(a[k]) if k in a else None, float(b[k]) if k in b else None
        except ValueError:
            continue
        better = None
        if x is not None and y is not None and x != y:
            better = (x < y) == any(k.endswith(m) for m in LOWER_IS_BETTER)
        rows.append(
            {
                "metric": k,
                "candidate": x,
                "champion": y,
                "delta": None if x is None or y is None else x - y,
                "better": better,
            }
        )
    return rows


def metrics_of(tags: dict[str, str]) -> dict[str, str]:
    return {k.removeprefix("kollm.metric."): v for k, v in sorted(tags.items()) if k.startswith("kollm.metric.")}


# --- lineage -----------------------------------------------------------------------------------------------


@dataclass
class Lineage:
    """A model version traced back: its pipeline run, the steps that made it and the data they read."""

    version: Any  # VersionInfo
    pipeline_run_id: str | None
    steps: list[StepNode]
    datasets: dict[str, str]  # <step>.<output> -> digest (kollm.data.*)
    sources: dict[str, str]  # <step>.<input> -> raw data digest (kollm.source.*)
    model_digest: str
    # a LoRA adapter version: its base (digest, path where it was trained, the registered version with that digest)
    base: dict[str, str] | None = None


def version_lineage(store: Store, name: str, ref: str) -> Lineage:
    from kollm import registry

    v = registry.show(name, ref, store.project.dir)
    try:
        step_runs = json.loads(v.tags.get("kollm.step_runs", "{}"))
    except ValueError:
        step_runs = {}
    run_ids = [rid for rid in step_runs.values() if rid]
    if v.tags.get("kollm.step_run_id"):
        run_ids.append(v.tags["kollm.step_run_id"])
    from mlflow.exceptions import MlflowException

    steps = []
    for rid in dict.fromkeys(run_ids):
        try:
            steps.append(step_from_run(store.client.get_run(rid)))
        except MlflowException:  # a deleted run: the version's tags still name its digests
            continue
    datasets = {k.removeprefix("kollm.data."): val for k, val in v.tags.items() if k.startswith("kollm.data.")}
    sources = {k.removeprefix("kollm.source."): val for k, val in v.tags.items() if k.startswith("kollm.source.")}
    return Lineage(
        v,
        v.tags.get("kollm.pipeline_run_id"),
        steps,
        dict(sorted(datasets.items())),
        dict(sorted(sources.items())),
        v.tags.get("kollm.model_digest", ""),
        _adapter_base(v.tags, store.project.dir),
    )


def _adapter_base(tags: dict[str, str], project_dir: Path) -> dict[str, str] | None:
    """The base of an adapter version (kollm.base_model_* tags); the registered base is looked up now, so a
    base registered after the adapter is found too."""
    from kollm import adapter

    digest = tags.get(adapter.BASE_DIGEST_TAG)
    if not digest:
        return None
    uri = tags.get(adapter.BASE_URI_TAG) or adapter._registered_with_digest(digest, project_dir) or ""
    return {"digest": digest, "path": tags.get("kollm.base_model_path", ""), "registered": uri}


@dataclass
class Forward:
    """A digest traced forward: the step runs that read it or what was made from it, and the versions trained on it."""

    digest: str
    consumers: list[StepNode]  # step runs that read the digest or anything derived from it
    producers: list[StepNode]  # step runs that wrote the digest
    versions: list[Any]  # VersionInfo of every registered version whose lineage holds it


def forward_lineage(store: Store, digest: str) -> Forward:
    from kollm import registry

    exp = store.experiment_id()
    runs = (
        []
        if exp is None
        else store.client.search_runs([exp], filter_string="tags.`kollm.step` != ''", max_results=MAX_RUNS)
    )
    nodes = [step_from_run(r) for r in runs]
    reached = {digest}
    consumers: dict[str, StepNode] = {}
    changed = True
    while changed:  # follow outputs of every run that read something reached
        changed = False
        for n in nodes:
            if n.run_id not in consumers and any(d in reached for _, d in n.inputs.values()):
                consumers[n.run_id or ""] = n
                new = set(n.outputs.values()) - reached
                reached |= new
                changed = True
    producers = [n for n in nodes if digest in n.outputs.values()]
    consumer_runs = set(consumers)
    versions = []
    for model in registry.list_models(store.project.dir):
        for v in registry.list_versions(model, store.project.dir):
            lineage = {
                val
                for k, val in v.tags.items()
                if k.startswith(("kollm.data.", "kollm.source."))
                or k in ("kollm.model_digest", "kollm.base_model_digest")
            }
            if lineage & reached or (v.run_id and v.run_id in consumer_runs):
                versions.append(v)
    if not consumers and not producers and not versions:
        raise NotFound(f"no step run read or wrote {digest}", hint="copy a digest from a step or version page")
    return Forward(digest, sorted(consumers.values(), key=lambda n: n.name), producers, versions)


# --- live rollout ------------------------------------------------------------------------------------------


@dataclass
class RolloutView:
    status: dict[str, Any] | None  # the gateway's /admin/rollout/status answer
    saved: list[dict[str, Any]]  # rollout state files under .kollm/rollouts/ (when the gateway cannot be asked)
    error: str  # why the gateway could not be asked
    serving: list[dict[str, Any]]  # rows read from the gateway's /metrics
    gateway: str

    @property
    def rollout(self) -> dict[str, Any] | None:
        if self.status is not None:
            return self.status.get("rollout")
        return self.saved[0] if self.saved else None

    @property
    def active(self) -> bool:
        r = self.rollout
        return r is not None and r.get("status") in ("progressing", "paused")

    @property
    def failing(self) -> bool:
        """The last analysed window failed while the rollout still goes on."""
        r = self.rollout
        return bool(self.active and r and r.get("history") and r["history"][-1]["result"]["verdict"] == "fail")

    @property
    def next_analysis_s(self) -> float | None:
        r = self.rollout
        if not r or r.get("status") != "progressing":
            return None
        return max(0.0, r["window_started_at"] + r["spec"]["pause_s"] - time.time())


def rollout_view(project: Project, gateway: str | None, api_key: str | None) -> RolloutView:
    from kollm.rollout import client as rollout_client

    status, error = None, ""
    try:
        status = rollout_client.command("status", gateway=gateway, api_key=api_key)
    except KollmError as e:
        error = e.message
    url = rollout_client.gateway_url(gateway)
    served = ((status or {}).get("gateway") or {}).get("model")
    if served and served not in registry_models(project):  # another project's gateway: show none of it
        status = None
        error = f"the gateway at {url} serves '{served}', which is not a registered model of this project"
    saved = [] if status is not None else saved_rollouts(project)
    return RolloutView(status, saved, error, serving_stats(gateway) if status is not None else [], url)


CONDITION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|<|>|==)\s*(-?[\d.eE+-]+)\s*$")
SHORTCODES = {":rotating_light:": "🚨", ":warning:": "⚠️", ":white_check_mark:": "✅", ":x:": "❌"}


def emoji(text: str) -> str:
    """Slack-style shortcodes in alert texts as the emoji they stand for."""
    return re.sub(r":[a-z0-9_+-]+:", lambda m: SHORTCODES.get(m.group(0), m.group(0)), text)


def conditions(analysis: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The analysis spec (`success_rate>=0.95,p95_ms<=2000`) against a window's values: metric, operator,
    threshold, value and whether it holds (None: no value)."""
    ops = {"<=": float.__le__, ">=": float.__ge__, "<": float.__lt__, ">": float.__gt__, "==": float.__eq__}
    out = []
    for part in analysis.split(","):
        m = CONDITION.match(part)
        if not m:
            continue
        name, op, limit = m.group(1), m.group(2), float(m.group(3))
        v = values.get(name)
        ok = ops[op](float(v), limit) if isinstance(v, (int, float)) else None
        out.append({"metric": name, "op": op, "threshold": limit, "value": v, "ok": ok})
    return out


def saved_rollouts(project: Project) -> list[dict[str, Any]]:
    """The rollout state files of the project, most recently updated first."""
    folder = project.state / "rollouts"
    states = [s for p in sorted(folder.glob("*.json")) if (s := _read_json(p)) is not None] if folder.is_dir() else []
    for s in states:  # a file written before step_index existed holds the 0-based index in `step`
        if "step_index" not in s and isinstance(s.get("step"), int):
            s["step_index"], s["step"] = s["step"], s["step"] + 1
    return sorted(states, key=lambda s: s.get("updated_at", 0), reverse=True)


Sample = tuple[float, list[dict[str, Any]]]  # (time, serving_stats rows)


class ArmSamples:
    """The gateway's per-arm counters (`serving_stats`) sampled while a rollout page is open, kept per rollout in
    <state>/ui/arm-samples/<model>-<started ms>.jsonl: the page draws the same per-arm series after the UI restarts,
    and from what was saved while the gateway is down. One sample a second at most, whatever the open pages."""

    def __init__(self, project: Project, every_s: float = 1.0, keep: int = 3600):
        self.folder = project.state / "ui" / "arm-samples"
        self.every_s, self.keep = every_s, keep
        self.lock = threading.Lock()
        self.last: dict[Path, float] = {}

    def path(self, rollout: dict[str, Any]) -> Path:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", str(rollout.get("name", "")))
        return self.folder / f"{name}-{int(float(rollout.get('started_at', 0)) * 1000)}.jsonl"

    def record(self, rollout: dict[str, Any], rows: list[dict[str, Any]], now: float | None = None) -> None:
        now = time.time() if now is None else now
        path = self.path(rollout)
        with self.lock:
            if now - self.last.get(path, 0.0) < self.every_s:
                return
            self.last[path] = now
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:  # one line a write: a torn last line is skipped on read
                f.write(json.dumps({"t": now, "rows": rows}) + "\n")

    def load(self, rollout: dict[str, Any]) -> list[Sample]:
        path = self.path(rollout)
        if not path.is_file():
            return []
        out: list[Sample] = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[-self.keep :]:
            rec = _json_line(line)
            if isinstance(rec.get("t"), (int, float)) and isinstance(rec.get("rows"), list):
                out.append((float(rec["t"]), rec["rows"]))
        return out


def serving_stats(gateway: str | None) -> list[dict[str, Any]]:
    """Per arm and version: requests by outcome and mean latency, from the gateway's Prometheus /metrics
    (`gateway`: its URL, None: the default, see kollm.rollout.client.gateway_url)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from kollm.rollout.client import gateway_url

    try:
        text = httpx.get(f"{gateway_url(gateway)}/metrics", timeout=5).text
        families = list(text_string_to_metric_families(text))
    except (httpx.HTTPError, ValueError):
        return []
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for fam in families:
        for s in fam.samples:
            arm, version = s.labels.get("arm"), s.labels.get("version")
            if arm is None or version is None:
                continue
            row = rows.setdefault(
                (arm, version),
                {"arm": arm, "version": version, "success": 0.0, "error": 0.0, "seconds": 0.0, "count": 0.0},
            )
            if s.name == "kollm_gateway_requests_total":
                outcome = s.labels.get("outcome", "")
                row["success" if outcome == "success" else "error"] += s.value
            elif s.name == "kollm_gateway_request_duration_seconds_sum":
                row["seconds"] += s.value
            elif s.name == "kollm_gateway_request_duration_seconds_count":
                row["count"] += s.value
    out = []
    for row in rows.values():
        total = row["success"] + row["error"]
        row["requests"] = int(total)
        row["success_rate"] = row["success"] / total if total else None
        row["mean_ms"] = 1000 * row["seconds"] / row["count"] if row["count"] else None
        out.append(row)
    return sorted(out, key=lambda r: (r["arm"], r["version"]))


def fmt(x: Any) -> str:
    """A number for a table cell."""
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return "—" if x is None else str(x)
