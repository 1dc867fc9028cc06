"""Training on Ray Train: the Ray counterpart of `recipe.launch`.

`launch_ray(fn, job, workers=N, use_gpu=...)` runs the very same training function `fn(job, env)` (the same loop,
kernels and losses as one process) on N Ray Train workers of a `TorchTrainer`. Ray Train starts the workers and
the torch process group (gloo on CPU, NCCL on GPU); each worker builds the same `Env` as `recipe._worker`
(rank, world, device), rank 0 sends its log lines back to this process (a Ray queue), which writes them to the
job's JSON log, the tracker and the progress bar, like `launch` does; its last record is rank 0's StepResult
(metrics and artifact meta).

Fault tolerance: training checkpoints into `job.checkpoint_dir` (stable per cache key) and the loop resumes from
the newest complete checkpoint there. A worker that dies makes Ray Train restart the worker group
(`FailureConfig(max_failures)`), whose workers resume from that checkpoint; a killed driver takes its workers
with it, and the next run of the step (same cache key, same folder) resumes the same way. With a remote artifact
store (s3://...) the checkpoints are uploaded to it (`job.checkpoint_remote`) and each worker keeps only a scratch
copy under its node's temp folder, so a worker group restarted on another node, or the step's retry there, pulls
the newest one and resumes from it. With a local store `job.checkpoint_dir` and `job.output_dir` must be visible to
every worker: one machine, or a shared filesystem on a cluster. A run whose attempt failed while it went on (its
coordinator's node died) writes nothing once the step's retry published the step: `job.lease`
(kollm.pipeline.lease) is checked around every checkpoint, before the model and when Ray Train restarts its workers.

`check_fits(resources, cluster)` lists what a step asks for that the Ray cluster does not have (the executor calls
it at plan time, so an impossible request is an error instead of a task that waits forever).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from kollm.config import Resources, memory_bytes
from kollm.errors import KollmError, StepFailed
from kollm.pipeline.step import Progress, StepResult, _no_progress
from kollm.train.recipe import Env, Job, TrainingLog

MAX_FAILURES = 2  # worker-group restarts (each resumes from the newest checkpoint) before the step fails
RESULT_EVENT = "result"  # the queue record that carries rank 0's StepResult


def require_ray() -> Any:
    """The `ray` module, or one clear line saying how to install it."""
    try:
        import ray
        import ray.train.torch  # noqa: F401
    except ImportError:
        raise KollmError("the ray executor needs Ray, which is not installed here: pip install 'kollm[ray]'") from None
    return ray


# ---------------------------------------------------------------- does the step fit the cluster


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(resources: Resources, cluster_resources: Mapping[str, float], *, step: str | None = None) -> list[str]:
    """What `resources` asks for beyond the cluster's totals (`ray.cluster_resources()`), one line each naming
    the field to change; empty when it fits. Training steps on Ray run `resources.gpus` workers of one GPU
    each (or `resources.workers` CPU workers) that share `resources.cpus`."""
    where = f"steps.{step}.resources" if step else "resources"
    problems = []
    gpus = float(cluster_resources.get("GPU", 0))
    if resources.gpus > gpus:
        problems.append(
            f"{where}.gpus is {resources.gpus} but the Ray cluster has {gpus:g} GPU(s); lower it or add GPU nodes"
        )
    cpus = float(cluster_resources.get("CPU", 0))
    if resources.cpus > cpus:
        problems.append(
            f"{where}.cpus is {resources.cpus:g} but the Ray cluster has {cpus:g} CPU(s); lower it or add nodes"
        )
    workers = resources.gpus or resources.workers
    if not resources.gpus and workers > cpus:
        problems.append(
            f"{where}.workers is {workers} but the Ray cluster has {cpus:g} CPU(s), one per worker; lower it or add nodes"
        )
    if resources.memory:
        try:
            need = memory_bytes(resources.memory)
        except ValueError as e:
            problems.append(f"{where}.memory: {e}")
        else:
            have = float(cluster_resources.get("memory", 0))
            if need > have:
                problems.append(
                    f"{where}.memory is {resources.memory} ({_gib(need)}) but the Ray cluster has {_gib(have)}; lower it or add nodes"
                )
    return problems


# ---------------------------------------------------------------- running it


class _QueueLog(TrainingLog):
    """Rank 0's on_log hook on a Ray worker: the JSON records go to the driver through a Ray queue (the
    worker may be on another machine than the project's log folder)."""

    def __init__(self, queue: Any, step_name: str):
        super().__init__(Path("unused.jsonl"), step_name, None)  # builds the records; _write ships them, opens no file
        self.queue = queue

    def _write(self, record: dict[str, Any]) -> None:
        self.queue.put(record)


def node_checkpoint_dir(key: str) -> Path:
    """A Ray Train worker's local folder for the checkpoints of step `key` when they live in the artifact store:
    under this node's temp folder (Ray's workers inherit the node's TMPDIR)."""
    return Path(tempfile.gettempdir()) / "kollm-checkpoints" / key


def _train_loop(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs: `fn(job, env)` with this worker's rank, world and device."""
    import ray.train
    import ray.train.torch

    fn, job, queue = config["fn"], config["job"], config["queue"]
    if job.lease is not None:  # a worker group Ray Train restarts for an attempt whose step was published since
        job.lease.check("anything (Ray Train restarted its workers)")
    if job.checkpoint_remote:  # checkpoints live in the artifact store; this node keeps a scratch copy of its own
        job = dataclasses.replace(job, checkpoint_dir=node_checkpoint_dir(job.checkpoint_dir.name))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    log = _QueueLog(queue, job.step) if rank == 0 else None
    env = Env(
        device=device, rank=rank, world=world, on_log=log, log_params=log.log_params if log else (lambda params: None)
    )
    result = fn(job, env)
    if rank == 0:  # the last record: rank 0's result
        queue.put({"event": RESULT_EVENT, "metrics": result.metrics, "meta": result.meta})


def launch_ray(
    fn: Callable[[Job, Env], StepResult],
    job: Job,
    *,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float = 1,
    progress: Progress = _no_progress,
    training_log: TrainingLog | None = None,
    max_failures: int = MAX_FAILURES,
    storage_path: Path | None = None,
) -> StepResult:
    """Run `fn` on `workers` Ray Train workers (one GPU each with `use_gpu`, else CPU over gloo), on the Ray
    instance this process is connected to (`ray.init` first; without it Ray starts a local one).

    Rank 0's log lines are written to the job's JSON log by this process and forwarded to the tracker and
    `progress`; returns rank 0's StepResult. A worker that dies is restarted up to `max_failures` times and
    resumes from the newest checkpoint in `job.checkpoint_dir`."""
    ray = require_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    queue = Queue(actor_options={"num_cpus": 0})
    per_worker: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = 1
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"fn": fn, "job": job, "queue": queue, "threads": max(1, math.floor(cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=f"{job.step}-ray-train",
            storage_path=str(storage_path or job.checkpoint_dir / "ray-train"),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name=f"ray-train-{job.step}", daemon=True)
    thread.start()

    def events() -> Iterator[int]:
        while True:
            done = not thread.is_alive()
            for record in _drain(queue, wait=not done):
                if record.get("event") == RESULT_EVENT:
                    outcome["rank0"] = record
                    continue
                if record.get("event") == "params":
                    if training_log is not None and training_log.tracker is not None:
                        training_log.tracker.log_params(record["params"])
                    continue
                if training_log is not None:
                    training_log._write(record)
                    if record.get("event") == "train_metrics":
                        training_log.forward(record)
                        training_log.show(record)
                if record.get("event") == "train_metrics":
                    yield record["global_step"]
            if done:
                return

    try:
        for _ in progress(
            events(), total=None, description=f"{job.step} (Ray Train, {workers} worker{'s' * (workers > 1)})"
        ):
            pass
        thread.join()
    finally:  # on Ctrl-C too: the workers and the controller end with this driver
        ray.kill(queue.actor)
    if "error" in outcome:
        raise _step_failed(outcome["error"]) from None
    if "rank0" not in outcome:
        raise StepFailed("the Ray Train workers ended without a result")
    return StepResult(metrics=outcome["rank0"]["metrics"], meta=outcome["rank0"]["meta"])


def _drain(queue: Any, *, wait: bool) -> list[dict[str, Any]]:
    """What is in the queue now, waiting up to 0.5 s for a first item when `wait`."""
    from ray.util.queue import Empty

    items = []
    if wait:
        try:
            items.append(queue.get(timeout=0.5))
        except Empty:
            return items
    n = queue.qsize()
    return items + (queue.get_nowait_batch(n) if n else [])


def _step_failed(error: BaseException) -> KollmError:
    """One clear error from a failed fit(): the KollmError a worker raised (a bad config, unreadable data) as it
    is, anything else as StepFailed with the worker's last line."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause = _kollm_cause(failures[rank])
        if cause is not None:
            return cause
    if failures:
        rank = sorted(failures)[0]
        text = str(failures[rank]).strip().splitlines()
        return StepFailed(
            f"a Ray Train worker (rank {rank}) failed: {text[-1] if text else type(failures[rank]).__name__}"
        )
    cause = _kollm_cause(error)
    if cause is not None:
        return cause
    lines = str(error).strip().splitlines()
    return StepFailed(f"Ray Train failed: {lines[-1] if lines else type(error).__name__}")


def _kollm_cause(e: BaseException | None) -> KollmError | None:
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KollmError) and type(e).__module__.startswith("kollm."):
            e.args = (e.message if e.hint is None else f"{e.message}\n  hint: {e.hint}",)
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None
