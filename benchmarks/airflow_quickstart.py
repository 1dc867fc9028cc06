"""Where the time of the whole quickstart under `airflow dags test` goes, against `kollm run` of the same project.

    .venv/bin/python benchmarks/airflow_quickstart.py [--airflow .venv-airflow/bin/airflow] [--dir /tmp]
        [--out benchmarks/results/airflow_quickstart.json]

Runs `kollm run` of a fresh quickstart (each step's own time from the runner's log), then the same project compiled
with `kollm compile airflow` in a second folder and run by `airflow db migrate` + `airflow dags test` (Airflow on
SQLite, no scheduler). Each task's `kollm step run` goes through a wrapper that records its process's wall time, so
every task's time splits into:

  - airflow: the task's time in Airflow (task_instance end - start) less its `kollm step run` process;
  - process: the `kollm step run` process less the step itself (interpreter start, imports, loading kollm.yaml,
    MLflow run set-up and ending, artifact publish bookkeeping outside the step's timer);
  - step: the step's own time (`step_finished` duration_s in the runner's log: the same timer `kollm run` reports);

plus what is outside any task (DAG parsing, scheduling in-process, `dags test` start-up). Checks that every output
digest equals `kollm run`'s. Deletes its work folder at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

WRAPPER = """#!/bin/sh
# the step's name follows --step; one line per process: STEP START END (epoch seconds)
step=""; prev=""
for a in "$@"; do [ "$prev" = "--step" ] && step="$a"; prev="$a"; done
s=$(date +%s.%N)
"$@"; rc=$?
echo "$step $s $(date +%s.%N)" >> "$(dirname "$0")/process-times"
exit $rc
"""


def step_durations(project: Path) -> dict[str, float]:
    """Each finished step's duration_s from the runner's logs of the project."""
    out: dict[str, float] = {}
    for f in (project / ".kollm" / "logs" / "system").glob("*.jsonl"):
        for line in f.read_text(encoding="utf-8").splitlines():
            e = json.loads(line)
            if e.get("event") == "step_finished":
                out[e["step"]] = e["duration_s"]
    return out


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace(" ", "T")).timestamp()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--airflow", default=str(REPO / ".venv-airflow" / "bin" / "airflow"))
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--config", default=None, help="a kollm.yaml to use instead of the quickstart's own")
    args = ap.parse_args()

    import kollm
    from kollm.examples import init_project

    work = Path(tempfile.mkdtemp(prefix="kollm-af-bench-", dir=args.dir))
    try:
        run_project = init_project(work / "run", "korean-quickstart")
        af_project = init_project(work / "af", "korean-quickstart")
        if args.config:
            for p in (run_project, af_project):
                shutil.copy(args.config, p / "kollm.yaml")
        t0 = time.perf_counter()
        expected = kollm.run(run_project)
        run_wall = time.perf_counter() - t0
        run_steps = step_durations(run_project)
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "KOLLM_SET_TRACKING_URI"):
            os.environ.pop(k, None)

        dags, home, store = work / "dags", work / "home", work / "store"
        home.mkdir()
        wrapper = home / "timed-kollm"
        wrapper.write_text(WRAPPER, encoding="utf-8")
        wrapper.chmod(0o755)
        kollm_cmd = f"{wrapper} {sys.executable} -m kollm.cli"
        subprocess.run(
            [sys.executable, "-m", "kollm.cli", "compile", "airflow", "-o", str(dags / "kollm_qs.py"), "--store",
             str(store), "--kollm", kollm_cmd],
            check=True, cwd=af_project,
        )  # fmt: skip
        env = {
            **os.environ,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        }
        t0 = time.perf_counter()
        subprocess.run([args.airflow, "db", "migrate"], check=True, env=env, capture_output=True)
        migrate_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = subprocess.run([args.airflow, "dags", "test", "kollm_korean_quickstart"], env=env, capture_output=True)
        dags_test_wall = time.perf_counter() - t0
        (work / "dags-test.log").write_bytes(r.stdout + r.stderr)
        if r.returncode:
            sys.exit((r.stdout + r.stderr).decode(errors="replace")[-5000:])

        with sqlite3.connect(home / "airflow.db") as db:
            rows = db.execute(
                "SELECT task_id, state, start_date, end_date FROM task_instance "
                "WHERE dag_id = 'kollm_korean_quickstart'"
            ).fetchall()
            xcoms = dict(
                db.execute(
                    "SELECT task_id, value FROM xcom WHERE dag_id = 'kollm_korean_quickstart' AND key = 'return_value'"
                ).fetchall()
            )
        process = {}
        for line in (home / "process-times").read_text().splitlines():
            step, s, e = line.split()
            process[step] = (float(s), float(e))
        af_steps = step_durations(af_project)
        tasks = {}
        for task, state, start, end in rows:
            wall = ts(end) - ts(start)
            ps, pe = process[task]
            tasks[task] = {
                "state": state,
                "task_s": round(wall, 2),
                "airflow_s": round(wall - (pe - ps), 2),
                "process_s": round((pe - ps) - af_steps[task], 2),
                "step_s": round(af_steps[task], 2),
                "kollm_run_step_s": round(run_steps[task], 2),
            }
        digests_equal = {}
        for name, rec in expected.steps.items():
            got = json.loads(xcoms[name])
            digests_equal[name] = {o: v["digest"] for o, v in got["outputs"].items()} == {
                o: a.digest for o, a in rec.outputs.items()
            }
        total = {k: round(sum(t[k] for t in tasks.values()), 1) for k in ("task_s", "airflow_s", "process_s", "step_s")}
        report = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
            "config": args.config or "korean-quickstart",
            "kollm_run_s": round(run_wall, 1),
            "airflow_db_migrate_s": round(migrate_wall, 1),
            "airflow_dags_test_s": round(dags_test_wall, 1),
            "outside_tasks_s": round(dags_test_wall - total["task_s"], 1),
            "tasks_total": total,
            "tasks": tasks,
            "digests_equal": digests_equal,
        }
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n", encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
