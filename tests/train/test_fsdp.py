"""`sharding: fsdp` on CPU: FSDP2 over 2 gloo processes (and over a process group of one) trains the cpt step like
ddp and like one process, with LoRA too; a run killed with kill -9 resumes from its sharded checkpoint on another
number of processes (2 -> 1 and 1 -> 2); the gathered output folder loads with AutoModelForCausalLM.

Every run is the tiny scratch model on the same corpus, 20 optimizer steps of the same global batches (4 rows of
48 tokens: batch_size 2 x 2 processes, or 2 micro-batches of 2 on one), at a constant learning rate (so that a run
stopped early has the same schedule). Tolerance: per-step losses within 1e-4 relative, weights within 2e-4 absolute
(only the order of floating-point sums differs between the runs).

Starting a process costs seconds (torch and transformers import), so the 2-process runs share one launch
(`_run_jobs`), and the two killed runs run side by side.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from kollm.pipeline.step import Artifact
from kollm.steps import cpt
from kollm.train.config import LoraSettings
from kollm.train.recipe import Env, Job, TrainingLog, launch
from kollm.train.sharding import process_group

STEPS = 20
REL = 1e-4
ATOL = 2e-4
pytestmark = pytest.mark.slow(reason="training processes: about 2 minutes on an idle 2-core machine")


def _job(root: Path, data: Path, name: str, *, sharding: str, lora: bool = False, max_steps: int = STEPS) -> Job:
    config = cpt.Config(
        base_model="scratch",
        vocab_size=400,
        seq_len=48,
        batch_size=2,
        tokens_per_step=192,  # 4 rows a step: 2 processes x 1 micro-batch, or 1 x 2
        max_steps=max_steps,
        lr=3e-3,
        min_lr_ratio=1.0,
        log_every=1,
        checkpoint_every=10,
        sharding=sharding,
        lora=LoraSettings(r=4, merge=True) if lora else None,  # scratch: no base for an adapter to name
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
        output_dir=root / name / "model",
        checkpoint_dir=root / name / "ckpt",
        log_file=root / "logs" / f"{name}.jsonl",
    )


def _run_jobs(jobs: list[Job], job: Job, env: Env):  # noqa: ANN202 - launch's fn, on every rank
    """Several training jobs, one after the other, in the same processes (one process start for all)."""
    result = None
    for j in jobs:
        log = TrainingLog(j.log_file, j.step, None) if env.is_main else None
        result = cpt.train(j, dataclasses.replace(env, on_log=log))
    return result


def _one_process(job: Job):  # noqa: ANN202
    env = Env(device=torch.device("cpu"), on_log=TrainingLog(job.log_file, job.step, None))
    if job.config.sharding == "fsdp":
        with process_group(env.device):
            return cpt.train(job, env)
    return cpt.train(job, env)


def _losses(root: Path, name: str) -> dict[int, float]:
    """Step -> loss from the job's training log (the last line for a step, if a resumed run logged it again)."""
    lines = (root / "logs" / f"{name}.jsonl").read_text().splitlines()
    return {r["global_step"]: r["loss"] for r in map(json.loads, lines) if r.get("event") == "train_metrics"}


KILLED = """
import sys, torch
sys.path[:0] = {path!r}
from kollm.steps import cpt
from kollm.train.recipe import Env, launch
import test_fsdp
if __name__ == "__main__":
    job = test_fsdp._job(*map(__import__("pathlib").Path, sys.argv[1:3]), sys.argv[3], sharding="fsdp", max_steps=1000)
    if sys.argv[4] == "2":
        launch(cpt.train, job, world=2, backend="gloo")
    else:
        test_fsdp._one_process(job)
"""


def _start_killed(root: Path, data: Path, name: str, world: int) -> subprocess.Popen:
    """A 1000-step run of `name` in its own process group, to be killed once it has checkpointed step 10."""
    script = KILLED.format(path=[str(Path(__file__).parent), *sys.path])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", script, str(root), str(data), name, str(world)],
        start_new_session=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _kill_after_step_10(procs: dict[str, subprocess.Popen], root: Path) -> None:
    """kill -9 each run (all its processes) as soon as it has logged step 10 (and so checkpointed it)."""
    deadline = time.monotonic() + 600
    running = dict(procs)
    while running and time.monotonic() < deadline:
        for name, proc in list(running.items()):
            log = root / "logs" / f"{name}.jsonl"
            if log.exists() and 10 in _losses(root, name):  # the loop checkpoints a step before it logs it
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                del running[name]
            elif proc.poll() is not None:
                raise AssertionError(f"{name} ended before step 10: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    assert not running, f"no step 10 within 10 minutes: {list(running)}"
    for name in procs:
        ckpt = root / name / "ckpt"
        assert (ckpt / "step-00000010" / "dcp" / ".metadata").exists()
        # the kill lands a step or more after step 10, depending on the machine's load: resume from step 10
        for later in ckpt.glob("step-*"):
            if later.name != "step-00000010":
                shutil.rmtree(later)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, texts):
    root = tmp_path_factory.mktemp("fsdp")
    data = root / "data"
    data.mkdir()
    pd.DataFrame({"text": texts(240)}).to_parquet(data / "train.parquet")  # ~100 rows: 20 steps in one epoch
    pd.DataFrame({"text": texts(8, seed=9)}).to_parquet(data / "eval.parquet")
    job = functools.partial(_job, root, data)
    _kill_after_step_10(
        {"2to1": _start_killed(root, data, "2to1", 2), "1to2": _start_killed(root, data, "1to2", 1)}, root
    )
    one = {
        "one_ddp": _one_process(job("one_ddp", sharding="ddp")),
        "one_fsdp": _one_process(job("one_fsdp", sharding="fsdp")),
        "one_lora": _one_process(job("one_lora", sharding="ddp", lora=True)),
    }
    resumed_2to1 = _one_process(job("2to1", sharding="fsdp"))
    two = [
        job("two_ddp", sharding="ddp"),
        job("two_fsdp", sharding="fsdp"),
        job("two_fsdp_lora", sharding="fsdp", lora=True),
        job("1to2", sharding="fsdp"),
    ]
    started = time.monotonic()
    launch(functools.partial(_run_jobs, two), two[0], world=2, backend="gloo")
    print(f"4 jobs on 2 processes: {time.monotonic() - started:.1f} s")
    return {"root": root, "one": one, "resumed_2to1": resumed_2to1}


def _close(a: dict[int, float], b: dict[int, float], steps: range) -> None:
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=REL), f"step {s}: {a[s]} vs {b[s]}"


def test_fsdp_losses_equal_ddp_and_one_process(runs):
    root = runs["root"]
    one, ddp, fsdp, fsdp1 = (_losses(root, n) for n in ("one_ddp", "two_ddp", "two_fsdp", "one_fsdp"))
    assert sorted(fsdp) == list(range(1, STEPS + 1))
    _close(fsdp, ddp, range(1, STEPS + 1))
    _close(fsdp, one, range(1, STEPS + 1))
    _close(fsdp1, one, range(1, STEPS + 1))  # fsdp over a process group of one
    assert fsdp[STEPS] < fsdp[1] - 0.5  # it learns


def test_fsdp_with_lora_equals_one_process(runs):
    root = runs["root"]
    lora, one = _losses(root, "two_fsdp_lora"), _losses(root, "one_lora")
    _close(lora, one, range(1, STEPS + 1))
    assert lora[STEPS] < lora[1]
    adapter = root / "two_fsdp_lora" / "model" / "adapter" / "adapter_model.safetensors"
    assert adapter.exists()


@pytest.mark.parametrize("name", ["2to1", "1to2"])
def test_killed_run_resumes_on_another_number_of_processes(runs, name):
    root = runs["root"]
    losses, reference = _losses(root, name), _losses(root, "one_ddp")
    _close(losses, reference, range(1, STEPS + 1))  # steps 1-10 before the kill, 11-20 after it
    kollm_json = json.loads((root / name / "model" / "kollm.json").read_text())
    assert kollm_json["training"]["resumed_from"] == 10
    if name == "2to1":
        assert runs["resumed_2to1"].metrics["steps"] == STEPS


def test_gathered_folder_loads_and_equals_one_process(runs):
    from transformers import AutoModelForCausalLM

    root = runs["root"]
    fsdp = AutoModelForCausalLM.from_pretrained(root / "two_fsdp" / "model")
    one = AutoModelForCausalLM.from_pretrained(root / "one_ddp" / "model")
    a, b = dict(fsdp.named_parameters()), dict(one.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=ATOL), k
    assert json.loads((root / "two_fsdp" / "model" / "kollm.json").read_text())["config"]["sharding"] == "fsdp"
    files = {p.name for p in (root / "two_fsdp" / "model").iterdir()}
    assert {"model.safetensors", "tokenizer.json", "config.json", "kollm.json"} <= files


def test_the_lora_folder_is_merged(runs):
    """fsdp + LoRA gathers base and adapters, merges, and writes a plain folder like the 1-process LoRA run's."""
    from transformers import AutoModelForCausalLM

    root = runs["root"]
    a = dict(AutoModelForCausalLM.from_pretrained(root / "two_fsdp_lora" / "model").named_parameters())
    b = dict(AutoModelForCausalLM.from_pretrained(root / "one_lora" / "model").named_parameters())
    for k in a:
        assert torch.allclose(a[k], b[k], atol=ATOL), k
