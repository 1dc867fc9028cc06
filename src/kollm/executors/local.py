"""The local executor: steps run on this machine. A step starts as soon as the steps it reads from have finished
and its declared `resources` (cpus, gpus, memory) fit beside the steps already running, so independent steps run
at the same time. A step that runs alone runs in this process (a cached rerun costs milliseconds); steps that run
side by side each run in a child process, `kollm step run --input ...` (libraries such as transformers and torch
keep process-wide state, so two trainings in one process would interfere), with disjoint GPUs where they ask for
GPUs. A step asking for more than the machine has runs alone. Unexpected errors are retried with exponential
backoff (`retries`, `retry_backoff_s`), in this process or by starting the child again with the next `--attempt`.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kollm._version import __version__
from kollm.config import memory_bytes
from kollm.errors import ConfigError, GateFailed, KollmError, NotFound, StepCrashed, StepFailed
from kollm.pipeline.plan import Plan
from kollm.pipeline.progress import read_events, replay
from kollm.pipeline.runner import Reporter, RunResult, Selection, StepRun, drive, run_log, run_step
from kollm.pipeline.spec import ResolvedStep
from kollm.pipeline.step import Artifact, Progress, StepRecord
from kollm.pipeline.store import ArtifactStore
from kollm.pipeline.tracking import PipelineTracker, StepTracker


@dataclass(frozen=True)
class Capacity:
    cpus: float
    gpus: int
    memory: int  # bytes

    @classmethod
    def of_this_machine(cls, need_gpus: bool) -> Capacity:
        gpus = 0
        if need_gpus:  # importing torch costs seconds: only when a step asks for a GPU
            import torch

            gpus = torch.cuda.device_count()
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return cls(float(len(os.sched_getaffinity(0))), gpus, pages)


def _bytes(text: str | None) -> int:
    """resources.memory in bytes (0: not declared); a bad size is a ConfigError naming the field."""
    try:
        return memory_bytes(text) if text else 0
    except ValueError as e:
        raise ConfigError(f"resources.memory: {e}") from None


class LocalExecutor:
    name = "local"

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
        pipe = plan.pipeline
        pipe.state_dir.mkdir(parents=True, exist_ok=True)
        tracker = PipelineTracker(pipe.cfg, pipe.project_dir, source_name=str(pipe.file))
        try:
            if parent_run_id:
                tracker.run_id = parent_run_id
            else:
                tracker.start(
                    pipe.cfg.project,
                    {"kollm.config_file": str(pipe.file), "kollm.version": __version__, "kollm.executor": self.name},
                )
            return _Schedule(plan, selection, store, tracker, parent_run_id, report, progress, plan.overrides).run()
        finally:
            tracker.close()


class _Schedule:
    """One pipeline run: start steps as their inputs and resources allow, collect results, stop at the first error."""

    def __init__(
        self,
        plan: Plan,
        selection: Selection,
        store: ArtifactStore,
        tracker: PipelineTracker,
        parent_run_id: str | None,
        report: Reporter,
        progress: Progress,
        overrides: dict[str, Any] | None,
    ):
        self.plan, self.selection, self.tracker, self.parent_run_id = plan, selection, tracker, parent_run_id
        self.log = run_log(plan.pipeline, tracker.run_id)
        self.shared = StepRun(plan, store, tracker, self.log, report, progress, executor="local")
        self.records: dict[str, StepRecord] = {}
        self.durations: dict[str, float] = {}
        self.in_flight: dict[str, StepTracker] = {}
        self.lock = threading.Lock()
        self.done: queue.Queue[tuple[str, StepRecord | None, float, BaseException | None]] = queue.Queue()
        steps = [plan.step(n) for n in selection.steps]
        self.capacity = Capacity.of_this_machine(any(s.resources.gpus for s in steps))
        self.free_gpus = list(range(self.capacity.gpus))
        self.overrides = overrides

    def run(self) -> RunResult:
        return drive(
            self.selection,
            self.tracker,
            self.log,
            self.parent_run_id,
            self._loop,
            self.records,
            self.durations,
            self._abort,
        )

    def _abort(self, status: str) -> None:
        with self.lock:
            for st in self.in_flight.values():  # steps still at work in other threads
                st.end(status)

    def _loop(self) -> None:
        pending = list(self.selection.steps)
        running: dict[str, ResolvedStep] = {}
        error: BaseException | None = None
        while pending or running:
            if error is None:
                ready = [n for n in pending if all(d in self.records for d in self.plan.deps[n])]
                started = []
                for name in ready:
                    step = self.plan.step(name)
                    if name in self.selection.cached_only or self._cached(step):
                        # a cache read: here, no thread, no child process (its interpreter start and imports
                        # cost seconds), no resources
                        self._finish(name, *self._run(step))
                        pending.remove(name)
                        continue
                    if self._fits(step, running.values()):
                        started.append(step)
                        running[name] = step
                        pending.remove(name)
                if len(started) == 1 and len(running) == 1:  # alone: run here (Ctrl-C and signals behave as usual)
                    del running[started[0].name]
                    self._finish(started[0].name, *self._run(started[0]))
                    continue
                for step in started:
                    with self.lock:
                        gpus, self.free_gpus = (
                            self.free_gpus[: step.resources.gpus],
                            self.free_gpus[step.resources.gpus :],
                        )
                    threading.Thread(
                        target=self._thread, args=(step, gpus), name=f"kollm-step-{step.name}", daemon=True
                    ).start()
                if not running and pending and not started and not ready:
                    break  # nothing can start: a dependency failed or was not selected
            if not running:
                if error is not None:
                    break
                continue
            name, record, duration, exc = self.done.get()
            del running[name]
            if exc is not None:
                error = error or exc
                continue
            assert record is not None
            self._finish(name, record, duration)
        if error is not None:
            raise error

    def _fits(self, step: ResolvedStep, running: Iterable[ResolvedStep]) -> bool:
        busy = list(running)
        if not busy:
            return True  # alone, a step runs even if it asks for more than the machine has
        if not self.shared.store.shared:
            return False  # child processes would not see this process's memory:// store
        r, cap = step.resources, self.capacity
        cpus = sum(s.resources.cpus for s in busy) + r.cpus
        gpus = sum(s.resources.gpus for s in busy) + r.gpus
        mem = sum(_bytes(s.resources.memory) for s in busy) + _bytes(r.memory)
        return cpus <= cap.cpus and gpus <= cap.gpus and mem <= cap.memory

    def _cached(self, step: ResolvedStep) -> bool:
        """Whether the store already holds this step's result (and it is not forced to run again)."""
        if step.name in self.selection.forced:
            return False
        return self.shared.store.lookup(self.plan.key(step, self._inputs(step))) is not None

    def _inputs(self, step: ResolvedStep) -> dict[str, Artifact]:
        return self.plan.inputs(step, {n: r.outputs for n, r in self.records.items()})

    def _run(self, step: ResolvedStep) -> tuple[StepRecord, float]:
        upstream = [self.records[n] for n in self.plan.ancestors(step.name)]
        shared = StepRun(**{**vars(self.shared), "on_tracker": lambda st: self._track(step.name, st)})
        return run_step(
            step,
            self._inputs(step),
            upstream,
            shared,
            force=step.name in self.selection.forced,
            cached_only=step.name in self.selection.cached_only,
        )

    def _thread(self, step: ResolvedStep, gpus: list[int]) -> None:
        try:
            record, duration = self._run_child(step, gpus)
            self.done.put((step.name, record, duration, None))
        except BaseException as e:  # handed to the main thread, which raises it
            self.done.put((step.name, None, 0.0, e))
        finally:
            with self.lock:
                self.free_gpus.extend(gpus)

    def _run_child(self, step: ResolvedStep, gpus: list[int]) -> tuple[StepRecord, float]:
        """The step in a child process (`kollm step run` with explicit inputs), retried like an in-process step."""
        t0 = time.perf_counter()
        report = self.shared.report
        inputs = self.plan.input_uris(step, {n: r.outputs for n, r in self.records.items()})
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if step.resources.gpus else {})}
        attempt = 0
        while True:
            with tempfile.TemporaryDirectory(prefix="kollm-step-") as tmp:
                result_file = os.path.join(tmp, "result.json")
                cmd = [
                    sys.executable,
                    "-m",
                    "kollm.cli",
                    "step",
                    "run",
                    str(self.plan.pipeline.file),
                    "--step",
                    step.name,
                    "--store",
                    self.shared.store.url,
                    "--attempt",
                    str(attempt),
                    "--outputs-json",
                    result_file,
                    "--progress-events",
                    *(["--parent-run-id", self.tracker.run_id] if self.tracker.run_id else []),
                    *(["--force"] if step.name in self.selection.forced else []),
                    *[a for k, uri in sorted(inputs.items()) for a in ("--input", f"{k}={uri}")],
                ]
                if self.overrides:
                    cmd += ["--overrides-json", json.dumps(self.overrides)]
                if attempt == 0:
                    report("started", step.name, {"key": self.plan.key(step, self._inputs(step))})
                returncode, stderr = self._child(cmd, env)
                if returncode == 0:
                    doc = json.loads(open(result_file, encoding="utf-8").read())
                    break
            message = _error_text(stderr)
            self.log.log("step_error", "ERROR", step=step.name, attempt=attempt, error=message, exit_code=returncode)
            if returncode == StepCrashed.exit_code and attempt < step.retries:
                delay = step.retry_backoff_s * (2**attempt)
                attempt += 1
                report("retry", step.name, {"attempt": attempt, "delay_s": delay, "error": message})
                time.sleep(delay)
                continue
            report("failed", step.name, {"error": message})
            err_class = _EXIT_CODES.get(returncode, StepFailed)
            raise err_class(message)
        outputs = {
            n: Artifact(o["type"], Path(o["path"]), o["digest"], o.get("meta", {})) for n, o in doc["outputs"].items()
        }
        record = StepRecord(
            step.name, step.kind, doc["key"], doc.get("run_id"), doc["cache_hit"], outputs, doc.get("metrics", {})
        )
        duration = time.perf_counter() - t0
        report(
            "cached" if record.cache_hit else "finished",
            step.name,
            {"key": record.key, "duration_s": duration, "metrics": record.metrics},
        )
        return record, duration

    def _child(self, cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
        """Run `kollm step run` and draw the progress bars it reports (event lines on its stderr) with this run's
        progress as they come. Returns its exit code and the rest of its stderr."""
        other: list[str] = []
        with subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            preexec_fn=_die_with_parent,
        ) as proc:
            assert proc.stderr is not None
            try:
                replay(read_events(proc.stderr, other), self.shared.progress)
            except Exception as e:  # drawing is cosmetic: a bar that cannot be drawn does not fail the step
                self.log.log("progress_error", "WARNING", error=f"{type(e).__name__}: {e}")
            finally:
                other.extend(proc.stderr)  # what drawing left unread: the child must not block on a full pipe
        return proc.returncode, "".join(other)

    def _track(self, name: str, st: StepTracker | None) -> None:
        with self.lock:
            if st is None:
                self.in_flight.pop(name, None)
            else:
                self.in_flight[name] = st

    def _finish(self, name: str, record: StepRecord, duration: float) -> None:
        self.records[name] = record
        self.durations[name] = duration


# `kollm step run` exits with the code of the error it hit: the parent raises the same kind of error
_EXIT_CODES: dict[int, type[KollmError]] = {1: StepFailed, 2: ConfigError, 3: GateFailed, 4: NotFound, 5: StepCrashed}


def _die_with_parent() -> None:
    """In the child, before exec: the kernel kills it when the thread that started it dies, so a runner killed with
    kill -9 leaves no step running on (Linux; elsewhere the child finishes its step and publishes it)."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _error_text(stderr: str) -> str:
    """The child's one error message (from `error:` on), or the end of its output."""
    lines = stderr.strip().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("error: "):
            return "\n".join(lines[i:]).removeprefix("error: ")
    return "\n".join(lines[-15:]) or "the step's process ended without a message"
