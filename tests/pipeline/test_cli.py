"""The CLI through subprocess: run, runs, show, step run, and a real kill -9 in the middle of a step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from mlflow import MlflowClient

from .helpers import calls, make_project


def kollm(kollm_bin, *args, env=None, cwd=None, check=True):
    proc = subprocess.run([kollm_bin, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_kill_9_then_resume(tmp_path, kollm_bin):
    root = make_project(tmp_path / "p")
    marker = tmp_path / "marker"
    env = {**os.environ, "KOLLM_TEST_MARKER": str(marker), "KOLLM_TEST_SLOW_STEP": "count"}
    proc = subprocess.Popen(
        [kollm_bin, "run", str(root), "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "step never started"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # the child process running `count` dies with the runner
    finished = {json.loads((p / "step.json").read_text())["name"] for p in (root / ".kollm" / "steps").iterdir()}
    assert "count" not in finished and "corpus" in finished  # `count` was killed mid-way
    before = calls(root)
    assert before[0] == "make_corpus" and "count:count" not in before

    out = kollm(kollm_bin, "run", str(root), "--quiet").stdout.strip()
    # nothing that finished is computed twice: the resumed run does `count`, and `count2` only if the kill caught
    # it too (it runs beside `count` and may or may not have finished by then)
    rerun = ["count:count"] + ([] if "count2" in finished else ["count:count2"])
    assert sorted(calls(root)[len(before) :]) == rerun
    assert len(list((root / ".kollm" / "steps").iterdir())) == 3
    assert not (root / ".kollm" / "tmp").exists() or not any((root / ".kollm" / "tmp").iterdir())
    for manifest in (root / ".kollm" / "steps").glob("*/step.json"):
        json.loads(manifest.read_text())  # complete, valid manifests only

    client = MlflowClient(tracking_uri=f"sqlite:///{root.resolve()}/.kollm/mlflow.db")
    exp = client.get_experiment_by_name("testproj")
    statuses = sorted(r.info.status for r in client.search_runs([exp.experiment_id], "tags.`kollm.pipeline` = 'true'"))
    assert statuses == ["FINISHED", "KILLED"]  # the killed run is not left RUNNING forever
    assert client.get_run(out).info.status == "FINISHED"


def test_run_runs_show_and_step_run(tmp_path, kollm_bin):
    root = make_project(tmp_path / "p")
    first = kollm(kollm_bin, "run", "--quiet", cwd=root).stdout.strip()
    second = kollm(kollm_bin, "run", cwd=root)
    assert "3 cached" in second.stderr and "✓ count (cached" in second.stderr
    listing = kollm(kollm_bin, "runs", cwd=root).stdout
    assert first[:8] in listing and "FINISHED" in listing
    shown = kollm(kollm_bin, "show", first[:10], "--path", str(root)).stdout
    assert "corpus" in shown and "count2" in shown and "miss" in shown
    step = json.loads(kollm(kollm_bin, "step", "run", str(root), "--step", "count", "--force").stdout)
    assert step["cache_hit"] is False and step["outputs"]["m"]["type"] == "metrics"
    missing = kollm(kollm_bin, "show", "ffffffff", "--path", str(root), check=False)
    assert missing.returncode == 4 and "no run matching 'ffffffff'" in missing.stderr


def test_validate_json_and_singular_step_count(tmp_path, kollm_bin):
    """`validate --json` gives the wiring to scripts; a one-step pipeline is "1 step", not "1 steps"."""
    one = make_project(
        tmp_path / "one",
        steps_yaml="- kind: python\n  name: corpus\n  inputs: {src: raw}\n"
        '  config: {callable: "mysteps:make_corpus", inputs: {src: source}, outputs: {data: corpus}}\n',
    )
    env = {**os.environ, "COLUMNS": "120"}
    r = subprocess.run([kollm_bin, "validate", str(one)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "testproj: 1 step" in r.stdout and "1 steps" not in r.stdout
    r = subprocess.run(
        [kollm_bin, "validate", str(make_project(tmp_path / "three")), "--json"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["project"] == "testproj" and [s["name"] for s in doc["steps"]] == ["corpus", "count", "count2"]
    assert doc["steps"][1]["outputs"] == {"m": "metrics"} and doc["steps"][0]["kind"] == "python"
    assert set(doc["steps"][1]["inputs"]) == {"data"}
