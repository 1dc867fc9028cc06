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
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kollm.config import load_config
from kollm.errors import KollmError, NotFound
from kollm.eval.report import TRAINING_KINDS, Curve, curves_from_log, curves_from_mlflow
from kollm.pipeline import history
from kollm.pipeline.tracking import client_for, tracking_uri

MAX_RUNS = 2000  # runs scanned for the forward lineage of a digest


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

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = client_for(self.project.uri)
        return self._client

    def experiment_id(self) -> str | None:
        exp = self.client.get_experiment_by_name(self.project.experiment)
        return None if exp is None else exp.experiment_id


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
    )


def _elapsed(start: int | None, end: int | None) -> float | None:
    if not start:
        return None
    return ((end or time.time() * 1000) - start) / 1000


@dataclass
class RunView:
    info: history.RunRow
    tags: dict[str, str]
    steps: list[StepNode]
    curves: list[Curve]

    @property
    def active(self) -> bool:
        return self.info.status == "RUNNING"


def list_runs(project: Project, limit: int = 50) -> list[history.RunRow]:
    return history.list_runs(project.dir, limit=limit)


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
    if info.status == "RUNNING":
        steps += _pending_steps(store.project, {s.name for s in steps})
    curves: list[Curve] = []
    for s in steps:
        if s.kind in TRAINING_KINDS and s.run_id:
            curves += training_curves(store, s)
    return RunView(info, dict(run.data.tags), steps, curves)


def _pending_steps(project: Project, started: set[str]) -> list[StepNode]:
    """Steps of kollm.yaml not started yet in a running pipeline (none if kollm.yaml no longer loads)."""
    from kollm.pipeline.spec import load_pipeline

    try:
        pipe = load_pipeline(project.dir)
    except KollmError:
        return []
    return [
        StepNode(s.name, s.kind, "PENDING", inputs={k: (str(ref), "") for k, ref in s.inputs.items()})
        for s in pipe.steps
        if s.name not in started
    ]


def training_curves(store: Store, step: StepNode) -> list[Curve]:
    """Loss curves of a training step: its MLflow metric history, or its JSON-lines log for a cached step."""
    found = curves_from_mlflow(store.client, step.name, step.run_id) if step.run_id else []  # none: not started
    return found or curves_from_log(step.name, store.project.state / "logs" / "training" / f"{step.name}.jsonl")


@dataclass
class StepView:
    node: StepNode
    pipeline_run_id: str | None
    config: dict[str, Any]
    artifacts: list[str]  # artifact paths of the step run, e.g. prepare/report.html
    output_dirs: dict[str, str]  # output name -> folder under .kollm/steps/<key>/
    logs: list[str]  # runner events for this step (JSON lines)
    training_log: list[str]  # the tail of the step's training log
    curves: list[Curve]
    tags: dict[str, str]

    @property
    def reports(self) -> list[str]:
        return [a for a in self.artifacts if a.endswith(".html")]


def step_view(store: Store, run_id: str) -> StepView:
    c = store.client
    run = _get_run(c, run_id)
    node = step_from_run(run)
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
    training_log = []
    tlog = state / "logs" / "training" / f"{node.name}.jsonl"
    if node.kind in TRAINING_KINDS and tlog.is_file():
        training_log = tlog.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
    curves = training_curves(store, node) if node.kind in TRAINING_KINDS else []
    return StepView(
        node,
        parent,
        config,
        _artifacts(c, run_id),
        outputs,
        logs[-100:],
        training_log,
        curves,
        dict(sorted(run.data.tags.items())),
    )


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
    )


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
                if k.startswith(("kollm.data.", "kollm.source.")) or k == "kollm.model_digest"
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


def rollout_view(project: Project, gateway: str | None, api_key: str | None) -> RolloutView:
    from kollm.rollout import client as rollout_client

    status, error = None, ""
    try:
        status = rollout_client.command("status", gateway=gateway, api_key=api_key)
    except KollmError as e:
        error = e.message
    saved = [] if status is not None else saved_rollouts(project)
    return RolloutView(status, saved, error, serving_stats(gateway), rollout_client.gateway_url(gateway))


def saved_rollouts(project: Project) -> list[dict[str, Any]]:
    """The rollout state files of the project, most recently updated first."""
    folder = project.state / "rollouts"
    states = [s for p in sorted(folder.glob("*.json")) if (s := _read_json(p)) is not None] if folder.is_dir() else []
    return sorted(states, key=lambda s: s.get("updated_at", 0), reverse=True)


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
