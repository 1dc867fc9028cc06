"""KServe manifests from kollm.yaml: a ServingRuntime running `kollm serve` (OpenAI routes, /metrics), an
InferenceService (serving.kserve.io/v1beta1) on it, the same InferenceService with the challenger as its canary
(`canaryTrafficPercent`), and an LLMInferenceService variant on vLLM.

KServe's canary: the InferenceService's latest spec is the canary revision and takes `canaryTrafficPercent` of the
traffic, the last fully rolled-out revision the rest. `canary_patches` prints the `kubectl patch` per step.
"""

from __future__ import annotations

import json

from kollm.deploy.k8s import Doc, kollm_env, meta, resources
from kollm.deploy.options import Project

KSERVE_PORT = 8080  # the port KServe routes to in its kserve-container
VLLM_PORT = 8000  # the port an LLMInferenceService's main container serves on
MODEL_FORMAT = "kollm"
VERSION_ENV = "KOLLM_MODEL_VERSION"


def runtime_name(p: Project) -> str:
    return f"{p.slug}-kollm"


def serving_runtime(p: Project) -> Doc:
    """`kollm serve models:/NAME/$(KOLLM_MODEL_VERSION)`: the version comes from the InferenceService's model env."""
    env, env_from = kollm_env(p)
    container = {
        "name": "kserve-container",
        "image": p.options.image,
        "args": [
            "serve",
            f"models:/{p.name}/$({VERSION_ENV})",
            "--host",
            "0.0.0.0",
            "--port",
            str(KSERVE_PORT),
            "--backend",
            p.backend,
            "--served-model-name",
            p.name,
        ],
        "env": [{"name": VERSION_ENV, "value": p.options.model_version}] + env,
        "envFrom": env_from,
        "ports": [{"containerPort": KSERVE_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": KSERVE_PORT}, "periodSeconds": 5},
        "resources": resources(2, "8Gi", p.options.serve_gpus),
    }
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": meta(p, runtime_name(p), "serving"),
        "spec": {
            "annotations": {"prometheus.kserve.io/port": str(KSERVE_PORT), "prometheus.kserve.io/path": "/metrics"},
            "supportedModelFormats": [{"name": MODEL_FORMAT, "version": "1", "autoSelect": True}],
            "protocolVersions": ["v1"],
            "containers": [container],
        },
    }


def inference_service(p: Project, version: str, canary_percent: int | None = None) -> Doc:
    """The InferenceService serving registered VERSION; with CANARY_PERCENT, as the canary of the revision before."""
    predictor: Doc = {"minReplicas": 1, "maxReplicas": p.options.serve_replicas}
    if canary_percent is not None:
        predictor["canaryTrafficPercent"] = canary_percent
    predictor["model"] = {
        "modelFormat": {"name": MODEL_FORMAT, "version": "1"},
        "runtime": runtime_name(p),
        "env": [{"name": VERSION_ENV, "value": version}],
        "resources": resources(2, "8Gi", p.options.serve_gpus),
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": meta(p, p.slug, "serving")
        | {
            "annotations": {
                "serving.kserve.io/deploymentMode": "Serverless",  # canaryTrafficPercent needs Knative revisions
                "serving.kserve.io/enable-prometheus-scraping": "true",
            }
        },
        "spec": {"predictor": predictor},
    }


def llm_inference_service(p: Project) -> Doc:
    """vLLM (kollm's CUDA image, `--backend vllm`) on the model folder KServe's storage initializer puts in
    /mnt/models from `model.uri`; routed through the Gateway API with KServe's scheduler."""
    env, env_from = kollm_env(p)
    gpus = max(1, p.options.serve_gpus)
    container = {
        "name": "main",
        "image": p.options.image,
        "args": [
            "serve",
            "/mnt/models",
            "--host",
            "0.0.0.0",
            "--port",
            str(VLLM_PORT),
            "--backend",
            "vllm",
            "--served-model-name",
            p.name,
        ],
        "env": env,
        "envFrom": env_from,
        "ports": [{"containerPort": VLLM_PORT, "protocol": "TCP"}],
        "resources": resources(4, "32Gi", gpus),
    }
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "LLMInferenceService",
        "metadata": meta(p, f"{p.slug}-vllm", "serving"),
        "spec": {
            "model": {"uri": p.llm_model_uri, "name": p.name},
            "replicas": 1,
            "router": {"route": {}, "gateway": {}, "scheduler": {}},
            "template": {"containers": [container]},
        },
    }


def render_kserve(p: Project) -> dict[str, list[Doc]]:
    return {
        "servingruntime.yaml": [serving_runtime(p)],
        "inferenceservice.yaml": [inference_service(p, p.options.model_version)],
        "inferenceservice-canary.yaml": [
            inference_service(p, p.options.canary_version, int(p.weights[0]) if p.weights else None)
        ],
        "llminferenceservice.yaml": [llm_inference_service(p)],
    }


def patch_line(p: Project, patch: Doc, namespace: str = "") -> str:
    ns = f" -n {namespace}" if namespace else ""
    return f"kubectl patch inferenceservice {p.slug}{ns} --type merge -p '{json.dumps(patch, separators=(',', ':'))}'"


def canary_patches(p: Project, version: str, namespace: str = "") -> list[tuple[str, str]]:
    """(what, `kubectl patch` line) for each step of the canary of registered VERSION, then promote and rollback.
    The first step also switches the model to VERSION (a new revision); later ones move only the traffic."""
    out = []
    for i, w in enumerate(p.weights):
        predictor: Doc = {"canaryTrafficPercent": int(w)}
        if i == 0:
            predictor["model"] = {"env": [{"name": VERSION_ENV, "value": version}]}
        out.append((f"step {i + 1}: {int(w)} %", patch_line(p, {"spec": {"predictor": predictor}}, namespace)))
    out.append(("promote", patch_line(p, {"spec": {"predictor": {"canaryTrafficPercent": 100}}}, namespace)))
    out.append(("rollback", patch_line(p, {"spec": {"predictor": {"canaryTrafficPercent": 0}}}, namespace)))
    return out
