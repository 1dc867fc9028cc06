"""Training on Ray Train: the cpt training function on 2 Ray Train CPU workers (gloo) matches one process that
sees the same global batches; a worker killed mid-run is restarted and resumes from the last checkpoint with the
same result; a worker's KollmError reaches the driver as the same one message; and what the cluster cannot hold
is reported before anything runs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kollm.config import Resources
from kollm.errors import StepFailed, Superseded
from kollm.pipeline.lease import Lease
from kollm.pipeline.step import Artifact, StepContext
from kollm.steps import cpt
from kollm.train import checkpoint as ckpt
from kollm.train.ray_train import check_fits, launch_ray, memory_bytes
from kollm.train.recipe import Env, Job, TrainingLog
from tests.train.conftest import korean_texts

pytestmark = pytest.mark.timeout(420)


def _job(tmp_path, name: str, batch_size: int, *, max_steps: int = 4, rows: int = 80) -> Job:
    data = tmp_path / f"data-{rows}"
    if not data.exists():
        data.mkdir()
        pd.DataFrame({"text": korean_texts(rows)}).to_parquet(data / "train.parquet")
        pd.DataFrame({"text": korean_texts(8, seed=9)}).to_parquet(data / "eval.parquet")
    config = cpt.Config(
        base_model="scratch",
        vocab_size=400,
        seq_len=48,
        max_steps=max_steps,
        lr=3e-3,
        batch_size=batch_size,
        log_every=1,
        checkpoint_every=2,
    )
    art = Artifact("corpus", data, "sha256:test")
    return Job(
        step=name,
        kind="cpt",
        config=config,
        data=art,
        base_model="scratch",
        base_artifact=None,
        tokenizer_corpus=art,
        output_dir=tmp_path / name / "model",
        checkpoint_dir=tmp_path / name / "ckpt",
        log_file=tmp_path / "logs" / f"{name}.jsonl",
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch 4: the reference the Ray runs are compared with."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("single")
    job = _job(tmp, "single", batch_size=4, max_steps=6)
    return tmp, cpt.train(job, Env(device=torch.device("cpu"), on_log=TrainingLog(job.log_file, job.step, None)))


class Tracker:
    """Records what training forwards to the step's MLflow run."""

    run_id = "test"

    def __init__(self):
        self.metrics: list[tuple[dict, int | None]] = []
        self.params: dict = {}

    def log_metrics(self, metrics, step=None):
        self.metrics.append((metrics, step))

    def log_params(self, params):
        self.params.update(params)

    def log_dataset(self, artifact, name, context):
        pass


def _context(tmp_path, name: str, executor: str, resources: Resources) -> StepContext:
    """A cpt step's context as the runner makes it, with batch 2 per worker."""
    job = _job(tmp_path, name, batch_size=2, max_steps=6)
    return StepContext(
        name=name,
        kind="cpt",
        config=job.config,
        inputs={"data": job.data},
        output_dir=tmp_path / name / "out",
        checkpoint_dir=job.checkpoint_dir,
        project_dir=tmp_path,
        state_dir=tmp_path / ".kollm",
        tracker=Tracker(),
        run_id=None,
        upstream=[],
        resources=resources,
        executor=executor,
    )


def _assert_matches_one_process(ctx: StepContext, result, single) -> None:
    single_dir, reference = single
    assert result.metrics["steps"] == reference.metrics["steps"] == 6
    assert result.metrics["total_tokens"] == reference.metrics["total_tokens"]
    assert result.metrics["train_loss"] == pytest.approx(reference.metrics["train_loss"], rel=1e-4)
    assert result.metrics["eval_loss"] == pytest.approx(reference.metrics["eval_loss"], rel=1e-4)
    assert result.meta == reference.meta
    a = load_file(ctx.output_dir / "model" / "model.safetensors")
    b = load_file(single_dir / "single" / "model" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k
    logs = [json.loads(x) for x in (ctx.state_dir / "logs" / "training" / f"{ctx.name}.jsonl").read_text().splitlines()]
    assert [x["global_step"] for x in logs if "global_step" in x] == [1, 2, 3, 4, 5, 6]  # rank 0 only
    ref_logs = [json.loads(x) for x in (single_dir / "logs" / "single.jsonl").read_text().splitlines()]
    ref_losses = [x["loss"] for x in ref_logs if "loss" in x]
    assert [x["loss"] for x in logs if "global_step" in x] == pytest.approx(ref_losses, rel=1e-4)  # the loss curve
    assert [s for _, s in ctx.tracker.metrics] == [1, 2, 3, 4, 5, 6] and "loss" in ctx.tracker.metrics[0][0]
    assert ctx.tracker.params["train.total_steps"] == 6


def test_two_ray_train_workers_match_one_process(ray_cluster, tmp_path, single):
    """A cpt step with `resources: {workers: 2}` under the ray executor: recipe.execute -> launch_ray."""
    seen: list[int] = []
    ctx = _context(tmp_path, "ray", "ray", Resources(workers=2, cpus=2))
    ctx.progress = lambda it, **kw: (seen.append(x) or x for x in it)
    result = cpt.run(ctx)
    assert seen == [1, 2, 3, 4, 5, 6]  # rank 0's log lines reached this process's progress bar, once each
    _assert_matches_one_process(ctx, result, single)


@pytest.mark.slow(reason="two Ray Train workers with fsdp: about 100 s on a loaded 2-core machine")
def test_fsdp_on_two_ray_train_workers_matches_one_process(ray_cluster, tmp_path, single):
    """`sharding: fsdp` under the ray executor: FSDP2 over Ray Train's process group, the output gathered on rank 0."""
    ctx = _context(tmp_path, "rayfsdp", "ray", Resources(workers=2, cpus=2))
    ctx.config = ctx.config.model_copy(update={"sharding": "fsdp"})
    result = cpt.run(ctx)
    _assert_matches_one_process(ctx, result, single)
    assert list((ctx.checkpoint_dir / "step-00000004" / "dcp").glob("*.distcp"))  # sharded checkpoints


def test_workers_under_the_local_executor_run_gloo_processes(tmp_path, single):
    """The same step with the local executor: `workers: 2` runs 2 processes of this host over gloo (recipe.launch)."""
    ctx = _context(tmp_path, "local2", "local", Resources(workers=2, cpus=2))
    _assert_matches_one_process(ctx, cpt.run(ctx), single)


def crash_once_at_step_3(job: Job, env: Env):
    """cpt.train, but rank 0 dies hard (os._exit) right after logging step 3, once: a checkpoint of step 2 exists."""
    marker = job.checkpoint_dir.parent / "crashed"
    log = env.on_log

    def on_log(entry):
        log(entry)
        if entry.step == 3 and not marker.exists():
            marker.write_text("rank 0 died here")
            os._exit(1)

    if env.rank == 0:
        env.on_log = on_log
    return cpt.train(job, env)


@pytest.mark.slow(reason="a Ray Train worker group, a worker killed and restarted")
def test_a_killed_worker_is_restarted_and_resumes_from_the_checkpoint(ray_cluster, tmp_path, single):
    _, reference = single
    job = _job(tmp_path, "crash", batch_size=2, max_steps=6)
    seen: list[int] = []
    result = launch_ray(
        crash_once_at_step_3,
        job,
        workers=2,
        use_gpu=False,
        progress=lambda it, **kw: (seen.append(x) or x for x in it),
        training_log=TrainingLog(job.log_file, job.step, None),
    )
    assert (tmp_path / "crash" / "crashed").exists()  # it did die
    assert seen == [1, 2, 3, 3, 4, 5, 6]  # the restarted group went on from the step-2 checkpoint
    lineage = json.loads((job.output_dir / "kollm.json").read_text())
    assert lineage["training"]["resumed_from"] == 2
    # and ends where an uninterrupted run ends
    assert result.metrics["steps"] == 6 and result.metrics["total_tokens"] == reference.metrics["total_tokens"]
    assert result.metrics["eval_loss"] == pytest.approx(reference.metrics["eval_loss"], rel=1e-4)


def hang_at_step_3(job: Job, env: Env):
    """cpt.train, but rank 0 stops for good right after logging step 3 (a checkpoint of step 2 exists), and says so."""
    log = env.on_log

    def on_log(entry):
        log(entry)
        if entry.step == 3:
            (job.checkpoint_dir.parent / "at-step-3").write_text("waiting to be killed")
            time.sleep(3600)

    if env.rank == 0:
        env.on_log = on_log
    return cpt.train(job, env)


DRIVER = """
import sys
from pathlib import Path
import ray
ray.init(address=sys.argv[1], log_to_driver=False)
from kollm.train.ray_train import launch_ray
from tests.executors.test_ray_train import _job, hang_at_step_3
launch_ray(hang_at_step_3, _job(Path(sys.argv[2]), "driver", batch_size=2, max_steps=6), workers=2, use_gpu=False)
"""


@pytest.mark.slow(reason="`kollm run` on Ray Train killed mid-training, then resumed")
def test_a_killed_driver_leaves_a_checkpoint_the_next_run_resumes_from(ray_cluster, tmp_path, single):
    """`kill -9` of the driver process (kollm run) mid-training: Ray ends its workers with it, and the next run of the
    same job (same checkpoint folder) resumes from the last checkpoint and ends where an uninterrupted run ends."""
    _, reference = single
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, ray_cluster.address_info["address"], str(tmp_path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = tmp_path / "driver" / "at-step-3"
    try:
        deadline = time.monotonic() + 360
        while not marker.exists():
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the driver never reached step 3"
            time.sleep(0.5)
    finally:
        driver.kill()
        driver.wait(timeout=60)
    job = _job(tmp_path, "driver", batch_size=2, max_steps=6)
    result = launch_ray(cpt.train, job, workers=2, use_gpu=False)
    lineage = json.loads((job.output_dir / "kollm.json").read_text())
    assert lineage["training"]["resumed_from"] == 2
    assert result.metrics["steps"] == 6 and result.metrics["total_tokens"] == reference.metrics["total_tokens"]
    assert result.metrics["eval_loss"] == pytest.approx(reference.metrics["eval_loss"], rel=1e-4)


def published_at_step_3(job: Job, env: Env):
    """cpt.train, but after rank 0 logs step 3 (a checkpoint of step 2 exists) the step's retry publishes the step,
    and the runner removes its checkpoint folder: this attempt's Ray Train run is the one left running."""
    log = env.on_log

    def on_log(entry):
        log(entry)
        if entry.step == 3:
            assert ckpt.list_checkpoints(job.checkpoint_dir)[-1].name == "step-00000002"
            shutil.rmtree(job.checkpoint_dir)

    if env.rank == 0:
        env.on_log = on_log
    return cpt.train(job, env)


def test_a_ray_train_run_left_running_writes_nothing_once_its_step_is_published(ray_cluster, tmp_path):
    """A Ray Train run of an attempt whose step was published meanwhile (kollm.pipeline.lease): it stops at its next
    checkpoint without writing it, writes no model, and the step's checkpoint folder stays without checkpoints; the
    driver gets one message. (One worker and no restart, to keep it cheap: a worker group Ray Train restarts checks
    the lease before training, in ray_train._train_loop.)"""
    job = _job(tmp_path, "left", batch_size=2, max_steps=6)
    job = dataclasses.replace(job, lease=Lease.new(0, job.checkpoint_dir).claim())
    with pytest.raises(Superseded, match="without writing the checkpoint of step 4: its lease"):
        launch_ray(published_at_step_3, job, workers=1, use_gpu=False, max_failures=0)
    assert not job.checkpoint_dir.exists()  # neither a checkpoint nor Ray Train's own files (ray-train/) came back
    assert not job.output_dir.exists()


def test_a_worker_error_reaches_the_driver_as_one_message(ray_cluster, tmp_path):
    job = _job(tmp_path, "empty", batch_size=2, rows=0)  # no text to train the scratch tokenizer on
    with pytest.raises(StepFailed) as err:
        launch_ray(cpt.train, job, workers=1, use_gpu=False, max_failures=0)
    assert (
        str(err.value) == f"the corpus {tmp_path / 'data-0'} has no training rows"
    )  # as cpt.train raised it, no traceback


def test_check_fits_names_what_the_cluster_lacks(ray_cluster):
    import ray

    cluster = ray.cluster_resources()
    assert check_fits(Resources(cpus=2, workers=2), cluster) == []
    problems = check_fits(Resources(gpus=2, cpus=4, memory="100Ti"), cluster, step="sft")
    assert len(problems) == 3
    assert problems[0].startswith("steps.sft.resources.gpus is 2 but the Ray cluster has 0 GPU(s)")
    assert problems[1].startswith("steps.sft.resources.cpus is 4 but the Ray cluster has 2 CPU(s)")
    assert problems[2].startswith("steps.sft.resources.memory is 100Ti (102400.0 GiB) but the Ray cluster has")
    assert check_fits(Resources(workers=3), cluster) == [
        "resources.workers is 3 but the Ray cluster has 2 CPU(s), one per worker; lower it or add nodes"
    ]


def test_check_fits_without_a_cluster():
    cluster = {"CPU": 16.0, "GPU": 8.0, "memory": 64 * 2**30}
    assert check_fits(Resources(gpus=8, cpus=16, memory="64Gi"), cluster) == []
    assert check_fits(Resources(memory="65Gi"), cluster) == [
        "resources.memory is 65Gi (65.0 GiB) but the Ray cluster has 64.0 GiB; lower it or add nodes"
    ]
    assert check_fits(Resources(memory="lots"), cluster) == [
        "resources.memory: not a memory size: 'lots' (write e.g. 8Gi, 512Mi or 16G)"
    ]
    assert (
        memory_bytes("8Gi") == 8 * 2**30 and memory_bytes("512M") == 512 * 10**6 and memory_bytes("2GiB") == 2 * 2**30
    )


def test_resources_workers_and_gpus_are_exclusive():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="drop workers or set gpus: 0"):
        Resources(workers=2, gpus=1)
    assert Resources(workers=4).workers == 4 and Resources().workers == 1


def test_without_ray_installed_the_error_names_the_extra():
    code = "import sys; sys.modules['ray'] = None\nfrom kollm.train.ray_train import require_ray\nrequire_ray()"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "kollm.errors.KollmError: the ray executor needs Ray, which is not installed here: pip install 'kollm[ray]'"
    )
