"""Executors decide where and when the steps of a plan run; step code never knows which one runs it.

- `local` (kollm.executors.local): this machine; independent steps in parallel within the declared resources.
- `ray` (kollm.executors.ray): steps as Ray tasks on a local or remote Ray cluster.
Every executor implements `Executor` and uses the same pieces (kollm.pipeline.runner.run_step, the plan's keys,
an ArtifactStore), so a step's key, outputs and MLflow runs are the same whichever one runs it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from kollm.pipeline.plan import Plan, plan
from kollm.pipeline.runner import Reporter, RunResult, Selection, _silent, select
from kollm.pipeline.spec import load_pipeline
from kollm.pipeline.step import Progress, _no_progress
from kollm.pipeline.store import ArtifactStore, open_store


class Executor(Protocol):
    name: str

    def run(
        self,
        plan: Plan,
        selection: Selection,
        store: ArtifactStore,
        *,
        parent_run_id: str | None,
        report: Reporter,
        progress: Progress,
    ) -> RunResult: ...


def run(
    path: str | Path | None = None,
    *,
    force: Iterable[str] = (),
    from_step: str | None = None,
    only: str | None = None,
    parent_run_id: str | None = None,
    report: Reporter = _silent,
    progress: Progress = _no_progress,
    executor: str | None = None,
    address: str | None = None,
    store: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> RunResult:
    """Run the pipeline in kollm.yaml at `path`. Finished steps with unchanged keys are reused.

    force: step names to re-run even if cached. from_step: reuse the steps before it from the cache and re-run it
    and every later step. only: just this step (reused if cached; add it to `force` to recompute); earlier steps
    must be cached and are read from the cache without new MLflow runs. parent_run_id: attach to an existing
    pipeline MLflow run. executor: local (default: kollm.yaml's `executor`) or ray; address: the Ray cluster.
    store: an artifact store URL (default: the project's .kollm/). overrides: {"STEP.config.path": value}.
    """
    pipe = load_pipeline(path)
    selection = select(pipe, force, from_step, only)
    p = plan(pipe, overrides, steps=selection.steps)
    kind = executor or pipe.cfg.executor.kind
    st = open_store(store, pipe.state_dir)
    ex: Executor
    if kind == "local":
        from kollm.executors.local import LocalExecutor

        ex = LocalExecutor()
    elif kind == "ray":
        from kollm.executors.ray import RayExecutor

        ex = RayExecutor(address or pipe.cfg.executor.address)
    else:
        from kollm.errors import ConfigError

        raise ConfigError(f"--executor {kind}: unknown executor; use local or ray")
    return ex.run(p, selection, st, parent_run_id=parent_run_id, report=report, progress=progress)
