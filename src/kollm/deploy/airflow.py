"""`kollm compile airflow`: kollm.yaml -> an Airflow 3 DAG file (TaskFlow), one task per step.

Each task runs exactly one attempt of its step with explicit inputs, as a KFP component does (the command line is
built by `kollm.deploy.command.step_command`, whose source the DAG file carries):

    kollm step run kollm.yaml --step NAME --input NAME=URI ... --attempt N --store URL --outputs-json FILE

and returns the outputs JSON (XCom), whose `uri`s the next tasks pass as their `--input`s. Inputs from raw data
sources are read as kollm.yaml names them. A step's `retries`/`retry_backoff_s` become the task's retries with
exponential backoff, its CPUs the task's `pool_slots`, a GPU step goes to the `gpu` queue; the
schedule is `kollm watch`'s cron (`--schedule`). The DAG file imports only Airflow and the standard library:
kollm runs as a command (`--kollm`), so Airflow and kollm may live in different environments.
"""

from __future__ import annotations

import math
from pathlib import Path

from kollm.deploy.command import SOURCE as STEP_COMMAND
from kollm.deploy.kfp import ident
from kollm.deploy.options import DeployOptions, load_project
from kollm.errors import ConfigError
from kollm.pipeline.spec import ResolvedStep

_HEAD = '''\
"""kollm pipeline {project!r}: compiled from {config} by `kollm compile airflow`; one task per step."""

import json
import subprocess
import tempfile
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import dag, get_current_context, task

PROJECT_DIR = {project_dir!r}
KOLLM = {kollm!r}
STORE = {store!r}


{step_command}

def run_step(step, inputs):
    """One attempt of STEP with explicit inputs (NAME -> URI); returns its outputs JSON."""
    attempt = get_current_context()["ti"].try_number - 1
    out = Path(tempfile.mkdtemp(prefix="kollm-" + step + "-")) / "outputs.json"
    cmd = step_command(KOLLM, "kollm.yaml", step, inputs, attempt, str(out), STORE)
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=PROJECT_DIR)
    return json.loads(out.read_text(encoding="utf-8"))


@dag(
    dag_id={dag_id!r},
    schedule={schedule!r},
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["kollm"],
)
def pipeline():
'''


def _task(step: ResolvedStep) -> str:
    fn = "step_" + ident(step.name)
    upstream = sorted({ref.step for ref in step.inputs.values() if ref.step})
    inputs = ", ".join(
        f'"{name}": {ident(ref.step)}["outputs"]["{ref.output}"]["uri"]'
        for name, ref in step.inputs.items()
        if ref.step
    )
    r = step.resources
    opts = [f'task_id="{step.name}"', f"retries={step.retries}", f"pool_slots={max(1, math.ceil(r.cpus))}"]
    if step.retries:
        opts += [f"retry_delay=timedelta(seconds={int(step.retry_backoff_s)})", "retry_exponential_backoff=True"]
    if r.gpus:
        opts.append('queue="gpu"')
    return (
        f"    @task({', '.join(opts)})\n"
        f"    def {fn}({', '.join(ident(u) for u in upstream)}):\n"
        f"        return run_step({step.name!r}, {{{inputs}}})\n"
    )


def compile_airflow(
    path: str | Path | None,
    out_file: str | Path,
    *,
    store: str = "",
    schedule: str | None = None,
    kollm: tuple[str, ...] = ("kollm",),
    project_dir: str = "",
) -> Path:
    """Write the DAG file for kollm.yaml at PATH. Returns the file."""
    p = load_project(path, DeployOptions())
    if schedule:
        from kollm.monitor.watch import parse_cron

        parse_cron(schedule)
    if not kollm:
        raise ConfigError("--kollm: give the kollm command the tasks run")
    steps = p.pipeline.steps
    body = "\n".join(_task(s) for s in steps)
    calls = []
    for s in steps:
        upstream = sorted({ref.step for ref in s.inputs.values() if ref.step})
        calls.append(f"    {ident(s.name)} = step_{ident(s.name)}({', '.join(ident(u) for u in upstream)})")
    text = (
        _HEAD.format(
            project=p.name,
            config=p.pipeline.file.name,
            project_dir=project_dir or str(p.pipeline.project_dir),
            kollm=list(kollm),
            store=store,  # empty: the project's own store (.kollm/)
            dag_id=f"kollm_{ident(p.slug)}",
            schedule=schedule,
            step_command=STEP_COMMAND.rstrip("\n") + "\n",
        )
        + body
        + "\n"
        + "\n".join(calls)
        + "\n\n\npipeline()\n"
    )
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out
