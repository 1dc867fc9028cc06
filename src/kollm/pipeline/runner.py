"""Run a pipeline: wire, cache, execute, publish atomically, retry and track.

State under <project>/.kollm/:
  steps/<key>/            a finished step: one folder per output plus step.json (published by one rename)
  tmp/<key>.<id>/         a step at work; removed at the next start if a crash left it
  checkpoints/<key>/      training checkpoints of an unfinished step (same key -> resume)
  logs/system/            JSON-lines runner events and tracebacks
A step's cache key is the digest of its kind, resolved config, input digests and the source of its code,
so a finished step with the same key is reused, never recomputed, and a killed run picks up where it stopped.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kollm
from kollm.errors import ConfigError, KollmError, StepFailed
from kollm.pipeline.artifacts import folder_digest, json_digest, publish_dir, write_json_atomic
from kollm.pipeline.spec import Pipeline, ResolvedStep, find_module, load_pipeline, resolve_source
from kollm.pipeline.step import ARTIFACT_META_FILE, Artifact, Progress, StepContext, StepRecord, StepResult, _no_progress
from kollm.pipeline.tracking import PipelineTracker

CACHE_FORMAT = 1
MANIFEST = "step.json"


@dataclass
class RunResult:
    run_id: str
    status: str
    steps: dict[str, StepRecord] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)


# Called with (event, step name, detail) so the CLI can print progress lines; default: silent.
Reporter = Callable[[str, str, dict[str, Any]], None]


def _silent(event: str, step: str, detail: dict[str, Any]) -> None:
    pass


def run(
    path: str | Path | None = None,
    *,
    force: Iterable[str] = (),
    from_step: str | None = None,
    only: str | None = None,
    parent_run_id: str | None = None,
    report: Reporter = _silent,
    progress: Progress = _no_progress,
) -> RunResult:
    """Run the pipeline in kollm.yaml at `path`. Finished steps with unchanged keys are reused.

    force: step names to re-run even if cached. from_step: reuse the steps before it from the cache and
    re-run it and every later step. only: just this step (reused if cached; add it to `force` to recompute);
    earlier steps must be cached and are read from the cache without new MLflow runs.
    parent_run_id: attach to an existing pipeline MLflow run (used by `kollm step run`).
    """
    pipe = load_pipeline(path)
    names = [s.name for s in pipe.steps]
    for flag, value in [("--from", from_step), ("--only", only), *[("--force", f) for f in force]]:
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: no such step; steps are: {', '.join(names)}")
    if only and from_step:
        raise ConfigError("--only and --from cannot be combined: --only runs one step, --from runs a step and all after it")
    forced = set(force)
    if from_step:
        forced |= set(names[names.index(from_step) :])
        cached_only = set(names[: names.index(from_step)])
    elif only:
        cached_only = set(names[: names.index(only)])
    else:
        cached_only = set()
    cached_only -= forced  # a forced step is recomputed, even before --from/--only
    selected = names[: names.index(only) + 1] if only else names

    state = pipe.state_dir
    state.mkdir(parents=True, exist_ok=True)
    with _project_lock(state):
        shutil.rmtree(state / "tmp", ignore_errors=True)  # leftovers of a killed run; we hold the lock
        tracker = PipelineTracker(pipe.cfg, pipe.project_dir)
        try:
            return _run_pipeline(pipe, tracker, selected, forced, cached_only, parent_run_id, report, progress)
        finally:
            tracker.close()


def _run_pipeline(
    pipe: Pipeline,
    tracker: PipelineTracker,
    selected: list[str],
    forced: set[str],
    cached_only: set[str],
    parent_run_id: str | None,
    report: Reporter,
    progress: Progress,
) -> RunResult:
    if parent_run_id:
        tracker.run_id = parent_run_id
    else:
        tracker.start(pipe.cfg.project, {"kollm.config_file": str(pipe.file), "kollm.version": kollm.__version__})
    result = RunResult(run_id=tracker.run_id, status="RUNNING")
    log = _EventLog(pipe.state_dir / "logs" / "system" / f"{tracker.run_id}.jsonl")
    log.write("pipeline_started", steps=selected)
    t_pipeline = time.perf_counter()
    try:
        for step in pipe.steps:
            if step.name not in selected:
                break
            record, duration = _run_step(
                pipe, step, result, tracker, log, report, progress,
                force=step.name in forced, cached_only=step.name in cached_only,
            )
            result.steps[step.name] = record
            result.durations[step.name] = duration
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        log.write("pipeline_failed", error=str(e), status=status)
        if not parent_run_id:
            tracker.finish(status)
        result.status = status
        raise
    if not parent_run_id:
        hits = sum(r.cache_hit for r in result.steps.values())
        tracker.finish("FINISHED", {"duration_s": time.perf_counter() - t_pipeline, "steps": len(result.steps), "cache_hits": hits})
    log.write("pipeline_finished", duration_s=time.perf_counter() - t_pipeline)
    result.status = "FINISHED"
    return result


def _run_step(
    pipe: Pipeline,
    step: ResolvedStep,
    result: RunResult,
    tracker: PipelineTracker,
    log: _EventLog,
    report: Reporter,
    progress: Progress,
    *,
    force: bool,
    cached_only: bool,
) -> tuple[StepRecord, float]:
    t0 = time.perf_counter()
    inputs = _resolve_inputs(pipe, step, result)
    config_json = step.config.model_dump(mode="json")
    key = json_digest(
        {
            "format": CACHE_FORMAT,
            "kind": step.kind,
            "config": config_json,
            "inputs": {k: a.digest for k, a in sorted(inputs.items())},
            "code": code_digest(step.module.code(step.config)),
        }
    )[:32]
    final = pipe.state_dir / "steps" / key
    cached = None if force else _read_manifest(final)
    if cached_only:  # an upstream step of --only/--from: read from the cache, no new MLflow run
        if cached is None:
            raise StepFailed(
                f"step '{step.name}' has no cached result for its current config and inputs",
                hint="run the whole pipeline first (or start earlier with --from)",
            )
        outputs = _cached_outputs(final, cached)
        return StepRecord(step.name, step.kind, key, cached.get("run_id"), True, outputs, cached.get("metrics", {})), 0.0
    tags = {
        "kollm.cache_key": key,
        "kollm.cache_hit": str(cached is not None).lower(),
        "kollm.host": socket.gethostname(),
        "kollm.pid": str(os.getpid()),
        **{f"kollm.input.{k}.digest": a.digest for k, a in inputs.items()},
        **{f"kollm.input.{k}.ref": str(step.inputs[k]) for k in inputs},
    }
    if cached is not None:  # outputs known already: their digests go in with the run's other tags
        outputs = _cached_outputs(final, cached)
        tags.update({f"kollm.output.{n}.digest": a.digest for n, a in outputs.items()})
    st = tracker.step(step.name, step.kind, tags)
    if cached is not None:
        metrics = cached.get("metrics", {})
        duration = time.perf_counter() - t0
        st.log(params=config_json, metrics={**metrics, "duration_s": duration})
        st.end("FINISHED")
        log.write("step_cached", step=step.name, key=key)
        report("cached", step.name, {"key": key, "duration_s": duration})
        return StepRecord(step.name, step.kind, key, st.run_id, True, outputs, metrics), duration

    st.log_params(config_json)
    report("started", step.name, {"key": key})
    log.write("step_started", step=step.name, key=key)
    checkpoint_dir = pipe.state_dir / "checkpoints" / key
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        tmp = pipe.state_dir / "tmp" / f"{key}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        ctx = StepContext(
            name=step.name, kind=step.kind, config=step.config, inputs=inputs, output_dir=tmp,
            checkpoint_dir=checkpoint_dir, project_dir=pipe.project_dir, state_dir=pipe.state_dir, tracker=st,
            run_id=tracker.run_id, upstream=list(result.steps.values()), resources=step.resources, progress=progress,
        )
        try:
            res = step.module.run(ctx) or StepResult()
            _check_metric_names(step, res)
            break
        except KollmError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            _fail(st, log, step, e, report)
            e.step = step.name
            raise
        except (KeyboardInterrupt, SystemExit):
            shutil.rmtree(tmp, ignore_errors=True)
            st.end("KILLED")
            raise
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            tb = traceback.format_exc()
            log.write("step_error", step=step.name, attempt=attempt, error=f"{type(e).__name__}: {e}", traceback=tb)
            if attempt < step.retries:
                delay = step.retry_backoff_s * (2**attempt)
                attempt += 1
                report("retry", step.name, {"attempt": attempt, "delay_s": delay, "error": f"{type(e).__name__}: {e}"})
                time.sleep(delay)
                continue
            err = StepFailed(
                f"step '{step.name}' ({step.kind}) failed: {type(e).__name__}: {e}",
                hint=f"full traceback in {log.path}",
            )
            _fail(st, log, step, err, report)
            err.step = step.name
            raise err from None

    missing = [n for n in step.outputs if not (tmp / n).is_dir() or not any((tmp / n).iterdir())]
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        err = StepFailed(f"step '{step.name}' ({step.kind}) finished without writing its output(s): {', '.join(missing)}")
        _fail(st, log, step, err, report)
        raise err
    outputs: dict[str, Artifact] = {}
    manifest_outputs = {}
    for name, typ in step.outputs.items():
        digest = folder_digest(tmp / name)
        meta = res.meta.get(name, {})
        art = {"type": typ, "digest": digest, "meta": meta, "step": step.name, "cache_key": key, "run_id": st.run_id}
        write_json_atomic(tmp / name / ARTIFACT_META_FILE, art)
        manifest_outputs[name] = {"type": typ, "digest": digest, "meta": meta}
        outputs[name] = Artifact(typ, final / name, digest, meta)
    metrics = {k: float(v) for k, v in res.metrics.items()}
    write_json_atomic(
        tmp / MANIFEST,
        {
            "name": step.name, "kind": step.kind, "key": key, "config": config_json, "outputs": manifest_outputs,
            "metrics": metrics, "inputs": {k: a.digest for k, a in inputs.items()}, "run_id": st.run_id,
            "finished_at": time.time(),
        },
    )
    if final.exists():  # a forced re-run replaces the old result
        trash = pipe.state_dir / "tmp" / f"{key}.old.{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    publish_dir(tmp, final)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    duration = time.perf_counter() - t0
    st.log(metrics={**metrics, "duration_s": duration}, tags={f"kollm.output.{n}.digest": a.digest for n, a in outputs.items()})
    st.end("FINISHED")
    log.write("step_finished", step=step.name, key=key, duration_s=duration)
    report("finished", step.name, {"key": key, "duration_s": duration, "metrics": metrics})
    return StepRecord(step.name, step.kind, key, st.run_id, False, outputs, metrics), duration


def _check_metric_names(step: ResolvedStep, res: StepResult) -> None:
    from kollm.pipeline.sqlite_runs import bad_key

    bad = [k for k in res.metrics if bad_key(k)]
    if bad:
        raise StepFailed(
            f"step '{step.name}' returned metric name(s) MLflow cannot store: {', '.join(repr(b) for b in bad)}",
            hint="metric names may contain letters, digits, spaces and _ - . / : only",
        )


def _fail(st: Any, log: _EventLog, step: ResolvedStep, err: KollmError, report: Reporter) -> None:
    st.set_tags({"kollm.error": str(err)})
    st.end("FAILED")
    log.write("step_failed", step=step.name, error=str(err))
    report("failed", step.name, {"error": str(err)})


def _resolve_inputs(pipe: Pipeline, step: ResolvedStep, result: RunResult) -> dict[str, Artifact]:
    inputs = {}
    for name, ref in step.inputs.items():
        if ref.source is not None:
            inputs[name] = resolve_source(ref.source, pipe.cfg.data[ref.source], pipe.project_dir)
        else:
            inputs[name] = result.steps[ref.step].outputs[ref.output]
    return inputs


def _cached_outputs(folder: Path, manifest: dict[str, Any]) -> dict[str, Artifact]:
    return {n: Artifact(o["type"], folder / n, o["digest"], o.get("meta", {})) for n, o in manifest["outputs"].items()}


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not all((folder / name).is_dir() for name in manifest["outputs"]):
        return None
    return manifest


_code_cache: dict[str, str] = {}


def code_digest(modules: tuple[str, ...]) -> str:
    """Digest of the source files of `modules` (a package: every .py below it)."""
    parts = []
    for mod in sorted(modules):
        spec = find_module(mod)
        if spec is None:
            raise ConfigError(f"cannot find module '{mod}'")
        if spec.submodule_search_locations:
            files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).rglob("*.py"))
        else:
            files = [Path(spec.origin)]
        for f in files:
            st = f.stat()
            ck = f"{f}:{st.st_size}:{st.st_mtime_ns}"
            if ck not in _code_cache:
                _code_cache[ck] = json_digest(f.read_bytes().decode("utf-8", "replace"))
            parts.append((mod, f.name, _code_cache[ck]))
    return json_digest(parts)


class _project_lock:
    """One runner per project at a time (a second one gets a clear error instead of racing on .kollm/)."""

    def __init__(self, state: Path):
        self.path = state / "lock"

    def __enter__(self) -> _project_lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(self.fd)
            raise KollmError(f"another kollm run is using this project (pid {holder})", hint="wait for it to finish") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class _EventLog:
    """JSON-lines events of one pipeline run under .kollm/logs/system/."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"ts": time.time(), "level": "ERROR" if "error" in fields else "INFO", "event": event, **fields}, ensure_ascii=False, default=str)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
