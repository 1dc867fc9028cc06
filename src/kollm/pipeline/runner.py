"""Running steps: one attempt of one step (`run_attempt`), a step with its cache lookup, lock and retries
(`run_step`), and `kollm step run` (`run_one`: one attempt with explicit inputs, what a pod or a Ray task runs).
Executors (kollm.executors) decide which steps run where and when; this module is what they share.

State of the local store under <project>/.kollm/ (see kollm.pipeline.store):
  steps/<key>/            a finished step: one folder per output plus step.json (published by one rename)
  tmp/<key>.<id>/         a step at work; removed by the next runner that takes the key's lock
  locks/<key>.lock        held while a runner computes the key; a second runner waits, then reuses the result
  checkpoints/<key>/      training checkpoints of an unfinished step (same key -> resume)
  logs/system/            JSON-lines runner events and tracebacks (kollm.jsonlog)
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kollm.errors import ConfigError, KollmError, StepCrashed, StepFailed
from kollm.jsonlog import JsonLog, log_path
from kollm.pipeline.artifacts import folder_digest, write_json_atomic
from kollm.pipeline.lease import Lease
from kollm.pipeline.plan import Plan, plan
from kollm.pipeline.spec import Pipeline, ResolvedStep, load_pipeline, resolve_source
from kollm.pipeline.sqlite_runs import safe_key
from kollm.pipeline.step import (
    ARTIFACT_META_FILE,
    Artifact,
    Progress,
    StepContext,
    StepRecord,
    StepResult,
    _no_progress,
)
from kollm.pipeline.store import ArtifactStore, open_store, read_artifact_meta, wait_note
from kollm.pipeline.tracking import PipelineTracker, StepTracker


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


@dataclass(frozen=True)
class Selection:
    """Which steps a run covers and how: from --force, --from and --only."""

    steps: list[str]  # the steps to run, in file order
    forced: frozenset[str]  # recompute even if cached
    cached_only: frozenset[str]  # read from the cache without a new MLflow run (upstream of --only/--from)


def select(
    pipe: Pipeline, force: Iterable[str] = (), from_step: str | None = None, only: str | None = None
) -> Selection:
    names = [s.name for s in pipe.steps]
    force = list(force)
    for flag, value in [("--from", from_step), ("--only", only), *[("--force", f) for f in force]]:
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: no such step; steps are: {', '.join(names)}")
    if only and from_step:
        raise ConfigError(
            "--only and --from cannot be combined: --only runs one step, --from runs a step and all after it"
        )
    forced = set(force)
    selected = names
    cached_only: set[str] = set()
    if from_step:
        forced |= set(names[names.index(from_step) :])
        cached_only = set(names[: names.index(from_step)])
    elif only:
        deps = {s.name: {r.step for r in s.inputs.values() if r.step} for s in pipe.steps}
        needed, todo = set(), list(deps[only])
        while todo:
            d = todo.pop()
            if d not in needed:
                needed.add(d)
                todo.extend(deps[d])
        cached_only = needed
        selected = [n for n in names if n in needed or n == only]
    return Selection(selected, frozenset(forced), frozenset(cached_only - forced))  # a forced step is recomputed


def run_log(pipe: Pipeline, run_id: str | None) -> JsonLog:
    """The runner's events of one pipeline run: .kollm/logs/system/<run id>.jsonl (component "runner"; several threads
    and processes of one run may write it)."""
    return JsonLog(log_path(pipe.state_dir, "system", run_id), "runner", project=pipe.cfg.project)


@dataclass
class StepRun:
    """Everything `run_step` needs besides the step: shared by the steps of one pipeline run."""

    plan: Plan
    store: ArtifactStore
    tracker: PipelineTracker
    log: JsonLog
    report: Reporter = _silent
    progress: Progress = _no_progress
    executor: str = "local"
    on_tracker: Callable[[StepTracker | None], None] = (
        lambda st: None
    )  # the executor learns the step's run (to end it on Ctrl-C)


def drive(
    selection: Selection,
    tracker: PipelineTracker,
    log: JsonLog,
    parent_run_id: str | None,
    loop: Callable[[], None],
    records: dict[str, StepRecord],
    durations: dict[str, float],
    on_abort: Callable[[str], None] = lambda status: None,
) -> RunResult:
    """What every executor does around its scheduling `loop` (which fills `records` and `durations`): the run's
    events, its parent MLflow run's end and summary metrics, and the result in file order."""
    log.log("pipeline_started", steps=selection.steps)
    t0 = time.perf_counter()
    try:
        loop()
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        on_abort(status)
        log.log("pipeline_failed", "ERROR", error=str(e), status=status)
        if not parent_run_id:
            tracker.finish(status)
        raise
    order = [n for n in selection.steps if n in records]
    result = RunResult(
        tracker.run_id or "", "FINISHED", {n: records[n] for n in order}, {n: durations[n] for n in order}
    )
    if not parent_run_id:
        hits = sum(r.cache_hit for r in result.steps.values())
        tracker.finish(
            "FINISHED", {"duration_s": time.perf_counter() - t0, "steps": len(result.steps), "cache_hits": hits}
        )
    log.log("pipeline_finished", duration_s=time.perf_counter() - t0)
    return result


def run_step(
    step: ResolvedStep,
    inputs: dict[str, Artifact],
    upstream: list[StepRecord],
    r: StepRun,
    *,
    force: bool = False,
    cached_only: bool = False,
    max_attempts: int | None = None,
    first_attempt: int = 0,
) -> tuple[StepRecord, float]:
    """Reuse the step's cached result or compute it (retrying unexpected errors with backoff), under its key's lock."""
    t0 = time.perf_counter()
    key = r.plan.key(step, inputs)
    if cached_only:  # an upstream step of --only/--from: read from the cache, no new MLflow run
        cached = r.store.lookup(key)
        if cached is None:
            raise StepFailed(
                f"step '{step.name}' has no cached result for its current config and inputs",
                hint="run the whole pipeline first (or start earlier with --from)",
            )
        return StepRecord(
            step.name, step.kind, key, cached.get("run_id"), True, r.store.outputs(cached), cached.get("metrics", {})
        ), 0.0
    if wait_note(r.store, key):
        r.report("waiting", step.name, {"key": key})
        r.log.log("step_waiting", step=step.name, key=key)
    with r.store.lock(key):
        cached = None if force else r.store.lookup(key)
        outputs = r.store.outputs(cached) if cached is not None else {}
        tags = {
            "kollm.cache_key": key,
            "kollm.cache_hit": str(cached is not None).lower(),
            "kollm.host": socket.gethostname(),
            "kollm.pid": str(os.getpid()),
            "kollm.executor": r.executor,
            **{f"kollm.input.{k}.digest": a.digest for k, a in inputs.items()},
            **{f"kollm.input.{k}.ref": str(step.inputs[k]) if k in step.inputs else "explicit" for k in inputs},
            **{f"kollm.reference.{safe_key(k)}": v for k, v in r.plan.references[step.name].items()},
            **{f"kollm.output.{n}.digest": a.digest for n, a in outputs.items()},
        }
        st = r.tracker.step(step.name, step.kind, tags)
        r.on_tracker(st)
        config_json = step.config.model_dump(mode="json")
        if cached is not None:
            metrics = cached.get("metrics", {})
            duration = time.perf_counter() - t0
            st.log(params=config_json, metrics={**metrics, "duration_s": duration})
            if "sweep" in cached:  # sweep hook: a cached sweep's run shows its best config and trial table again
                from kollm.pipeline.sweep import sweep_tags

                st.set_tags(sweep_tags(cached["sweep"]))
            st.end("FINISHED")
            r.on_tracker(None)
            r.log.log("step_cached", step=step.name, key=key)
            r.report("cached", step.name, {"key": key, "duration_s": duration})
            return StepRecord(step.name, step.kind, key, st.run_id, True, outputs, metrics), duration

        st.log_params(config_json)
        r.report("started", step.name, {"key": key})
        r.log.log("step_started", step=step.name, key=key)
        attempts = step.retries + 1 if max_attempts is None else max_attempts
        attempt = first_attempt
        while True:
            try:
                if step.sweep is not None:  # sweep hook: the step's trials on Ray Tune, its result the best trial's
                    from kollm.pipeline.sweep import run_sweep

                    record = run_sweep(step, inputs, upstream, r, key=key, tracker=st)
                else:
                    record = run_attempt(step, inputs, upstream, r, key=key, tracker=st, attempt=attempt)
                break
            except KollmError as e:
                _fail(st, r, step, e)
                e.step = step.name
                raise
            except (KeyboardInterrupt, SystemExit):
                st.end("KILLED")
                r.on_tracker(None)
                raise
            except Exception as e:
                r.log.log(
                    "step_error",
                    "ERROR",
                    step=step.name,
                    attempt=attempt,
                    error=f"{type(e).__name__}: {e}",
                    traceback=traceback.format_exc(),
                )
                if attempt - first_attempt + 1 < attempts:
                    delay = step.retry_backoff_s * (2 ** (attempt - first_attempt))
                    attempt += 1
                    r.report(
                        "retry", step.name, {"attempt": attempt, "delay_s": delay, "error": f"{type(e).__name__}: {e}"}
                    )
                    time.sleep(delay)
                    continue
                err = StepCrashed(
                    f"step '{step.name}' ({step.kind}) failed: {type(e).__name__}: {e}",
                    hint=f"full traceback in {r.log.path}",
                )
                _fail(st, r, step, err)
                err.step = step.name
                raise err from None
    duration = time.perf_counter() - t0
    st.log(
        metrics={**record.metrics, "duration_s": duration},
        tags={f"kollm.output.{n}.digest": a.digest for n, a in record.outputs.items()},
    )
    st.end("FINISHED")
    r.on_tracker(None)
    r.log.log("step_finished", step=step.name, key=key, duration_s=duration)
    r.report("finished", step.name, {"key": key, "duration_s": duration, "metrics": record.metrics})
    return record, duration


def run_attempt(
    step: ResolvedStep,
    inputs: dict[str, Artifact],
    upstream: list[StepRecord],
    r: StepRun,
    *,
    key: str,
    tracker: StepTracker,
    attempt: int,
) -> StepRecord:
    """One try of one step with explicit inputs: stage, run, digest, publish. No retries, no cache lookup.

    The attempt holds a lease on the step's checkpoint folder (kollm.pipeline.lease) from before it runs until the
    step is published: an attempt that finds the step published meanwhile (by a retry that went on while it was
    left running, or another runner of an object store) does not publish, and its result is the published one."""
    pipe = r.plan.pipeline
    staged = r.store.stage(key)
    checkpoint_dir = pipe.state_dir / "checkpoints" / key
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_remote = r.store.checkpoint_url(key)
    lease = Lease.new(attempt, checkpoint_dir, checkpoint_remote).claim()
    ctx = StepContext(
        name=step.name,
        kind=step.kind,
        config=step.config,
        inputs=inputs,
        output_dir=staged,
        checkpoint_dir=checkpoint_dir,
        project_dir=pipe.project_dir,
        state_dir=pipe.state_dir,
        tracker=tracker,
        run_id=r.tracker.run_id,
        upstream=upstream,
        resources=step.resources,
        progress=r.progress,
        key=key,
        attempt=attempt,
        executor=r.executor,
        checkpoint_remote=checkpoint_remote,
        lease=lease,
    )
    try:
        res = step.module.run(ctx) or StepResult()
        _check_metric_names(step, res)
        missing = [n for n in step.outputs if not (staged / n).is_dir() or not any((staged / n).iterdir())]
        if missing:
            raise StepFailed(
                f"step '{step.name}' ({step.kind}) finished without writing its output(s): {', '.join(missing)}"
            )
        lease.check("its outputs")
    except BaseException as e:
        r.store.discard(staged)
        published = _published_meanwhile(r.store, key, lease) if isinstance(e, Exception) else None
        if published is None:
            raise
        # the step was published meanwhile by another attempt: its result stands (as a store's first manifest does)
        r.log.log("step_superseded", step=step.name, key=key, attempt=attempt, error=f"{type(e).__name__}: {e}")
        return StepRecord(
            step.name,
            step.kind,
            key,
            tracker.run_id,
            False,
            r.store.outputs(published),
            published.get("metrics", {}),
        )
    manifest_outputs = {}
    for name, typ in step.outputs.items():
        digest = folder_digest(staged / name)
        meta = res.meta.get(name, {})
        write_json_atomic(
            staged / name / ARTIFACT_META_FILE,
            {
                "type": typ,
                "digest": digest,
                "meta": meta,
                "step": step.name,
                "cache_key": key,
                "run_id": tracker.run_id,
            },
        )
        manifest_outputs[name] = {"type": typ, "digest": digest, "meta": meta}
    metrics = {k: float(v) for k, v in res.metrics.items()}
    manifest = r.store.publish(
        key,
        staged,
        {
            "name": step.name,
            "kind": step.kind,
            "key": key,
            "config": step.config.model_dump(mode="json"),
            "outputs": manifest_outputs,
            "metrics": metrics,
            "inputs": {k: _input_record(a) for k, a in inputs.items()},
            "references": r.plan.references[step.name],
            "run_id": tracker.run_id,
            "attempt": attempt,
            "finished_at": time.time(),
        },
    )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    r.store.drop_checkpoints(key)
    return StepRecord(
        step.name, step.kind, key, tracker.run_id, False, r.store.outputs(manifest), manifest.get("metrics", metrics)
    )


def _published_meanwhile(store: ArtifactStore, key: str, lease: Lease) -> dict[str, Any] | None:
    """The manifest of the step when another attempt published it while this one ran (its lease ended), else None."""
    try:
        return None if lease.held() else store.lookup(key)
    except Exception:  # the store's own error: the attempt's error is the one to report
        return None


def _input_record(a: Artifact) -> dict[str, Any]:
    if a.type == "source":
        record = {"type": a.type, "digest": a.digest, "uri": a.meta.get("uri")}
        if "dvc" in a.meta:  # repo, path, rev, the commit it resolved to, md5
            record["dvc"] = a.meta["dvc"]
        return record
    meta = read_artifact_meta(a.path) if a.path is not None else {}
    return {
        "type": a.type,
        "digest": a.digest,
        "uri": a.path.as_uri() if a.path else None,
        "step": meta.get("step"),
        "key": meta.get("cache_key"),
    }


def _check_metric_names(step: ResolvedStep, res: StepResult) -> None:
    from kollm.pipeline.sqlite_runs import bad_key

    bad = [k for k in res.metrics if bad_key(k)]
    if bad:
        raise StepFailed(
            f"step '{step.name}' returned metric name(s) MLflow cannot store: {', '.join(repr(b) for b in bad)}",
            hint="metric names may contain letters, digits, spaces and _ - . / : only",
        )


def _fail(st: StepTracker, r: StepRun, step: ResolvedStep, err: KollmError) -> None:
    st.set_tags({"kollm.error": str(err)})
    st.end("FAILED")
    r.on_tracker(None)
    r.log.log("step_failed", "ERROR", step=step.name, error=str(err))
    r.report("failed", step.name, {"error": str(err)})


def upstream_from_store(store: ArtifactStore, inputs: dict[str, Artifact]) -> list[StepRecord]:
    """The finished steps behind `inputs`, dependencies first, read from the store's manifests (for lineage when a
    step runs alone with explicit inputs: register tags the datasets and runs its model came from)."""
    records: dict[str, StepRecord] = {}

    def visit(key: str | None) -> None:
        if not key or key in records:
            return
        manifest = store.lookup(key)
        if manifest is None:
            return
        for inp in manifest.get("inputs", {}).values():
            if isinstance(inp, dict):
                visit(inp.get("key"))
        records[key] = StepRecord(
            manifest["name"],
            manifest["kind"],
            key,
            manifest.get("run_id"),
            True,
            store.outputs(manifest),
            manifest.get("metrics", {}),
        )

    for a in inputs.values():
        if a.type != "source" and a.path is not None:
            visit(read_artifact_meta(a.path).get("cache_key"))
    return list(records.values())


def _from_cache(p: Plan, store: ArtifactStore, step: ResolvedStep, name: str) -> Artifact:
    """Input `name` of `step` as the pipeline would wire it: a data source, or an earlier step's cached output."""
    ref = step.inputs[name]
    if ref.source is not None:
        if ref.source not in p.sources:
            p.sources[ref.source] = resolve_source(ref.source, p.pipeline.cfg.data[ref.source], p.pipeline.project_dir)
        return p.sources[ref.source]
    up = p.step(ref.step or "")
    if not p.references[up.name]:
        p.references[up.name] = dict(up.module.references(up.config, p.pipeline.project_dir))
    manifest = store.lookup(p.key(up, {k: _from_cache(p, store, up, k) for k in up.inputs}))
    if manifest is None:
        raise StepFailed(
            f"step '{step.name}' reads '{name}' from step '{up.name}', which has no cached result for its current config and inputs",
            hint=f"run the pipeline first (kollm run --only {up.name}), or pass the output's URI as --input {name}=URI",
        )
    return store.outputs(manifest)[ref.output or ""]


def run_one(
    path: str | Path | None,
    step_name: str,
    *,
    inputs: dict[str, str] | None = None,
    store_url: str | None = None,
    attempt: int = 0,
    parent_run_id: str | None = None,
    force: bool = False,
    overrides: dict[str, Any] | None = None,
    report: Reporter = _silent,
    progress: Progress = _no_progress,
    executor: str = "local",
    sweep_trial: bool = False,
) -> StepRecord:
    """Exactly one attempt of one step with explicit inputs (`kollm step run --input NAME=URI ...`): the unit of
    work a Kubernetes pod or a Ray task runs. Inputs not given explicitly are wired as in the pipeline: data
    sources, or earlier steps' cached outputs. A cached result is reused unless `force`. Raises on failure; the caller (a pod's restart policy, Ray) decides about retries.
    sweep_trial: run the step itself, without its `sweep:` (a Ray Tune trial of kollm.pipeline.sweep)."""
    pipe = load_pipeline(path)
    names = [s.name for s in pipe.steps]
    if step_name not in names:
        raise ConfigError(f"--step {step_name}: no such step; steps are: {', '.join(names)}")
    p = plan(pipe, overrides, steps=[step_name])
    step = p.step(step_name)
    if sweep_trial:  # sweep hook: a trial is the plain step with the trial's overrides, keyed like one
        step = replace(step, sweep=None)
        p.steps = [step if s.name == step_name else s for s in p.steps]
    store = open_store(store_url, pipe.state_dir)
    given = dict(inputs or {})
    unknown = [k for k in given if k not in step.module.inputs(step.config)]
    if unknown:
        raise ConfigError(
            f"--input {unknown[0]}: step '{step_name}' has no input '{unknown[0]}' (its inputs: {', '.join(step.module.inputs(step.config)) or 'none'})"
        )
    resolved: dict[str, Artifact] = {}
    for name, spec in step.module.inputs(step.config).items():
        if name in given:
            art = store.materialize(given[name])
            if art.type not in spec.types:
                raise ConfigError(
                    f"--input {name}={given[name]}: an artifact of type {art.type}, but '{name}' needs {' or '.join(spec.types)}"
                )
            resolved[name] = art
        elif name in step.inputs:
            resolved[name] = _from_cache(p, store, step, name)
    tracker = PipelineTracker(pipe.cfg, pipe.project_dir, source_name=str(pipe.file))
    try:
        if parent_run_id:
            tracker.run_id = parent_run_id
        else:
            from kollm._version import __version__

            tracker.start(
                pipe.cfg.project,
                {"kollm.config_file": str(pipe.file), "kollm.version": __version__, "kollm.step_run": step_name},
            )
        log = run_log(pipe, tracker.run_id)
        r = StepRun(p, store, tracker, log, report, progress, executor)
        try:
            record, _ = run_step(
                step,
                resolved,
                upstream_from_store(store, resolved),
                r,
                force=force,
                max_attempts=1,
                first_attempt=attempt,
            )
        except BaseException:
            if not parent_run_id:
                tracker.finish("FAILED")
            raise
        if not parent_run_id:
            tracker.finish("FINISHED", {"steps": 1, "cache_hits": int(record.cache_hit)})
        return record
    finally:
        tracker.close()
