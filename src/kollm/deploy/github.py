"""A GitHub Actions workflow from kollm.yaml (`kollm deploy render --target github -o .` writes
`.github/workflows/kollm.yml`): every job runs in kollm's image.

    pull_request          kollm validate
    push (main), schedule kollm run against the team's tracking server and store; a failed gate fails the job
    workflow_dispatch     kollm rollout start: the gateway walks the challenger through the canary steps

Secrets are referenced by name (`secrets.NAME`); no value is rendered.
"""

from __future__ import annotations

from typing import Any

from kollm.deploy.options import Project

WORKFLOW = ".github/workflows/kollm.yml"
SECRETS = ("MLFLOW_TRACKING_URI", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
GATEWAY_SECRETS = ("KOLLM_GATEWAY", "KOLLM_API_KEY")
CRON = "0 3 * * 1"  # Mondays 03:00 UTC


def secret_env(names: tuple[str, ...]) -> dict[str, str]:
    return {n: "${{ secrets.%s }}" % n for n in names}


def commands(p: Project) -> dict[str, str]:
    """The command of each job (the README's GitHub Actions section lists the same lines)."""
    o = p.options
    return {
        "validate": "kollm validate",
        "pipeline": f"kollm run --store {p.store}",
        "canary": f'kollm rollout start {p.name} --steps {o.steps} --pause {o.pause} --analysis "{o.analysis}" '
        f"--failure-limit {o.failure_limit}",
    }


def workflow(p: Project) -> dict[str, Any]:
    cmd = commands(p)
    checkout = {"uses": "actions/checkout@v4"}
    container = {"image": p.options.image}
    pipeline_env = secret_env(SECRETS)
    if p.options.s3_endpoint:
        pipeline_env["AWS_ENDPOINT_URL"] = p.options.s3_endpoint
    return {
        "name": f"kollm {p.name}",
        "on": {
            "pull_request": {"branches": ["main"]},
            "push": {"branches": ["main"]},
            "schedule": [{"cron": CRON}],
            "workflow_dispatch": {},
        },
        "permissions": {"contents": "read"},
        "concurrency": {"group": "kollm-${{ github.workflow }}-${{ github.ref }}", "cancel-in-progress": False},
        "jobs": {
            "validate": {
                "if": "github.event_name == 'pull_request'",
                "runs-on": "ubuntu-latest",
                "container": container,
                "steps": [checkout, {"name": "Check kollm.yaml", "run": cmd["validate"]}],
            },
            "pipeline": {
                "if": "github.event_name == 'push' || github.event_name == 'schedule'",
                "runs-on": "ubuntu-latest",
                "container": container,
                "timeout-minutes": 360,
                "env": pipeline_env,
                "steps": [
                    checkout,
                    {"name": "Check kollm.yaml", "run": cmd["validate"]},
                    {"name": "Run the pipeline (a failed quality gate exits 3)", "run": cmd["pipeline"]},
                ],
            },
            "canary": {
                "if": "github.event_name == 'workflow_dispatch'",
                "runs-on": "ubuntu-latest",
                "container": container,
                "env": secret_env(GATEWAY_SECRETS),
                "steps": [{"name": "Start the canary through the gateway", "run": cmd["canary"]}],
            },
        },
    }


def render_github(p: Project) -> dict[str, dict[str, Any]]:
    return {WORKFLOW: workflow(p)}
