"""The Grafana dashboards kollm ships (dashboards/*.json), generated from the panel lists below.

    python -m kollm.monitor.grafana        rewrite src/kollm/monitor/dashboards/*.json from this file

Four dashboards: serving (kollm serve), rollout (the canary gateway and its rollout), training (from
`kollm monitor exporter`), data (drift of served traffic). Every query reads metrics kollm exports or the
recording rules in rules/*.yml, so they need those rules loaded. Each dashboard has a `datasource` variable
(any Prometheus) and label filters as template variables; import them in Grafana (Dashboards -> New -> Import)
or provision the folder. The JSON is plain Grafana 11 dashboard JSON (schemaVersion 39), written by hand here
rather than with grafana-foundation-sdk, so it has no dependency.

Public API:
    DASHBOARDS: dict[file name, dashboard dict]
    panel_queries(dashboard) -> list[(panel title, expr)]
    write_dashboards(folder) -> list[Path]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}


@dataclass(frozen=True)
class Q:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[Q, ...]
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = 12
    extra: dict[str, Any] = field(default_factory=dict)


def _var(name: str, query: str, label: str) -> dict[str, Any]:
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def _dashboard(
    uid: str, title: str, description: str, variables: list[dict[str, Any]], panels: list[Panel]
) -> dict[str, Any]:
    built, x, y = [], 0, 0
    for i, p in enumerate(panels, start=1):
        if x + p.width > 24:
            x, y = 0, y + 8
        built.append(
            {
                "id": i,
                "type": p.kind,
                "title": p.title,
                "description": p.description,
                "datasource": DS,
                "gridPos": {"h": 8, "w": p.width, "x": x, "y": y},
                "targets": [
                    {
                        "refId": chr(ord("A") + j),
                        "datasource": DS,
                        "expr": q.expr,
                        "legendFormat": q.legend or "__auto",
                        "range": True,
                    }
                    for j, q in enumerate(p.queries)
                ],
                "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
                "options": {
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi"},
                }
                if p.kind == "timeseries"
                else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}},
                **p.extra,
            }
        )
        x += p.width
    datasource = {
        "type": "datasource",
        "name": "datasource",
        "label": "Prometheus",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
    }
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["kollm"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "graphTooltip": 1,
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [datasource, *variables]},
        "panels": built,
    }


_S = 'job=~"$job", model_version=~"$model_version"'
SERVING = _dashboard(
    "kollm-serving",
    "kollm / serving",
    "kollm serve: traffic, errors, latency, tokens and the batch queue, per model version.",
    [
        _var("job", "label_values(kollm_requests_total, job)", "Job"),
        _var("model_version", 'label_values(kollm_requests_total{job=~"$job"}, model_version)', "Model version"),
    ],
    [
        Panel("Requests per second", (Q(f"kollm:requests:rate5m{{{_S}}}", "v{{model_version}}"),), "reqps"),
        Panel(
            "Error ratio (5xx)",
            (Q(f"kollm:request_error_ratio:rate5m{{{_S}}}", "v{{model_version}}"),),
            "percentunit",
            description="KollmHighErrorRate fires above 5% for 1 minute.",
        ),
        Panel(
            "Responses by status code",
            (
                Q(
                    f'sum by (status_code) (rate(kollm_requests_total{{{_S}, endpoint=~"/v1/.*"}}[$__rate_interval]))',
                    "{{status_code}}",
                ),
            ),
            "reqps",
        ),
        Panel(
            "Latency p50 / p95 (arrival to last byte)",
            (
                Q(f"kollm:request_latency_seconds:p50_5m{{{_S}}}", "p50 v{{model_version}}"),
                Q(f"kollm:request_latency_seconds:p95_5m{{{_S}}}", "p95 v{{model_version}}"),
            ),
            "s",
        ),
        Panel(
            "Time to first token p95",
            (Q(f"kollm:time_to_first_token_seconds:p95_5m{{{_S}}}", "v{{model_version}}"),),
            "s",
        ),
        Panel(
            "Tokens per second (server)",
            (
                Q(f"kollm:output_tokens:rate1m{{{_S}}}", "output v{{model_version}}"),
                Q(f"kollm:prompt_tokens:rate1m{{{_S}}}", "prompt v{{model_version}}"),
            ),
            "short",
        ),
        Panel(
            "Output tokens per second per request p50",
            (
                Q(
                    f"histogram_quantile(0.5, sum by (model_version, le) (rate(kollm_request_tokens_per_second_bucket{{{_S}}}[$__rate_interval])))",
                    "v{{model_version}}",
                ),
            ),
            "short",
        ),
        Panel(
            "In flight, queued and running",
            (
                Q(f"sum by (model_version) (kollm_requests_in_flight{{{_S}}})", "in flight v{{model_version}}"),
                Q(f"sum by (model_version) (kollm_queue_depth{{{_S}}})", "queued v{{model_version}}"),
                Q(f"sum by (model_version) (kollm_running_sequences{{{_S}}})", "running v{{model_version}}"),
            ),
            "short",
            description="KollmQueueBacklog fires when more than 8 requests wait on average for 5 minutes.",
        ),
    ],
)

_R = 'job=~"$job", rollout=~"$rollout"'
ROLLOUT = _dashboard(
    "kollm-rollout",
    "kollm / rollout",
    "The canary gateway (kollm serve --canary) and its rollout: weights, analyses and each arm's health.",
    [
        _var("job", "label_values(kollm_gateway_requests_total, job)", "Job"),
        _var("rollout", 'label_values(kollm_rollout_step{job=~"$job"}, rollout)', "Rollout"),
    ],
    [
        Panel("Canary weight", (Q(f"kollm_rollout_canary_weight_percent{{{_R}}}", "{{rollout}}"),), "percent"),
        Panel(
            "Rollout step and status",
            (
                Q(f"kollm_rollout_step{{{_R}}}", "step {{rollout}}"),
                Q(f"kollm_rollout_status{{{_R}}} == 1", "{{status}}"),
            ),
            "short",
            kind="stat",
            width=6,
        ),
        Panel(
            "Failed analyses in this rollout",
            (Q(f"kollm_rollout_failures{{{_R}}}", "{{rollout}}"),),
            "short",
            kind="stat",
            width=6,
        ),
        Panel(
            "Analysis verdicts (last hour)",
            (Q(f"sum by (verdict) (increase(kollm_rollout_analysis_total{{{_R}}}[1h]))", "{{verdict}}"),),
            "short",
        ),
        Panel("Last analysed values", (Q(f"kollm_rollout_analysis_value{{{_R}}}", "{{metric}}"),), "short"),
        Panel(
            "Requests per second by arm",
            (Q('kollm:gateway_requests:rate5m{job=~"$job"}', "{{arm}} v{{version}}"),),
            "reqps",
        ),
        Panel(
            "Error ratio by arm",
            (Q('kollm:gateway_error_ratio:rate5m{job=~"$job"}', "{{arm}} v{{version}}"),),
            "percentunit",
            description="KollmStableArmErrors fires above 1% on the stable arm; KollmCanaryErrors above 5% on the canary.",
        ),
        Panel(
            "Latency p95 by arm",
            (Q('kollm:gateway_request_duration_seconds:p95_5m{job=~"$job"}', "{{arm}} v{{version}}"),),
            "s",
        ),
    ],
)

_T = 'job=~"$job", step_name=~"$step_name"'
TRAINING = _dashboard(
    "kollm-training",
    "kollm / training",
    "Training steps (cpt, sft, align) as `kollm monitor exporter` reads them from .kollm/logs/training.",
    [
        _var("job", "label_values(kollm_training_step, job)", "Job"),
        _var("step_name", 'label_values(kollm_training_step{job=~"$job"}, step_name)', "Step"),
    ],
    [
        Panel(
            "Loss",
            (Q(f"kollm_training_loss{{{_T}}}", "{{step_name}}"),),
            "short",
            description="KollmTrainingLossNaN fires on NaN/Inf.",
        ),
        Panel("Optimizer step", (Q(f"kollm_training_step{{{_T}}}", "{{step_name}}"),), "short"),
        Panel("Learning rate", (Q(f"kollm_training_learning_rate{{{_T}}}", "{{step_name}}"),), "short"),
        Panel("Gradient norm", (Q(f"kollm_training_grad_norm{{{_T}}}", "{{step_name}}"),), "short"),
        Panel("Tokens per second", (Q(f"kollm_training_tokens_per_second{{{_T}}}", "{{step_name}}"),), "short"),
        Panel("Peak GPU memory", (Q(f"kollm_training_gpu_memory_bytes{{{_T}}}", "{{step_name}}"),), "bytes"),
        Panel(
            "Since the last log record",
            (Q(f"time() - kollm_training_last_log_timestamp_seconds{{{_T}}}", "{{step_name}}"),),
            "s",
            kind="stat",
        ),
    ],
)

_D = 'job=~"$job", feature=~"$feature"'
DATA = _dashboard(
    "kollm-data",
    "kollm / data and drift",
    "Served traffic against the training data: `kollm monitor drift` results and the shape of requests.",
    [
        _var("job", "label_values(kollm_drift_psi, job)", "Job"),
        _var("feature", 'label_values(kollm_drift_psi{job=~"$job"}, feature)', "Feature"),
    ],
    [
        Panel(
            "PSI per feature",
            (Q(f"kollm_drift_psi{{{_D}}}", "{{feature}}"),),
            "short",
            description="Population stability index; KollmDataDrift fires above 0.25.",
        ),
        Panel("KS statistic per feature", (Q(f"kollm_drift_ks_statistic{{{_D}}}", "{{feature}}"),), "short"),
        Panel("KS p-value per feature", (Q(f"kollm_drift_ks_pvalue{{{_D}}}", "{{feature}}"),), "short"),
        Panel("Features drifted", (Q(f"sum(kollm_drift_detected{{{_D}}})", "drifted"),), "short", kind="stat", width=6),
        Panel(
            "Requests in the drift window",
            (Q('kollm_drift_window_requests{job=~"$job"}', "requests"),),
            "short",
            kind="stat",
            width=6,
        ),
        Panel(
            "Since the last drift check",
            (Q('time() - kollm_drift_last_run_timestamp_seconds{job=~"$job"}', "age"),),
            "s",
            kind="stat",
            width=6,
        ),
        Panel(
            "Prompt tokens per request (served)",
            (
                Q(
                    "sum by (model_version) (rate(kollm_prompt_tokens_total[$__rate_interval])) / "
                    'sum by (model_version) (rate(kollm_requests_total{endpoint=~"/v1/.*"}[$__rate_interval]))',
                    "v{{model_version}}",
                ),
            ),
            "short",
            width=6,
        ),
        Panel(
            "Output tokens per request (served)",
            (
                Q(
                    "sum by (model_version) (rate(kollm_output_tokens_total[$__rate_interval])) / "
                    'sum by (model_version) (rate(kollm_requests_total{endpoint=~"/v1/.*"}[$__rate_interval]))',
                    "v{{model_version}}",
                ),
            ),
            "short",
            width=6,
        ),
    ],
)

DASHBOARDS: dict[str, dict[str, Any]] = {
    "serving.json": SERVING,
    "rollout.json": ROLLOUT,
    "training.json": TRAINING,
    "data.json": DATA,
}


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def render(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def write_dashboards(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, dashboard in DASHBOARDS.items():
        path = folder / name
        path.write_text(render(dashboard), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write_dashboards(Path(__file__).parent / "dashboards"):
        print(p)
