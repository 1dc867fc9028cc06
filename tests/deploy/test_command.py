"""The one command builder of the compiled orchestrators (`kollm.deploy.command.step_command`): the Airflow DAG and
the KFP components carry its source and build each step's `kollm step run` line with it, and the line it builds
is one `kollm step run` accepts."""

from __future__ import annotations

import json
import subprocess
import sys

from kollm.deploy.command import SOURCE, step_command


def test_the_command_line_of_one_attempt():
    cmd = step_command(
        ["kollm"], "kollm.yaml", "sft", {"model": "s3://b/cpt/1", "data": "s3://b/sft/2"}, 1, "/tmp/o.json", "s3://b"
    )
    assert cmd == [
        *("kollm", "step", "run", "kollm.yaml", "--step", "sft"),
        *("--input", "data=s3://b/sft/2", "--input", "model=s3://b/cpt/1"),
        *("--attempt", "1", "--outputs-json", "/tmp/o.json", "--store", "s3://b"),
    ]
    # an empty URI leaves the input to kollm.yaml's data source; no store: the project's own
    assert step_command(["k"], "c.yaml", "prepare", {"source": ""}, 0, "o.json") == [
        *("k", "step", "run", "c.yaml", "--step", "prepare", "--attempt", "0", "--outputs-json", "o.json")
    ]


def test_the_copied_source_defines_the_same_function_with_builtins_only():
    """What the compiled files carry runs alone, with no import of kollm (Airflow's environment has none)."""
    script = SOURCE + (
        "\nimport json, sys\n"
        "print(json.dumps(step_command(['kollm'], 'kollm.yaml', 'cpt', {'data': 'file:///s/d'}, 2, 'o.json')))\n"
    )
    r = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == step_command(["kollm"], "kollm.yaml", "cpt", {"data": "file:///s/d"}, 2, "o.json")


def test_kollm_step_run_accepts_the_line(quickstart, tmp_path, kollm_bin):
    """The builder's line for the first quickstart step runs under `kollm step run` and writes its outputs JSON."""
    out = tmp_path / "outputs.json"
    cmd = step_command([kollm_bin], "kollm.yaml", "prepare-prefs", {}, 0, str(out), str(tmp_path / "store"))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=quickstart)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert {"dataset", "report"} <= set(result["outputs"]) and result["outputs"]["dataset"]["digest"]
