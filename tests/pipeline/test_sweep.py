"""`sweep:` on a training step: trials as Ray Tune function trainables (ASHA stops weak ones from the loss the
training loop reports), each trial cached under its own key and a nested MLflow run; the best trial's model is the
step's output that evaluate receives; a rerun is fully cached. Config errors name the YAML path."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

import kollm
from kollm.config import SweepSpec
from kollm.errors import ConfigError
from kollm.pipeline.sweep import sample_trials

PROJECT = """\
project: sweeptest
data:
  corpus: {{path: data/corpus.txt}}
steps:
  - kind: prepare
    name: prep
    config: {{dataset: corpus, txt_mode: paragraph, split: {{eval_fraction: 0.2}}, filters: {{min_chars: 20}}}}
  - kind: cpt
    config: {{base_model: scratch, preset: tiny, vocab_size: 300, seq_len: 32, max_steps: 16, batch_size: 2, log_every: 2, checkpoint_every: 0}}
    sweep: {sweep}
  - kind: evaluate
    config: {{gate: ["perplexity <= 1000000"]}}
"""
SWEEP = (
    "{params: {lr: {grid: [3.0e-3, 1.0e-5, 1.0e-2, 1.0e-6]}, warmup_steps: {choice: [0]}}, metric: eval_loss, mode: min, "
    "samples: 1, scheduler: asha, grace_period: 1, reduction_factor: 2, max_concurrent: 2}"
)


def make_project(root: Path, sweep: str = SWEEP) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    syl = "가나다라마바사아자차카타파하서울부산한국어문장입니다오늘날씨좋네요학교공부책"
    docs = [" ".join("".join(rng.choice(syl) for _ in range(rng.randint(2, 4))) for _ in range(12)) for _ in range(40)]
    (root / "data" / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")
    (root / "kollm.yaml").write_text(PROJECT.format(sweep=sweep), encoding="utf-8")
    return root


def test_sweep_config_errors_name_the_yaml_path(tmp_path):
    bad = (
        "{params: {lr: {loguniform: [0.0, 1.0e-3]}, lora.r: {choice: [8]}, nope: {choice: []}, batch_size: {uniform: [4, 2]}, "
        "max_steps: {choice: [-3]}}, metric: accuracy}"
    )
    with pytest.raises(ConfigError) as e:
        kollm.run(make_project(tmp_path / "p", bad))
    text = str(e.value)
    assert "steps[1].sweep.params.lr" in text and "> 0" in text
    assert "choice is empty" in text and "low bound must be below" in text
    root = make_project(
        tmp_path / "q", "{params: {lora.rr: {choice: [8]}, max_steps: {choice: [-3]}}, metric: accuracy}"
    )
    with pytest.raises(ConfigError) as e:
        kollm.run(root)
    text = str(e.value)
    assert "steps[1].sweep.params.lora.rr: the cpt step's config has no setting 'lora.rr'" in text
    assert "steps[1].sweep.params.max_steps: the value -3 is not valid" in text
    assert "steps[1].sweep.metric: 'accuracy' is not a metric" in text


def test_trials_are_drawn_deterministically():
    spec = SweepSpec.model_validate(
        {
            "params": {"lr": {"loguniform": [1e-4, 3e-3]}, "lora.r": {"choice": [8, 16]}, "x": {"grid": [1, 2]}},
            "samples": 3,
            "seed": 7,
        }
    )
    trials = sample_trials(spec)
    assert len(trials) == 6 and trials == sample_trials(spec)
    assert all(1e-4 <= t["lr"] <= 3e-3 and t["lora.r"] in (8, 16) for t in trials) and sorted(
        t["x"] for t in trials
    ) == [1, 1, 1, 2, 2, 2]


@pytest.mark.slow(reason="four Ray Tune trials, a cached rerun and two `kollm show` processes")
def test_sweep_asha_best_model_to_evaluate_and_cached_rerun(tmp_path, ray_cluster, kollm_bin):
    root = make_project(tmp_path / "p")
    first = kollm.run(root)
    cpt = first.steps["cpt"]
    manifest = json.loads((cpt.outputs["model"].path.parent / "step.json").read_text())
    trials = manifest["sweep"]["trials"]
    assert len(trials) == 4
    statuses = [t["status"] for t in trials]
    assert statuses.count("stopped") >= 1, trials  # ASHA stopped a weak trial early
    assert "failed" not in statuses
    finished = [t for t in trials if t["status"] == "finished"]
    best = manifest["sweep"]["best"]
    assert best["metric"] == min(t["metric"] for t in finished) == cpt.metrics["eval_loss"]
    assert trials[0]["trial"] == best["trial"]  # the table is sorted by the metric
    store = root / ".kollm" / "steps"
    for t in trials:  # a finished trial is published under its own key; a stopped one never is
        assert (store / t["key"] / "step.json").exists() == (t["status"] == "finished")
    best_out = json.loads((store / best["key"] / "step.json").read_text())["outputs"]["model"]["digest"]
    assert cpt.outputs["model"].digest == best_out
    ev = json.loads((first.steps["evaluate"].outputs["metrics"].path.parent / "step.json").read_text())
    assert ev["inputs"]["model"]["digest"] == best_out and ev["inputs"]["model"]["key"] == best["key"]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/.kollm/mlflow.db")
    step_run = client.get_run(cpt.run_id)
    assert json.loads(step_run.data.tags["kollm.sweep.best_config"])["lr"] == best["values"]["lr"]
    children = client.search_runs(
        [step_run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{cpt.run_id}'"
    )
    by_id = {c.info.run_id: c for c in children}
    for t in trials:  # each trial is a nested run under the step's run; a stopped one ended KILLED
        assert t["run_id"] in by_id
        assert by_id[t["run_id"]].info.status == ("FINISHED" if t["status"] == "finished" else "KILLED")

    again = kollm.run(root)
    assert all(r.cache_hit for r in again.steps.values())
    assert again.steps["cpt"].outputs["model"].digest == best_out
    # `kollm show --json` lists the sweep's trials, sorted by the metric (the cached run's step shows them too)
    proc = subprocess.run(
        [kollm_bin, "show", again.run_id, "--json", "--path", str(root)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    shown = {s["name"]: s for s in json.loads(proc.stdout)["steps"]}
    listed = shown["cpt"]["trials"]
    assert [t["key"] for t in listed] == [t["key"] for t in trials]
    done = [t["metric"] for t in listed if t["status"] == "finished"]
    assert done == sorted(done) and shown["cpt"]["sweep_metric"] == "eval_loss (min)"
    table = subprocess.run(
        [kollm_bin, "show", again.run_id, "--path", str(root)], capture_output=True, text=True, timeout=300
    ).stdout
    assert "sweep of cpt: 4 trials by eval_loss (min)" in table and "stopped" in table


@pytest.mark.slow(reason="`kollm run` with its own Ray instance, killed, then resumed")
def test_a_sweep_killed_midway_resumes_without_redoing_finished_trials(tmp_path, ray_cluster, kollm_bin):
    """`kollm run` (its own process and Ray instance) is SIGKILLed once a trial has been published; the rerun takes
    the finished trials from the cache, runs the others, and ends with the same sweep as an uninterrupted one."""
    import os
    import signal
    import time

    sweep = "{params: {lr: {grid: [3.0e-3, 1.0e-3, 1.0e-2]}}, metric: eval_loss, mode: min, samples: 1, scheduler: none, max_concurrent: 1}"
    root = make_project(tmp_path / "p", sweep=sweep)
    steps = root / ".kollm" / "steps"

    def trials_published() -> set[str]:
        found = set()
        for f in steps.glob("*/step.json") if steps.exists() else []:
            try:
                doc = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if doc.get("kind") == "cpt" and "sweep" not in doc:  # a trial's own result, not the sweep's
                found.add(f.parent.name)
        return found

    proc = subprocess.Popen(
        [kollm_bin, "run", "--quiet"],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    try:
        while not trials_published():
            assert proc.poll() is None, f"kollm run ended before any trial finished: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no trial finished within 600 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner, its Ray instance and the trial at work
        proc.wait(timeout=60)
    before = trials_published()
    assert 1 <= len(before) < 3

    resumed = kollm.run(root)
    rows = json.loads((resumed.steps["cpt"].outputs["model"].path.parent / "step.json").read_text())["sweep"]["trials"]
    assert len(rows) == 3 and all(t["status"] == "finished" for t in rows)
    assert {t["key"] for t in rows if t["cached"]} == before  # finished trials were not redone
    assert resumed.steps["evaluate"].outputs["metrics"].digest


@pytest.mark.slow(reason="a sweep's trials as Ray Tune trials under the ray executor")
def test_a_sweep_under_the_ray_executor_runs_its_trials_on_the_cluster(tmp_path, ray_cluster):
    """`kollm run --executor ray` (on the Ray instance this process is connected to): the sweep step runs as a Ray task
    and its trials as Ray Tune trials on the same cluster; the best trial's model goes downstream, as with the local
    executor."""
    sweep = "{params: {lr: {grid: [3.0e-3, 1.0e-2]}}, metric: eval_loss, mode: min, samples: 1, scheduler: none, max_concurrent: 1}"
    root = make_project(tmp_path / "p", sweep=sweep)
    result = kollm.run(root, executor="ray")
    manifest = json.loads((result.steps["cpt"].outputs["model"].path.parent / "step.json").read_text())
    rows, best = manifest["sweep"]["trials"], manifest["sweep"]["best"]
    assert len(rows) == 2 and all(t["status"] == "finished" for t in rows)
    assert best["metric"] == min(t["metric"] for t in rows) == result.steps["cpt"].metrics["eval_loss"]
    ev = json.loads((result.steps["evaluate"].outputs["metrics"].path.parent / "step.json").read_text())
    assert ev["inputs"]["model"]["key"] == best["key"]
