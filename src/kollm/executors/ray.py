"""The Ray executor: each step is a Ray task, started as soon as the steps it reads from have finished, on a local
Ray instance (started for the run and stopped after) or a cluster (`address`). A task reserves the step's declared
`cpus`, `gpus` and `memory`, except for steps whose work itself runs on the cluster: `prepare` (Ray Data) and the
training kinds (Ray Train), whose task only coordinates (no CPU reserved) while their Ray Data tasks or Ray Train
workers reserve the step's resources. Every task runs one attempt of its step (`run_one`, what `kollm step run`
does) against the same artifact store and MLflow tracking as the driver; crashed attempts are retried with backoff.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from kollm._version import __version__
from kollm.config import memory_bytes
from kollm.errors import ConfigError, KollmError, StepCrashed
from kollm.pipeline.plan import Plan
from kollm.pipeline.runner import Reporter, RunResult, Selection, StepRun, drive, run_log, run_step
from kollm.pipeline.spec import ResolvedStep
from kollm.pipeline.step import Artifact, Progress, StepRecord
from kollm.pipeline.store import ArtifactStore, LocalStore
from kollm.pipeline.tracking import PipelineTracker

SELF_SCALING = ("prepare", "cpt", "sft", "align")  # their work runs on Ray Data / Ray Train inside the step
CONNECT_TIMEOUT_S = 20


def _step_task(
    file: str,
    step: str,
    inputs: dict[str, str],
    store: str,
    attempt: int,
    parent_run_id: str | None,
    force: bool,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """What a Ray task runs: one attempt of one step (kollm.pipeline.runner.run_one) on a Ray worker."""
    from kollm.pipeline.runner import run_one

    rec = run_one(
        file,
        step,
        inputs=inputs,
        store_url=store,
        attempt=attempt,
        parent_run_id=parent_run_id,
        force=force,
        overrides=overrides,
        executor="ray",
    )
    return {
        "key": rec.key,
        "cache_hit": rec.cache_hit,
        "run_id": rec.run_id,
        "metrics": rec.metrics,
        "outputs": {
            n: {"type": a.type, "path": str(a.path), "digest": a.digest, "meta": a.meta} for n, a in rec.outputs.items()
        },
    }


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None):
        self.address = address

    def run(
        self,
        plan: Plan,
        selection: Selection,
        store: ArtifactStore,
        *,
        parent_run_id: str | None,
        report: Reporter,
        progress: Progress,
    ) -> RunResult:
        from kollm.train.ray_train import check_fits, require_ray

        ray = require_ray()
        pipe = plan.pipeline
        if not store.shared:
            raise ConfigError(
                f"--store {store.url}: this store lives in one process's memory; Ray tasks need a folder or an s3:// store"
            )
        remote = self.address not in (None, "auto", "local")
        if remote:
            _check_shared(pipe.project_dir, store)
            _check_reachable(self.address or "")
        started_here = not ray.is_initialized()
        if started_here:
            _connect(ray, self.address, pipe.project_dir if remote else None)
        try:
            totals = ray.cluster_resources()
            problems = [p for n in selection.steps for p in check_fits(plan.step(n).resources, totals, step=n)]
            if problems:
                raise ConfigError(problems, hint="resources are checked against the Ray cluster before anything runs")
            tracker = PipelineTracker(pipe.cfg, pipe.project_dir, source_name=str(pipe.file))
            try:
                if parent_run_id:
                    tracker.run_id = parent_run_id
                else:
                    tracker.start(
                        pipe.cfg.project,
                        {
                            "kollm.config_file": str(pipe.file),
                            "kollm.version": __version__,
                            "kollm.executor": self.name,
                        },
                    )
                return _RaySchedule(
                    ray,
                    plan,
                    selection,
                    store,
                    tracker,
                    parent_run_id,
                    report,
                    progress,
                    "kollm.yaml" if remote else str(pipe.file),
                ).run()
            finally:
                tracker.close()
        finally:
            if started_here:
                ray.shutdown()


def _check_shared(project_dir: Path, store: ArtifactStore) -> None:
    """A remote cluster's workers cannot see this machine's files: the store and the tracking store must be shared."""
    from kollm.pipeline.tracking import tracking_uri

    uri = tracking_uri(project_dir)
    problems = []
    if uri.startswith("sqlite:"):
        problems.append(
            f"tracking.uri is {uri}, a file on this machine that Ray workers on other machines cannot reach; "
            "set tracking.uri to an MLflow server (http://...) or a database (postgresql://...)"
        )
    if isinstance(store, LocalStore) and store.root == project_dir / ".kollm":
        problems.append(
            "the artifact store is this project's .kollm/ folder; give the cluster a shared one with --store s3://BUCKET/PREFIX "
            "(or a folder every node mounts)"
        )
    if problems:
        raise ConfigError(problems)


def _check_reachable(address: str) -> None:
    """A quick TCP check of a cluster address: Ray itself keeps retrying an unreachable one for minutes."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host or target, int(port or 10001)), timeout=CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as e:
        raise KollmError(
            f"cannot reach the Ray cluster at {address}: {e}",
            hint="start it with `ray start --head` (client port 10001) or check --address",
        ) from None


def _connect(ray: Any, address: str | None, working_dir: Path | None) -> None:
    """ray.init for a run: a local instance sized to this machine, or the cluster at `address`."""
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if working_dir is not None:  # the project's files (kollm.yaml, python steps, small data) travel with the tasks
        kwargs["runtime_env"] = {"working_dir": str(working_dir), "excludes": [".kollm/", "*.db"]}
    if address in (None, "local"):
        kwargs["num_cpus"] = len(os.sched_getaffinity(0))
    try:
        ray.init(address=None if address in (None, "local") else address, **kwargs)
    except Exception as e:  # a cluster that refuses us, a version mismatch
        raise KollmError(
            f"cannot connect to the Ray cluster at {address or 'a new local instance'}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        ) from None


class _RaySchedule:
    def __init__(
        self,
        ray: Any,
        plan: Plan,
        selection: Selection,
        store: ArtifactStore,
        tracker: PipelineTracker,
        parent_run_id: str | None,
        report: Reporter,
        progress: Progress,
        file: str,
    ):
        self.ray, self.plan, self.selection, self.store, self.tracker = ray, plan, selection, store, tracker
        self.parent_run_id, self.report, self.file = parent_run_id, report, file
        self.log = run_log(plan.pipeline, tracker.run_id)
        self.shared = StepRun(plan, store, tracker, self.log, report, progress, executor="ray")
        self.task = ray.remote(_step_task)
        self.records: dict[str, StepRecord] = {}
        self.durations: dict[str, float] = {}

    def run(self) -> RunResult:
        return drive(
            self.selection, self.tracker, self.log, self.parent_run_id, self._loop, self.records, self.durations
        )

    def _loop(self) -> None:
        pending = list(self.selection.steps)
        running: dict[Any, tuple[ResolvedStep, int, float]] = {}  # object ref -> (step, attempt, start)
        error: BaseException | None = None
        while pending or running:
            if error is None:
                for name in [n for n in pending if all(d in self.records for d in self.plan.deps[n])]:
                    pending.remove(name)
                    step = self.plan.step(name)
                    if name in self.selection.cached_only:
                        self.records[name], self.durations[name] = run_step(
                            step, self._inputs(step), [], self.shared, cached_only=True
                        )
                        continue
                    running[self._submit(step, 0)] = (step, 0, time.perf_counter())
            if not running:
                break
            done, _ = self.ray.wait(list(running), num_returns=1)
            step, attempt, t0 = running.pop(done[0])
            try:
                doc = self.ray.get(done[0])
            except Exception as e:
                failure = _cause(e)
                if isinstance(failure, StepCrashed) and attempt < step.retries:
                    delay = step.retry_backoff_s * (2**attempt)
                    self.report(
                        "retry", step.name, {"attempt": attempt + 1, "delay_s": delay, "error": failure.message}
                    )
                    time.sleep(delay)
                    running[self._submit(step, attempt + 1)] = (step, attempt + 1, t0)
                    continue
                self.report("failed", step.name, {"error": str(failure)})
                error = error or failure
                continue
            outputs = {
                n: Artifact(o["type"], Path(o["path"]), o["digest"], o.get("meta", {}))
                for n, o in doc["outputs"].items()
            }
            record = StepRecord(
                step.name, step.kind, doc["key"], doc["run_id"], doc["cache_hit"], outputs, doc["metrics"]
            )
            self.records[step.name], self.durations[step.name] = record, time.perf_counter() - t0
            self.report(
                "cached" if record.cache_hit else "finished",
                step.name,
                {"key": record.key, "duration_s": self.durations[step.name], "metrics": record.metrics},
            )
        if error is not None:
            raise error

    def _inputs(self, step: ResolvedStep) -> dict[str, Artifact]:
        return self.plan.inputs(step, {n: r.outputs for n, r in self.records.items()})

    def _submit(self, step: ResolvedStep, attempt: int) -> Any:
        r = step.resources
        coordinator = step.kind in SELF_SCALING
        options: dict[str, Any] = {
            "num_cpus": 0 if coordinator else r.cpus,
            "num_gpus": 0 if coordinator else r.gpus,
            "max_retries": 0,
            "name": f"kollm:{step.name}",
        }
        if r.memory and not coordinator:
            options["memory"] = memory_bytes(r.memory)
        inputs = self.plan.input_uris(step, {n: r.outputs for n, r in self.records.items()})
        if attempt == 0:
            self.report("started", step.name, {"key": self.plan.key(step, self._inputs(step))})
        return self.task.options(**options).remote(
            self.file,
            step.name,
            inputs,
            self.store.url,
            attempt,
            self.tracker.run_id,
            step.name in self.selection.forced,
            self.plan.overrides,
        )


def _cause(e: BaseException) -> KollmError:
    """The error a task raised, as kollm's own error (Ray wraps it in a RayTaskError)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, KollmError):
        return cause
    return StepCrashed(
        f"a Ray task failed: {type(cause or e).__name__}: {str(cause or e).strip().splitlines()[-1][:500] if str(cause or e).strip() else ''}"
    )
