"""A single-box Docker Compose stack from kollm.yaml: PostgreSQL, MinIO (with its bucket), the MLflow server,
`kollm serve` with the canary gateway, Prometheus scraping it, Grafana (datasources and kollm's dashboards
provisioned), Loki and promtail shipping kollm's JSON logs.

Passwords come from the environment (`.env` beside compose.yaml, see `.env.example`); none is rendered.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kollm.deploy.k8s import SERVE_PORT, yaml_text
from kollm.deploy.options import Project
from kollm.jsonlog import FIXED, KINDS, LABELS, LOKI_LABELS

Doc = dict[str, Any]

LOG_KINDS = KINDS
# where kollm's Grafana dashboards live in the installed package (kollm/monitor/dashboards/*.json)
DASHBOARDS_PY = "import kollm.monitor, os; print(os.path.join(os.path.dirname(kollm.monitor.__file__), 'dashboards'))"


def _required(var: str, what: str) -> str:
    return f"${{{var}:?set {var} in .env ({what})}}"


def project_mount(p: Project, out_dir: Path) -> str:
    """The project folder as seen from compose.yaml: relative when the output is inside the project."""
    out_dir, project = out_dir.resolve(), p.pipeline.project_dir.resolve()
    rel = os.path.relpath(project, out_dir) if out_dir.is_relative_to(project) else str(project)
    return f"${{KOLLM_PROJECT_DIR:-{rel}}}"


def compose(p: Project, out_dir: Path) -> Doc:
    image = f"${{KOLLM_IMAGE:-{p.options.image}}}"
    bucket = p.options.bucket
    minio_user = _required("MINIO_ROOT_USER", "the MinIO access key")
    minio_password = _required("MINIO_ROOT_PASSWORD", "the MinIO secret key, 8 characters or more")
    pg_password = _required("POSTGRES_PASSWORD", "the password of the mlflow database user")
    project = project_mount(p, out_dir)
    s3_env = {
        "AWS_ACCESS_KEY_ID": minio_user,
        "AWS_SECRET_ACCESS_KEY": minio_password,
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000",
    }
    kollm_env = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "KOLLM_API_KEY": "${KOLLM_API_KEY:-}", **s3_env}
    services: Doc = {
        "postgres": {
            "image": "postgres:16",
            "environment": {"POSTGRES_USER": "mlflow", "POSTGRES_DB": "mlflow", "POSTGRES_PASSWORD": pg_password},
            "volumes": ["postgres-data:/var/lib/postgresql/data"],
            "healthcheck": {
                "test": ["CMD-SHELL", "pg_isready -U mlflow -d mlflow"],
                "interval": "5s",
                "timeout": "5s",
                "retries": 20,
            },
            "restart": "unless-stopped",
        },
        "minio": {
            "image": "minio/minio:latest",
            "command": ["server", "/data", "--console-address", ":9001"],
            "environment": {"MINIO_ROOT_USER": minio_user, "MINIO_ROOT_PASSWORD": minio_password},
            "volumes": ["minio-data:/data"],
            "ports": ["127.0.0.1:9000:9000", "127.0.0.1:9001:9001"],
            "healthcheck": {"test": ["CMD", "mc", "ready", "local"], "interval": "5s", "timeout": "5s", "retries": 20},
            "restart": "unless-stopped",
        },
        "minio-init": {
            "image": "minio/mc:latest",
            "depends_on": {"minio": {"condition": "service_healthy"}},
            "environment": {"MINIO_ROOT_USER": minio_user, "MINIO_ROOT_PASSWORD": minio_password},
            "entrypoint": [
                "/bin/sh",
                "-c",
                'mc alias set local http://minio:9000 "$$MINIO_ROOT_USER" "$$MINIO_ROOT_PASSWORD" && '
                f"mc mb --ignore-existing local/{bucket}",
            ],
        },
        "mlflow": {
            "image": image,
            "entrypoint": ["mlflow", "server"],
            "command": [
                "--backend-store-uri",
                f"postgresql://mlflow:{pg_password}@postgres:5432/mlflow",
                "--artifacts-destination",
                f"s3://{bucket}/mlflow-artifacts",
                "--serve-artifacts",
                "--host",
                "0.0.0.0",
                "--port",
                "5000",
                "--allowed-hosts",
                "mlflow,mlflow:*,localhost,localhost:*,127.0.0.1:*",
            ],
            "environment": s3_env,
            "ports": ["127.0.0.1:5000:5000"],
            "depends_on": {
                "postgres": {"condition": "service_healthy"},
                "minio-init": {"condition": "service_completed_successfully"},
            },
            "healthcheck": {
                "test": [
                    "CMD",
                    "python",
                    "-c",
                    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health')",
                ],
                "interval": "10s",
                "timeout": "5s",
                "retries": 30,
            },
            "restart": "unless-stopped",
        },
        "pipeline": {
            "image": image,
            "profiles": ["pipeline"],
            "command": ["run"],
            "working_dir": "/project",
            "environment": kollm_env,
            "volumes": [f"{project}:/project"],
            "depends_on": {"mlflow": {"condition": "service_healthy"}},
        },
        "kollm": {
            "image": image,
            "command": [
                "serve",
                p.model_uri(p.options.model_alias),
                "--canary",
                p.model_uri(p.options.canary_alias),
                "--host",
                "0.0.0.0",
                "--port",
                str(SERVE_PORT),
                "--backend",
                p.backend,
                "--project",
                "/project",
            ],
            "environment": kollm_env,
            "volumes": [f"{project}:/project"],
            "ports": [f"127.0.0.1:{SERVE_PORT}:{SERVE_PORT}"],
            "depends_on": {"mlflow": {"condition": "service_healthy"}},
            "stop_grace_period": "45s",
            "restart": "unless-stopped",
        },
        "prometheus": {
            "image": "prom/prometheus:latest",
            "volumes": ["./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro", "prometheus-data:/prometheus"],
            "ports": ["127.0.0.1:9090:9090"],
            "restart": "unless-stopped",
        },
        "grafana-dashboards": {
            "image": image,
            "user": "root",
            "entrypoint": [
                "/bin/sh",
                "-c",
                f'd="$$(python -c "{DASHBOARDS_PY}")"; '
                'if [ -d "$$d" ]; then cp "$$d"/*.json /dashboards/; else echo "no dashboards in this kollm image"; fi',
            ],
            "volumes": ["grafana-dashboards:/dashboards"],
        },
        "grafana": {
            "image": "grafana/grafana:latest",
            "environment": {
                "GF_SECURITY_ADMIN_PASSWORD": _required("GRAFANA_ADMIN_PASSWORD", "Grafana's admin password")
            },
            "volumes": [
                "./grafana/provisioning:/etc/grafana/provisioning:ro",
                "grafana-dashboards:/var/lib/grafana/dashboards/kollm:ro",
                "grafana-data:/var/lib/grafana",
            ],
            "ports": ["127.0.0.1:3000:3000"],
            "depends_on": {
                "grafana-dashboards": {"condition": "service_completed_successfully"},
                "prometheus": {"condition": "service_started"},
                "loki": {"condition": "service_started"},
            },
            "restart": "unless-stopped",
        },
        "loki": {
            "image": "grafana/loki:latest",
            "command": ["-config.file=/etc/loki/local-config.yaml"],
            "ports": ["127.0.0.1:3100:3100"],
            "restart": "unless-stopped",
        },
        "promtail": {
            "image": "grafana/promtail:latest",
            "command": ["-config.file=/etc/promtail/config.yml"],
            "volumes": ["./promtail/config.yml:/etc/promtail/config.yml:ro", f"{project}:/project:ro"],
            "depends_on": {"loki": {"condition": "service_started"}},
            "restart": "unless-stopped",
        },
    }
    volumes: dict[str, dict] = {
        v: {} for v in ("postgres-data", "minio-data", "prometheus-data", "grafana-data", "grafana-dashboards")
    }
    return {"name": f"kollm-{p.slug}", "services": services, "volumes": volumes}


def prometheus_config(p: Project) -> Doc:
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "scrape_configs": [
            {
                "job_name": "kollm",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"kollm:{SERVE_PORT}"], "labels": {"project": p.name}}],
            }
        ],
    }


def grafana_datasources() -> Doc:
    return {
        "apiVersion": 1,
        "datasources": [
            {
                "name": "Prometheus",
                "uid": "prometheus",
                "type": "prometheus",
                "access": "proxy",
                "url": "http://prometheus:9090",
                "isDefault": True,
            },
            {"name": "Loki", "uid": "loki", "type": "loki", "access": "proxy", "url": "http://loki:3100"},
        ],
    }


def grafana_dashboards() -> Doc:
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "kollm",
                "folder": "kollm",
                "type": "file",
                "disableDeletion": True,
                "allowUiUpdates": False,
                "options": {"path": "/var/lib/grafana/dashboards/kollm"},
            }
        ],
    }


def promtail_config(p: Project) -> Doc:
    """kollm's JSON logs (.kollm/logs/<kind>/**.jsonl, schema in kollm.jsonlog): one stream per kind and label
    values, the line's `ts` as its timestamp; `component`, `level`, `step` and `model` become Loki labels."""
    return {
        "server": {"http_listen_port": 9080, "grpc_listen_port": 0},
        "positions": {"filename": "/tmp/positions.yaml"},
        "clients": [{"url": "http://loki:3100/loki/api/v1/push"}],
        "scrape_configs": [
            {
                "job_name": "kollm",
                "static_configs": [
                    {
                        "targets": ["localhost"],
                        "labels": {
                            "job": "kollm",
                            "project": p.name,
                            "kind": kind,
                            "__path__": f"/project/.kollm/logs/{kind}/**/*.jsonl",
                        },
                    }
                    for kind in LOG_KINDS
                ],
                "pipeline_stages": [
                    {"json": {"expressions": {k: k for k in (*FIXED, *LABELS)}}},
                    {"labels": {k: None for k in LOKI_LABELS}},
                    {"timestamp": {"source": "ts", "format": "RFC3339Nano"}},
                ],
            }
        ],
    }


ENV_EXAMPLE = """\
# Copy to .env and fill in (docker compose reads .env beside compose.yaml). Never commit .env.
POSTGRES_PASSWORD=
MINIO_ROOT_USER=kollm
MINIO_ROOT_PASSWORD=
GRAFANA_ADMIN_PASSWORD=
# optional: require `Authorization: Bearer KEY` on the model server
KOLLM_API_KEY=
# optional: the kollm image (build it: docker build -f deploy/docker/Dockerfile -t kollm:0.1.0 .)
# KOLLM_IMAGE=kollm:0.1.0
# optional: the project folder (holds kollm.yaml and .kollm/) if it is not the default in compose.yaml
# KOLLM_PROJECT_DIR=
"""


def render_compose(p: Project, out_dir: Path) -> dict[str, str]:
    return {
        "compose.yaml": yaml_text(compose(p, out_dir)),
        ".env.example": ENV_EXAMPLE,
        "prometheus/prometheus.yml": yaml_text(prometheus_config(p)),
        "grafana/provisioning/datasources/kollm.yaml": yaml_text(grafana_datasources()),
        "grafana/provisioning/dashboards/kollm.yaml": yaml_text(grafana_dashboards()),
        "promtail/config.yml": yaml_text(promtail_config(p)),
    }
