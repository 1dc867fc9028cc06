"""The command line as a user meets it: --version, Ctrl-C during `kollm run`, --json on runs/show, 80-column
tables, and the run's closing summary line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from kollm._version import __version__
from kollm.pipeline.step import Artifact, StepRecord

from tests.pipeline.helpers import make_project


def _kollm(kollm_bin, *args, cwd=None, env=None):
    return subprocess.run([kollm_bin, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_version(kollm_bin):
    proc = _kollm(kollm_bin, "--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"kollm {__version__}"


def test_ctrl_c_during_run_says_how_to_resume(tmp_path, kollm_bin):
    root = make_project(tmp_path / "p")
    marker = tmp_path / "marker"
    env = {**os.environ, "KOLLM_TEST_MARKER": str(marker), "KOLLM_TEST_SLOW_STEP": "count"}
    proc = subprocess.Popen(
        [kollm_bin, "run"], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "the slow step never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "kollm run" in stderr and "resume" in stderr
    assert "Traceback" not in stderr


def test_runs_and_show_json_and_80_column_tables(tmp_path, kollm_bin):
    root = make_project(tmp_path / "p")
    run = _kollm(kollm_bin, "run", cwd=root)
    assert run.returncode == 0, run.stderr
    runs = json.loads(_kollm(kollm_bin, "runs", "--json", cwd=root).stdout)
    assert len(runs) == 1 and runs[0]["status"] == "FINISHED" and runs[0]["steps"] == 3
    run_id = runs[0]["run_id"]
    shown = json.loads(_kollm(kollm_bin, "show", "latest", "--json", cwd=root).stdout)
    assert shown["run"]["run_id"] == run_id and sorted(s["name"] for s in shown["steps"]) == [
        "corpus",
        "count",
        "count2",
    ]
    assert all(len(s["key"]) == 32 for s in shown["steps"])  # full keys (tables cut them)

    env = {**os.environ, "COLUMNS": "80"}
    for args in (["runs"], ["show", "latest"]):
        text = _kollm(kollm_bin, *args, cwd=root, env=env).stdout
        lines = text.splitlines()
        assert lines and max(len(line) for line in lines) <= 80, text
        assert "…" in text  # ids shortened with an ellipsis, not folded over several lines
    table = _kollm(kollm_bin, "runs", cwd=root, env=env).stdout
    assert run_id not in table and run_id[:6] in table


def _record(name: str, kind: str, metrics: dict, meta: dict | None = None) -> StepRecord:
    outputs = {"registration": Artifact("report", Path("."), "sha256:0", meta)} if meta else {}
    return StepRecord(name, kind, "k", None, False, outputs, metrics)


def test_run_summary_names_the_gate_verdict_and_the_registered_version():
    from kollm.cli import run_summary

    records = [
        _record("sft", "sft", {"loss": 1.0}),
        _record("evaluate", "evaluate", {"perplexity": 12.0, "gate_passed": 1.0}),
        _record(
            "register",
            "register",
            {"registered_version": 3.0},
            {"name": "demo", "version": "3", "uri": "models:/demo@challenger"},
        ),
    ]
    assert (
        run_summary(records) == "evaluate: gate passed; register: registered demo version 3 as models:/demo@challenger"
    )
    assert run_summary([_record("evaluate", "evaluate", {"perplexity": 12.0})]) == "evaluate: no gate"
    assert run_summary([_record("sft", "sft", {})]) == ""


def test_validate_names_an_unreachable_hub_model_offline(tmp_path, kollm_bin):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_helpers_cli", Path(__file__).parent / "steps" / "test_sft.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    cpt = "- kind: cpt\n  config: {base_model: no-such-org/no-such-model, seq_len: 64, max_steps: 2}\n"
    root = helpers.make_project(tmp_path / "p", cpt)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    proc = _kollm(kollm_bin, "validate", str(root), env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert (
        "no-such-org/no-such-model" in proc.stderr
        and "HF_HUB_OFFLINE" in proc.stderr
        and "base_model: scratch" in proc.stderr
    )

    (root / "kollm.yaml").write_text((root / "kollm.yaml").read_text().replace("no-such-org/no-such-model", "scratch"))
    assert _kollm(kollm_bin, "validate", str(root), env=env).returncode == 0


def test_validate_checks_gate_metric_names(tmp_path, kollm_bin):
    root = tmp_path / "q"
    assert _kollm(kollm_bin, "init", str(root)).returncode == 0
    assert _kollm(kollm_bin, "validate", str(root)).returncode == 0
    yaml_file = root / "kollm.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("- regex >= 0.8", "- bleu_score >= 0.5"))
    proc = _kollm(kollm_bin, "validate", str(root))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "bleu_score" in proc.stderr and "does not produce" in proc.stderr and "chrf" in proc.stderr


def test_runs_and_show_json_carry_numbers_full_ids_and_zoned_times(tmp_path, kollm_bin):
    """Found: metrics were one string cut at 200 characters, durations strings ("0.00s"), `started` had no time zone,
    keys were cut to 12 characters."""
    from datetime import datetime

    root = make_project(tmp_path / "p")
    assert _kollm(kollm_bin, "run", cwd=root).returncode == 0
    (run,) = json.loads(_kollm(kollm_bin, "runs", "--json", cwd=root).stdout)
    assert len(run["run_id"]) == 32 and isinstance(run["duration_s"], float) and run["duration_s"] >= 0
    started = datetime.fromisoformat(run["started"])
    assert started.tzinfo is not None and datetime.fromisoformat(run["ended"]) >= started
    shown = json.loads(_kollm(kollm_bin, "show", "latest", "--json", cwd=root).stdout)
    assert shown["run"] == run
    count = next(s for s in shown["steps"] if s["name"] == "count")
    assert count["cache_hit"] is False and isinstance(count["duration_s"], float) and len(count["run_id"]) == 32
    assert count["metrics"] and all(isinstance(v, (int, float)) for v in count["metrics"].values())
    assert (
        set(count["outputs"]) == {"m"}
        and count["outputs"]["m"].startswith("sha256:")
        and len(count["outputs"]["m"]) == 71
    )


def test_a_finished_training_step_names_its_loss_and_the_checkpoint_it_resumed_from():
    from kollm.cli import finished_note
    from kollm.train.loop import TrainResult
    from kollm.train.recipe import step_metrics

    resumed = step_metrics(TrainResult(steps=60, losses=[3.0, 2.5], tokens=100, seconds=1.0, resumed_from=40), None)
    assert resumed["resumed_from_step"] == 40.0
    assert finished_note({"duration_s": 74.24, "metrics": resumed}) == (
        "74.2s, loss 2.5, resumed from the checkpoint at step 40"
    )
    fresh = step_metrics(TrainResult(steps=60, losses=[3.0], tokens=100, seconds=1.0, resumed_from=None), None)
    assert "resumed_from_step" not in fresh
    assert finished_note({"duration_s": 1.0, "metrics": fresh}) == "1.0s, loss 3"
    assert finished_note({"duration_s": 0.5, "metrics": {"rows": 3.0}}) == "0.5s"  # not a training step
