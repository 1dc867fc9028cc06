"""Kubernetes manifests from kollm.yaml: KubeRay RayJobs for training, a RayService, an Argo Rollout with its
AnalysisTemplate, MLflow on PostgreSQL with S3 artifacts, Prometheus scrape config, Services and ConfigMaps.

Secrets are referenced by name only (`DeployOptions.s3_secret`, ...); no secret value is ever rendered.
Each function returns plain dicts; `render_k8s` returns {file name: [documents]}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from kollm.deploy.options import TRAINING_KINDS, Project
from kollm.pipeline.spec import ResolvedStep
from kollm.rollout.analysis import Criterion

Doc = dict[str, Any]

PROJECT_MOUNT = "/etc/kollm/project"
SERVE_PORT = 8000
MLFLOW_PORT = 5000
# kollm's serving metrics (kollm.serve.metrics): counts by status code and a latency histogram, per pod
REQUESTS = "kollm_requests_total"
LATENCY = "kollm_request_latency_seconds"
HASH_LABEL = "rollouts_pod_template_hash"  # the Prometheus label the scrape config copies from Argo's pod label


def labels(p: Project, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kollm",
        "app.kubernetes.io/instance": p.slug,
        "app.kubernetes.io/component": component,
    }


def meta(p: Project, name: str, component: str) -> Doc:
    return {"name": name, "labels": labels(p, component)}


def mlflow_service(p: Project) -> str:
    return f"{p.slug}-mlflow"


def settings_name(p: Project) -> str:
    return f"{p.slug}-settings"


# --- config maps ---------------------------------------------------------------------------------


def config_maps(p: Project) -> list[Doc]:
    """The project's kollm.yaml, the environment every kollm pod shares, and the input URIs of the RayJobs."""
    settings = {
        "MLFLOW_TRACKING_URI": f"http://{mlflow_service(p)}:{MLFLOW_PORT}",
        "KOLLM_STORE": p.store,
    }
    if p.options.s3_endpoint:
        settings["AWS_ENDPOINT_URL"] = p.options.s3_endpoint  # boto3 and s3fs
        settings["MLFLOW_S3_ENDPOINT_URL"] = p.options.s3_endpoint
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(p, f"{p.slug}-project", "config"),
            "data": {"kollm.yaml": cluster_config(p)},
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(p, settings_name(p), "config"), "data": settings},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(p, f"{p.slug}-step-inputs", "training"),
            "data": step_inputs(p),
        },
    ]


def cluster_config(p: Project) -> str:
    """kollm.yaml as the pods read it. Without `tracking.artifact_location` kollm would create the experiment with
    its artifacts in the pod's own disk; in the cluster they go through the MLflow server's proxy to S3 instead."""
    if p.pipeline.cfg.tracking.artifact_location:
        return p.config_text
    raw = yaml.safe_load(p.config_text)
    raw.setdefault("tracking", {})["artifact_location"] = f"mlflow-artifacts:/{p.slug}"
    return (
        f"# {p.pipeline.file.name} with tracking.artifact_location set for the cluster (written by kollm deploy render)\n"
        + yaml_text(raw)
    )


def training_steps(p: Project) -> list[ResolvedStep]:
    return [s for s in p.pipeline.steps if s.kind in TRAINING_KINDS]


def step_inputs(p: Project) -> dict[str, str]:
    """`STEP.INPUT` -> the URI of the earlier step's output folder that RayJob reads (the `uri` that step's
    `--outputs-json` printed): empty until filled in. Inputs from raw data sources are not listed: kollm reads
    them as kollm.yaml names them (use s3:// paths under `data:` for a cluster)."""
    return {f"{s.name}.{name}": "" for s in training_steps(p) for name in step_artifact_inputs(s)}


def step_artifact_inputs(step: ResolvedStep) -> list[str]:
    """The inputs of STEP that come from earlier steps (the ones `kollm step run --input` takes)."""
    return [name for name, ref in step.inputs.items() if ref.step]


def input_env_name(input_name: str) -> str:
    return "KOLLM_INPUT_" + "".join(c if c.isalnum() else "_" for c in input_name.upper())


# --- containers ------------------------------------------------------------------------------------


def kollm_env(p: Project) -> tuple[list[Doc], list[Doc]]:
    """(env, envFrom) of every kollm container: S3 keys and the API key from Secrets, the rest from the settings."""
    s3 = p.options.s3_secret
    env = [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": s3, "key": "AWS_ACCESS_KEY_ID"}}},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": s3, "key": "AWS_SECRET_ACCESS_KEY"}}},
        {
            "name": "KOLLM_API_KEY",
            "valueFrom": {"secretKeyRef": {"name": p.options.api_key_secret, "key": "KOLLM_API_KEY", "optional": True}},
        },
    ]
    return env, [{"configMapRef": {"name": settings_name(p)}}]


def cpu_quantity(cpus: float) -> str:
    """2 -> "2", 0.5 -> "500m" (a Kubernetes quantity)."""
    return str(int(cpus)) if float(cpus).is_integer() else f"{int(round(cpus * 1000))}m"


def resources(cpus: float, memory: str | None, gpus: int) -> Doc:
    limits: Doc = {"cpu": cpu_quantity(cpus), "memory": memory or "8Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = gpus
    return {"requests": dict(limits), "limits": limits}


def project_volume(p: Project) -> tuple[Doc, Doc]:
    return (
        {"name": "project", "configMap": {"name": f"{p.slug}-project"}},
        {"name": "project", "mountPath": PROJECT_MOUNT, "readOnly": True},
    )


def ray_container(p: Project, name: str, res: Doc, extra_env: Sequence[Doc] = (), ports: Sequence[Doc] = ()) -> Doc:
    env, env_from = kollm_env(p)
    c: Doc = {
        "name": name,
        "image": p.options.image,
        "env": env + list(extra_env),
        "envFrom": env_from,
        "resources": res,
        "volumeMounts": [project_volume(p)[1]],
    }
    if ports:
        c["ports"] = list(ports)
    return c


def ray_cluster(
    p: Project,
    worker_group: str,
    worker_res: Doc,
    worker_env: list[Doc],
    replicas: int = 1,
    max_replicas: int = 1,
    head_ports: Sequence[Doc] = (),
) -> Doc:
    """A RayCluster spec: a head that runs no tasks and one worker group sized by `worker_res`."""
    volume = project_volume(p)[0]
    head = ray_container(p, "ray-head", resources(1, "4Gi", 0), worker_env, head_ports)
    worker = ray_container(p, "ray-worker", worker_res, worker_env)
    return {
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"metadata": {"labels": labels(p, "ray")}, "spec": {"containers": [head], "volumes": [volume]}},
        },
        "workerGroupSpecs": [
            {
                "groupName": worker_group,
                "replicas": replicas,
                "minReplicas": replicas,
                "maxReplicas": max_replicas,
                "rayStartParams": {},
                "template": {
                    "metadata": {"labels": labels(p, "ray")},
                    "spec": {"containers": [worker], "volumes": [volume]},
                },
            }
        ],
    }


# --- training: a RayJob per step ----------------------------------------------------------------------


def step_command(p: Project, step: ResolvedStep, outputs_json: str = "/tmp/kollm-outputs.json") -> str:
    """The shell line a RayJob's driver runs: one attempt of the step with explicit inputs, outputs into the store."""
    inputs = " ".join(f'--input {name}="${input_env_name(name)}"' for name in step_artifact_inputs(step))
    return (
        f"mkdir -p /tmp/kollm-project && cp {PROJECT_MOUNT}/kollm.yaml /tmp/kollm-project/ && cd /tmp/kollm-project && "
        f"kollm step run kollm.yaml --step {step.name} {inputs} --store {p.store} --outputs-json {outputs_json} && cat {outputs_json}"
    )


def ray_job(p: Project, step: ResolvedStep) -> Doc:
    """A suspended RayJob: fill its inputs in the step-inputs ConfigMap, then set spec.suspend to false."""
    r = step.resources
    env = [
        {
            "name": input_env_name(name),
            "valueFrom": {"configMapKeyRef": {"name": f"{p.slug}-step-inputs", "key": f"{step.name}.{name}"}},
        }
        for name in step_artifact_inputs(step)
    ]
    spec: Doc = {
        "suspend": True,
        "entrypoint": step_command(p, step),
        "entrypointNumCpus": r.cpus,
    }
    if r.gpus:
        spec["entrypointNumGpus"] = r.gpus
    spec.update(
        {
            "backoffLimit": step.retries,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            "rayClusterSpec": ray_cluster(p, "step", resources(r.cpus, r.memory, r.gpus), env),
        }
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": meta(p, f"{p.slug}-{step.name}", "training")
        | {"annotations": {"kollm.dev/step": step.name, "kollm.dev/kind": step.kind}},
        "spec": spec,
    }


# --- serving ---------------------------------------------------------------------------------------------


def ray_service(p: Project) -> Doc:
    """Ray Serve runs kollm's OpenAI app (builder form: kollm.serve.ray_serve:build_app) on the champion."""
    serve_config = {
        "applications": [
            {
                "name": "kollm",
                "route_prefix": "/",
                "import_path": "kollm.serve.ray_serve:build_app",
                "args": {"model": p.model_uri(p.options.model_alias), "backend": p.backend},
            }
        ]
    }
    gpus = p.options.serve_gpus
    cluster = ray_cluster(
        p,
        "serve",
        resources(4, "16Gi", gpus),
        [],
        replicas=1,
        max_replicas=p.options.serve_replicas,
        head_ports=[
            {"name": "gcs", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "serve", "containerPort": SERVE_PORT},
        ],
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": meta(p, f"{p.slug}-ray-serve", "serving"),
        "spec": {"serveConfigV2": yaml_text(serve_config), "rayClusterConfig": cluster},
    }


def serve_labels(p: Project) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kollm-serve", "app.kubernetes.io/instance": p.slug}


def rollout(p: Project) -> Doc:
    """`kollm serve` pods behind an Argo Rollout. The version served is the template's KOLLM_MODEL_VERSION: change
    it to start a canary (20/40/60/80 % of the replicas, each held for the pause, analysed in the background)."""
    env, env_from = kollm_env(p)
    container = {
        "name": "kollm",
        "image": p.options.image,
        "args": [
            "serve",
            f"models:/{p.name}/$(KOLLM_MODEL_VERSION)",
            "--host",
            "0.0.0.0",
            "--port",
            str(SERVE_PORT),
            "--backend",
            p.backend,
        ],  # the registry from $MLFLOW_TRACKING_URI; logs under the image's /project
        "env": [{"name": "KOLLM_MODEL_VERSION", "value": "1"}] + env,
        "envFrom": env_from,
        "ports": [{"name": "http", "containerPort": SERVE_PORT}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "http"},
            "periodSeconds": 10,
            "initialDelaySeconds": 30,
        },
        "resources": resources(2, "8Gi", p.options.serve_gpus),
    }
    steps: list[Doc] = []
    for w in p.weights:
        steps += [{"setWeight": int(w)}, {"pause": {"duration": prom_duration(p.pause_s)}}]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": meta(p, f"{p.slug}-serve", "serving"),
        "spec": {
            "replicas": p.options.serve_replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": serve_labels(p)},
            "template": {
                "metadata": {
                    "labels": serve_labels(p),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(SERVE_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {"terminationGracePeriodSeconds": 45, "containers": [container]},
            },
            "strategy": {
                "canary": {
                    "analysis": {
                        "templates": [{"templateName": analysis_name(p)}],
                        "startingStep": 1,
                        "args": [{"name": "canary-hash", "valueFrom": {"podTemplateHashValue": "Latest"}}],
                    },
                    "steps": steps,
                }
            },
        },
    }


def serve_service(p: Project) -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(p, f"{p.slug}-serve", "serving"),
        "spec": {"selector": serve_labels(p), "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }


# --- canary analysis (the same conditions as kollm's gateway) -------------------------------------------------


def analysis_name(p: Project) -> str:
    return f"{p.slug}-canary-analysis"


def prom_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}m" if s % 60 == 0 else f"{s}s"


def promql(c: Criterion, window: str) -> str:
    """The PromQL of one kollm analysis metric over the canary pods' requests in the last `window`."""
    sel = f'{HASH_LABEL}="{{{{args.canary-hash}}}}"'
    total = f"sum(rate({REQUESTS}{{{sel}}}[{window}]))"
    if c.metric in ("success_rate", "error_rate"):
        op = "!~" if c.metric == "success_rate" else "=~"
        return f'sum(rate({REQUESTS}{{{sel},status_code{op}"5.."}}[{window}])) / {total}'
    if c.metric == "mean_ms":
        return f"1000 * sum(rate({LATENCY}_sum{{{sel}}}[{window}])) / sum(rate({LATENCY}_count{{{sel}}}[{window}]))"
    q = {"p50_ms": 0.5, "p95_ms": 0.95, "p99_ms": 0.99}[c.metric]
    return f"1000 * histogram_quantile({q}, sum by (le) (rate({LATENCY}_bucket{{{sel}}}[{window}])))"


_NEGATE = {">=": "<", "<=": ">", ">": "<=", "<": ">="}


def analysis_template(p: Project) -> Doc:
    """One Prometheus metric per kollm condition. A window with no canary requests (NaN) is neither a success nor
    a failure: inconclusive, as in kollm. `failure_limit` failed windows abort the rollout, as in kollm."""
    window = prom_duration(p.pause_s)
    metrics = []
    for c in p.criteria:
        metrics.append(
            {
                "name": c.metric.replace("_", "-"),
                "interval": window,
                "failureLimit": p.options.failure_limit - 1,
                "successCondition": f"result[0] {c.op} {c.threshold:g}",
                "failureCondition": f"result[0] {_NEGATE[c.op]} {c.threshold:g}",
                "provider": {"prometheus": {"address": "{{args.prometheus-address}}", "query": promql(c, window)}},
            }
        )
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AnalysisTemplate",
        "metadata": meta(p, analysis_name(p), "serving") | {"annotations": {"kollm.dev/analysis": p.options.analysis}},
        "spec": {
            "args": [{"name": "canary-hash"}, {"name": "prometheus-address", "value": p.options.prometheus_url}],
            "metrics": metrics,
        },
    }


# --- MLflow and Prometheus ------------------------------------------------------------------------------------


def mlflow(p: Project) -> list[Doc]:
    """The MLflow tracking server: runs and registry in PostgreSQL (URI from a Secret), artifacts in S3."""
    s3 = p.options.s3_secret
    svc = mlflow_service(p)
    env = [
        {
            "name": "MLFLOW_BACKEND_STORE_URI",
            "valueFrom": {"secretKeyRef": {"name": p.options.mlflow_db_secret, "key": "uri"}},
        },
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": s3, "key": "AWS_ACCESS_KEY_ID"}}},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": s3, "key": "AWS_SECRET_ACCESS_KEY"}}},
    ]
    if p.options.s3_endpoint:
        env.append({"name": "MLFLOW_S3_ENDPOINT_URL", "value": p.options.s3_endpoint})
    container = {
        "name": "mlflow",
        "image": p.options.image,
        "command": ["mlflow", "server"],
        "args": [
            "--backend-store-uri",
            "$(MLFLOW_BACKEND_STORE_URI)",
            "--artifacts-destination",
            f"s3://{p.options.bucket}/mlflow-artifacts",
            "--serve-artifacts",
            "--host",
            "0.0.0.0",
            "--port",
            str(MLFLOW_PORT),
            "--allowed-hosts",
            f"{svc},{svc}:*,{svc}.*,localhost,localhost:*",
        ],
        "env": env,
        "ports": [{"name": "http", "containerPort": MLFLOW_PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
        "resources": resources(1, "2Gi", 0),
    }
    sel = {"app.kubernetes.io/name": "kollm-mlflow", "app.kubernetes.io/instance": p.slug}
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(p, svc, "tracking"),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": sel},
                "template": {"metadata": {"labels": sel}, "spec": {"containers": [container]}},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(p, svc, "tracking"),
            "spec": {"selector": sel, "ports": [{"name": "http", "port": MLFLOW_PORT, "targetPort": "http"}]},
        },
    ]


def prometheus_config(p: Project) -> Doc:
    """prometheus.yml: scrape the pods that ask for it (prometheus.io/* annotations); keep Argo's pod template
    hash as the `rollouts_pod_template_hash` label, which the AnalysisTemplate selects the canary by."""
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "scrape_configs": [
            {
                "job_name": "kollm",
                "kubernetes_sd_configs": [{"role": "pod"}],
                "relabel_configs": [
                    {
                        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
                        "action": "keep",
                        "regex": "true",
                    },
                    {
                        "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
                        "action": "keep",
                        "regex": p.slug,
                    },
                    {
                        "source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"],
                        "action": "replace",
                        "target_label": "__metrics_path__",
                        "regex": "(.+)",
                    },
                    {
                        "source_labels": ["__address__", "__meta_kubernetes_pod_annotation_prometheus_io_port"],
                        "action": "replace",
                        "regex": "([^:]+)(?::\\d+)?;(\\d+)",
                        "replacement": "$1:$2",
                        "target_label": "__address__",
                    },
                    {
                        "source_labels": ["__meta_kubernetes_pod_label_rollouts_pod_template_hash"],
                        "target_label": HASH_LABEL,
                    },
                    {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                ],
            }
        ],
    }


def prometheus_config_map(p: Project) -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(p, f"{p.slug}-prometheus", "monitoring"),
        "data": {"prometheus.yml": yaml_text(prometheus_config(p))},
    }


# --- all files -----------------------------------------------------------------------------------------------------


def render_k8s(p: Project) -> dict[str, list[Doc]]:
    files: dict[str, list[Doc]] = {"config.yaml": config_maps(p)}
    for s in training_steps(p):
        files[f"rayjob-{s.name}.yaml"] = [ray_job(p, s)]
    files["rayservice.yaml"] = [ray_service(p)]
    files["rollout.yaml"] = [rollout(p), serve_service(p)]
    files["analysis-template.yaml"] = [analysis_template(p)]
    files["mlflow.yaml"] = mlflow(p)
    files["prometheus.yaml"] = [prometheus_config_map(p)]
    return files


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # shared sub-dicts are written out, never as &anchors
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str)


def yaml_text(doc: Any) -> str:
    """YAML with multi-line strings as literal blocks, keys in the order built, Korean kept readable."""
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=4096)


def yaml_docs(docs: list[Doc]) -> str:
    return "---\n".join(yaml_text(d) for d in docs)
