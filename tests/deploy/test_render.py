"""`kollm deploy render`: the committed examples under deploy/ are what the renderer writes today, the command
line works, and bad options get one clear message. Regenerate deploy/ with `python tests/deploy/test_render.py`."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from kollm.deploy import TARGETS, DeployOptions, render, render_files
from kollm.errors import ConfigError
from tests.deploy.conftest import REPO, render_examples


def committed(target: str) -> dict[str, str]:
    root = REPO / "deploy" / target
    return {str(f.relative_to(root)): f.read_text(encoding="utf-8") for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("target", TARGETS)
def test_committed_examples_are_up_to_date(examples, target):
    assert committed(target) == examples[target], f"deploy/{target} is stale: run `python tests/deploy/test_render.py`"


def test_k8s_has_one_rayjob_per_training_step_and_the_serving_objects(examples):
    files = examples["k8s"]
    kinds = {name: [d["kind"] for d in yaml.safe_load_all(text)] for name, text in files.items()}
    assert {n for n in kinds if n.startswith("rayjob-")} == {"rayjob-cpt.yaml", "rayjob-sft.yaml", "rayjob-align.yaml"}
    flat = sorted(k for ks in kinds.values() for k in ks)
    assert flat.count("RayJob") == 3 and "RayService" in flat and "Rollout" in flat and "AnalysisTemplate" in flat
    assert "Secret" not in flat  # referenced by name, never rendered


def test_rayjob_runs_one_step_with_explicit_inputs_into_the_store(examples):
    job = yaml.safe_load(examples["k8s"]["rayjob-sft.yaml"])
    entry = job["spec"]["entrypoint"]
    assert "kollm step run kollm.yaml --step sft" in entry
    assert '--input data="$KOLLM_INPUT_DATA"' in entry and '--input model="$KOLLM_INPUT_MODEL"' in entry
    assert "--store s3://kollm/korean-quickstart" in entry and "--outputs-json" in entry
    inputs = [
        d for d in yaml.safe_load_all(examples["k8s"]["config.yaml"]) if d["metadata"]["name"].endswith("step-inputs")
    ][0]
    assert set(inputs["data"]) == {"cpt.data", "sft.data", "sft.model", "align.data", "align.model"}


def test_the_clusters_kollm_yaml_is_valid_and_sends_artifacts_through_the_server(examples, quickstart, tmp_path):
    from kollm.config import load_config

    cm = next(d for d in yaml.safe_load_all(examples["k8s"]["config.yaml"]) if "kollm.yaml" in d["data"])
    (tmp_path / "kollm.yaml").write_text(cm["data"]["kollm.yaml"], encoding="utf-8")
    cluster, _ = load_config(tmp_path)
    original, _ = load_config(quickstart)
    assert cluster.tracking.artifact_location == "mlflow-artifacts:/korean-quickstart"
    assert cluster.steps == original.steps and cluster.data == original.data


def test_dockerfiles_install_torch_first_and_copy_what_the_source_tree_has(examples):
    for name, text in examples["docker"].items():
        lines = text.splitlines()
        torch = next(i for i, line in enumerate(lines) if "pip install torch==2.13.0" in line)
        kollm = next(i for i, line in enumerate(lines) if 'pip install ".[ray,s3,json]"' in line)
        assert torch < kollm, name
        for line in lines:
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (REPO / src).exists(), f"{name}: COPY {src} is not in the source tree"
    assert "--index-url https://download.pytorch.org/whl/cpu" in examples["docker"]["Dockerfile"]
    assert "whl/cpu" not in examples["docker"]["Dockerfile.cuda"]


def test_kserve_serves_the_champion_through_kollm_with_the_challenger_as_canary(examples):
    runtime = yaml.safe_load(examples["kserve"]["servingruntime.yaml"])
    container = runtime["spec"]["containers"][0]
    assert container["args"][:2] == ["serve", "models:/korean-quickstart/$(KOLLM_MODEL_VERSION)"]
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/path"] == "/metrics"
    champion = yaml.safe_load(examples["kserve"]["inferenceservice.yaml"])["spec"]["predictor"]
    canary = yaml.safe_load(examples["kserve"]["inferenceservice-canary.yaml"])["spec"]["predictor"]
    assert "canaryTrafficPercent" not in champion and canary["canaryTrafficPercent"] == 20
    assert champion["model"]["env"] == [{"name": "KOLLM_MODEL_VERSION", "value": "1"}]
    assert canary["model"]["env"] == [{"name": "KOLLM_MODEL_VERSION", "value": "2"}]
    llm = yaml.safe_load(examples["kserve"]["llminferenceservice.yaml"])
    assert llm["spec"]["model"]["uri"] == "s3://kollm/korean-quickstart/hf/champion"
    main = llm["spec"]["template"]["containers"][0]
    assert main["args"][:2] == ["serve", "/mnt/models"] and "vllm" in main["args"]
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_the_readmes_kserve_walk_is_what_the_command_prints(quickstart):
    r = subprocess.run(
        [str(Path(sys.executable).parent / "kollm"), "deploy", "kserve-canary", "4", "--steps", "20,50"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=quickstart,
    )
    assert r.returncode == 0, r.stderr
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("kollm deploy kserve-canary 4 --steps 20,50", 1)[1].split("```", 1)[0]
    assert block.splitlines()[1:] == r.stdout.splitlines()


def test_kserve_versions_must_be_numbers(quickstart, tmp_path):
    with pytest.raises(ConfigError, match="--canary-version: 'latest'"):
        render_files(quickstart, "kserve", tmp_path, DeployOptions(canary_version="latest"))


def test_rayservice_runs_the_openai_app_in_builder_form(examples):
    svc = yaml.safe_load(examples["k8s"]["rayservice.yaml"])
    app = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "kollm.serve.ray_serve:build_app"
    assert app["args"] == {"model": "models:/korean-quickstart@champion", "backend": "transformers"}


def test_rollout_steps_and_analysis_follow_the_options(quickstart, tmp_path):
    opts = DeployOptions(
        steps="10,50", pause="90s", analysis="error_rate<0.01,p99_ms<=800", failure_limit=3, serve_gpus=1
    )
    files = render_files(quickstart, "k8s", tmp_path, opts)
    rollout = yaml.safe_load_all(files["rollout.yaml"]).__next__()
    assert rollout["spec"]["strategy"]["canary"]["steps"] == [
        {"setWeight": 10},
        {"pause": {"duration": "90s"}},
        {"setWeight": 50},
        {"pause": {"duration": "90s"}},
    ]
    tpl = yaml.safe_load(files["analysis-template.yaml"])
    metrics = {m["name"]: m for m in tpl["spec"]["metrics"]}
    assert set(metrics) == {"error-rate", "p99-ms"}
    assert metrics["error-rate"]["successCondition"] == "result[0] < 0.01"
    assert metrics["p99-ms"]["failureCondition"] == "result[0] > 800"
    assert all(m["failureLimit"] == 2 and m["interval"] == "90s" for m in metrics.values())
    container = rollout["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["args"][container["args"].index("--backend") + 1] == "auto"  # what `kollm serve` picks on a GPU


def test_render_writes_files_and_the_cli_reports_them(quickstart, tmp_path, kollm_bin):
    written = render(quickstart, "compose", tmp_path / "c")
    assert {p.relative_to(tmp_path / "c").as_posix() for p in written} >= {"compose.yaml", "promtail/config.yml"}
    r = subprocess.run(
        [kollm_bin, "deploy", "render", str(quickstart), "--target", "k8s", "-o", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "k" / "rayjob-cpt.yaml").exists() and "wrote" in r.stdout


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"steps": "40,20"}, "--steps: '40,20'; give increasing whole percentages"),
        ({"analysis": "succes_rate>=0.9"}, "did you mean 'success_rate'"),
        ({"analysis": "probe_pass_rate>=0.8"}, "probe_pass_rate needs kollm's gateway"),
        ({"pause": "soon"}, "--pause: 'soon' is not a duration"),
    ],
)
def test_bad_options_get_one_clear_message(quickstart, tmp_path, options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        render(quickstart, "k8s", tmp_path, DeployOptions(**options))


def test_a_bad_target_on_the_command_line_exits_2_without_a_traceback(quickstart, tmp_path, kollm_bin):
    r = subprocess.run(
        [kollm_bin, "deploy", "render", str(quickstart), "-o", str(tmp_path), "--target", "helm"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "--target: expected one of k8s, kserve, github, compose, docker" in r.stderr and "Traceback" not in r.stderr


def test_a_broken_project_is_reported_not_rendered(tmp_path):
    (tmp_path / "kollm.yaml").write_text("project: x\nsteps:\n  - kind: cpt\n    confg: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="confg"):
        render(tmp_path, "k8s", tmp_path / "out")
    assert not (tmp_path / "out").exists()


if __name__ == "__main__":  # regenerate deploy/ from the korean-quickstart
    import shutil

    with tempfile.TemporaryDirectory() as tmp:
        for target, files in render_examples(Path(tmp)).items():
            dest = REPO / "deploy" / target
            shutil.rmtree(dest, ignore_errors=True)
            for name, text in files.items():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                (dest / name).write_text(text, encoding="utf-8")
            print(f"wrote {dest}", file=sys.stderr)
