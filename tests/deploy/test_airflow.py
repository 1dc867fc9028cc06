"""`kollm compile airflow`: the DAG file imports in Apache Airflow 3 with no errors (a real `DagBag` in Airflow's
own environment: its pins clash with kollm's), with one task per step wired as kollm.yaml wires the steps, the
retries and the schedule; and bad options get one clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kollm.deploy.command import SOURCE as STEP_COMMAND
from tests.conftest import TRACKING_VARS
from tests.deploy.conftest import REPO

BIN = Path(sys.executable).parent
AIRFLOW_PYTHON = Path(os.environ.get("KOLLM_AIRFLOW_PYTHON", REPO / ".venv-airflow" / "bin" / "python"))
needs_airflow = pytest.mark.skipif(
    not AIRFLOW_PYTHON.exists(),
    reason=f"no Airflow environment at {AIRFLOW_PYTHON} (python -m venv .venv-airflow && "
    ".venv-airflow/bin/pip install 'apache-airflow>=3,<4', or set KOLLM_AIRFLOW_PYTHON)",
)

DAGBAG = textwrap.dedent("""\
    import json, sys
    from airflow.dag_processing.dagbag import DagBag
    bag = DagBag(dag_folder=sys.argv[1])
    out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": {}}
    for dag_id, dag in bag.dags.items():
        out["dags"][dag_id] = {
            "tasks": {t.task_id: {"upstream": sorted(t.upstream_task_ids), "retries": t.retries,
                                  "pool_slots": t.pool_slots, "exp": t.retry_exponential_backoff}
                      for t in dag.tasks},
            "schedule": getattr(dag.timetable, "expression", None),
        }
    print(json.dumps(out))
""")


def compile_dag(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "kollm"), "compile", "airflow", *args], capture_output=True, text=True, timeout=120, cwd=project
    )


def dagbag(folder: Path, home: Path) -> dict:
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
    }
    r = subprocess.run(
        [str(AIRFLOW_PYTHON), "-c", DAGBAG, str(folder)], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


QUICKSTART_STEPS = {"prepare-corpus", "prepare-sft", "prepare-prefs", "cpt", "sft", "align", "evaluate", "register"}


@needs_airflow
def test_the_dag_imports_in_airflow_with_one_task_per_step(quickstart, tmp_path):
    r = compile_dag(quickstart, "--schedule", "0 3 * * 1", "-o", str(tmp_path / "dags" / "kollm_qs.py"))
    assert r.returncode == 0, r.stderr
    bag = dagbag(tmp_path / "dags", tmp_path / "home")
    assert bag["errors"] == {}
    dag = bag["dags"]["kollm_korean_quickstart"]
    tasks = dag["tasks"]
    assert set(tasks) == QUICKSTART_STEPS
    assert tasks["sft"]["upstream"] == ["cpt", "prepare-sft"]
    assert tasks["register"]["upstream"] == ["align", "evaluate"]
    assert tasks["prepare-corpus"]["upstream"] == []
    assert dag["schedule"] == "0 3 * * 1"
    # retries come from kollm.yaml: give one step two retries and compile again
    cfg = (quickstart / "kollm.yaml").read_text(encoding="utf-8")
    project = tmp_path / "p"
    project.mkdir()
    for item in quickstart.iterdir():
        if item.name != "kollm.yaml" and not item.name.startswith("."):
            (project / item.name).symlink_to(item)
    (project / "kollm.yaml").write_text(
        cfg.replace("  - kind: cpt\n", "  - kind: cpt\n    retries: 2\n    resources: {cpus: 3}\n", 1), encoding="utf-8"
    )
    assert "retries: 2" in (project / "kollm.yaml").read_text(encoding="utf-8")
    r = compile_dag(project, "-o", str(tmp_path / "dags2" / "kollm_qs.py"))
    assert r.returncode == 0, r.stderr
    cpt = dagbag(tmp_path / "dags2", tmp_path / "home")["dags"]["kollm_korean_quickstart"]["tasks"]["cpt"]
    assert cpt["retries"] == 2 and cpt["exp"] is True and cpt["pool_slots"] == 3


def test_the_tasks_run_kollm_step_run_with_explicit_inputs(quickstart, tmp_path):
    r = compile_dag(quickstart, "-o", str(tmp_path / "dag.py"), "--store", "s3://kollm/qs", "--kollm", "/opt/kollm")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "dag.py").read_text(encoding="utf-8")
    compile(text, "dag.py", "exec")  # valid Python
    assert STEP_COMMAND in text  # the one command builder, as the KFP components carry it
    assert 'cmd = step_command(KOLLM, "kollm.yaml", step, inputs, attempt, str(out), STORE)' in text
    assert "KOLLM = ['/opt/kollm']" in text and "STORE = 's3://kollm/qs'" in text
    assert (
        'return run_step(\'sft\', {"data": prepare_sft["outputs"]["dataset"]["uri"], '
        '"model": cpt["outputs"]["model"]["uri"]})' in text
    )


def test_a_bad_schedule_is_one_message(quickstart, tmp_path):
    r = compile_dag(quickstart, "--schedule", "every day", "-o", str(tmp_path / "dag.py"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "schedule" in r.stderr.lower(), r.stderr
    assert not (tmp_path / "dag.py").exists()


def airflow_env(home: Path, dags: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
    }


def _small_quickstart(folder: Path) -> Path:
    """The quickstart cut to its corpus and instructions branch: prepare-corpus -> cpt -> sft <- prepare-sft, with a
    few training steps (a model passed from task to task, as in the whole pipeline, at a fraction of its time)."""
    import yaml

    from kollm.examples import init_project

    project = init_project(folder, "korean-quickstart")
    spec = yaml.safe_load((project / "kollm.yaml").read_text())
    keep = {"prepare-corpus", "prepare-sft", "cpt", "sft"}
    spec["steps"] = [s for s in spec["steps"] if s.get("name", s["kind"]) in keep]
    for s in spec["steps"]:
        if s["kind"] in ("cpt", "sft"):
            s["config"].update(max_steps=4, checkpoint_every=2, warmup_steps=1, log_every=1)
    (project / "kollm.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False))
    return project


def _dags_test_gives_the_digests_of_kollm_run(tmp_path: Path, make_project) -> dict[str, dict]:
    """MAKE_PROJECT(folder) twice: one copy run by `kollm run` (a process started first, which runs beside Airflow),
    the other compiled to a DAG and run by `airflow db migrate` + `airflow dags test` (Airflow 3 on SQLite, no
    scheduler) in its own store. Every task succeeds and every output of every step has the content digest `kollm
    run` gave it. Returns each step's outputs JSON (its task's XCom)."""
    import sqlite3

    import kollm

    assert AIRFLOW_PYTHON.exists(), f"no Airflow environment at {AIRFLOW_PYTHON}: make airflow-env"
    run_project = make_project(tmp_path / "run")
    project = make_project(tmp_path / "af")  # the same files, no cache
    env = {k: v for k, v in os.environ.items() if k not in TRACKING_VARS}  # each project tracks into its own store
    run_log = (tmp_path / "kollm-run.log").open("w")
    kollm_run = subprocess.Popen(
        [sys.executable, "-m", "kollm.cli", "run", "--quiet"], cwd=run_project, env=env, stdout=run_log, stderr=run_log
    )
    try:
        dags, home = tmp_path / "dags", tmp_path / "home"
        kollm_cmd = f"{sys.executable} -m kollm.cli"  # this environment's kollm; Airflow runs in its own
        r = compile_dag(
            project, "-o", str(dags / "kollm_qs.py"), "--store", str(tmp_path / "store"), "--kollm", kollm_cmd
        )
        assert r.returncode == 0, r.stderr
        env = airflow_env(home, dags)
        airflow = str(AIRFLOW_PYTHON.parent / "airflow")
        r = subprocess.run([airflow, "db", "migrate"], capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        r = subprocess.run(
            [airflow, "dags", "test", "kollm_korean_quickstart"], capture_output=True, text=True, timeout=2000, env=env
        )
        assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
        assert kollm_run.wait(timeout=2000) == 0, (tmp_path / "kollm-run.log").read_text()[-5000:]
    finally:
        kollm_run.kill()
        kollm_run.wait()
        run_log.close()
    expected = kollm.run(run_project)  # a fully cached rerun: the digests the `kollm run` above published
    for k in TRACKING_VARS:  # that rerun pointed MLflow at its project
        os.environ.pop(k, None)
    assert all(rec.cache_hit for rec in expected.steps.values())
    with sqlite3.connect(home / "airflow.db") as db:
        states = dict(db.execute("SELECT task_id, state FROM task_instance WHERE dag_id = 'kollm_korean_quickstart'"))
        xcoms = db.execute(
            "SELECT task_id, value FROM xcom WHERE dag_id = 'kollm_korean_quickstart' AND key = 'return_value'"
        ).fetchall()
    assert states == dict.fromkeys(expected.steps, "success"), states
    results = {task: json.loads(value) for task, value in xcoms}  # each task's outputs JSON (its return value)
    assert set(results) == set(expected.steps)
    for name, rec in expected.steps.items():
        assert not results[name]["cache_hit"], name  # computed here, not found in kollm run's store
        got = {o: v["digest"] for o, v in results[name]["outputs"].items()}
        assert got and got == {o: a.digest for o, a in rec.outputs.items()}, name
    return results


@needs_airflow
@pytest.mark.slow(
    reason="`kollm run` of a 4-step pipeline beside `airflow db migrate` and `airflow dags test` starting a `kollm "
    "step run` process per task: 161-390 s on the busy 2-core machine"
)
@pytest.mark.timeout(900)
def test_airflow_dags_test_runs_the_pipeline_with_the_digests_of_kollm_run(tmp_path):
    """A quickstart pipeline of four steps compiled to a DAG and run by `airflow dags test`, with `kollm run`'s
    digests (`make test`; `make test-airflow` runs the whole quickstart)."""
    results = _dags_test_gives_the_digests_of_kollm_run(tmp_path, _small_quickstart)
    assert set(results) == {"prepare-corpus", "prepare-sft", "cpt", "sft"}


# `make test-airflow` (after `make test` in .ci/run) sets this: the whole quickstart under Airflow takes minutes
WHOLE_QUICKSTART = os.environ.get("KOLLM_AIRFLOW_QUICKSTART") == "1"


@pytest.mark.skipif(
    not WHOLE_QUICKSTART,
    reason="the whole quickstart under `airflow dags test` (minutes): `make test-airflow` runs it "
    "(KOLLM_AIRFLOW_QUICKSTART=1)",
)
@pytest.mark.slow(
    reason="the whole quickstart twice: `kollm run` beside `airflow dags test` of its 8 tasks, each a `kollm step "
    "run` process: 477 s at load average 5-11 on 2 cores (191 s of CPU), 1516 s at load 10-37"
)
@pytest.mark.timeout(2400)
def test_airflow_dags_test_runs_the_whole_quickstart_with_the_digests_of_kollm_run(tmp_path):
    """The quickstart as `kollm init --example korean-quickstart` writes it, every step of it a task of the DAG run
    by `airflow dags test`: every output digest equal to `kollm run`'s of the same project."""
    from kollm.examples import init_project

    results = _dags_test_gives_the_digests_of_kollm_run(tmp_path, lambda d: init_project(d, "korean-quickstart"))
    assert list(results) and set(results) == QUICKSTART_STEPS
    assert results["register"]["outputs"] and results["evaluate"]["metrics"], results["evaluate"]
