"""`kollm compile kfp`: the pipeline IR loads with kfp, parses into the PipelineSpec and PlatformSpec protos, and
carries kollm's wiring, resources, retries, caching and the RayJob of a Ray-sized step."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap

import pytest
import yaml

from tests.deploy.test_validate import crd_errors, needs_crds

pytest.importorskip("kfp", reason="kfp is not installed (pip install 'kollm[kfp]')")

from google.protobuf import json_format  # noqa: E402  (kfp brings the protobuf version it needs)

from kollm.deploy.command import SOURCE as STEP_COMMAND  # noqa: E402
from kollm.deploy.kfp import compile_kfp  # noqa: E402
from kollm.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def project(quickstart, tmp_path_factory):
    """The quickstart with sft on one GPU with retries, and cpt on two GPUs (so a RayJob)."""
    root = tmp_path_factory.mktemp("kfp") / "p"
    shutil.copytree(quickstart, root)
    text = (root / "kollm.yaml").read_text(encoding="utf-8")
    text = text.replace(
        "  - kind: sft\n",
        "  - kind: sft\n    retries: 2\n    retry_backoff_s: 5\n    resources: {gpus: 1, cpus: 4, memory: 16Gi}\n",
    )
    text = text.replace("  - kind: cpt\n", "  - kind: cpt\n    resources: {gpus: 2, cpus: 8, memory: 32Gi}\n")
    (root / "kollm.yaml").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def compiled(project, tmp_path_factory):
    return compile_kfp(project, tmp_path_factory.mktemp("ir") / "pipeline.yaml", image="registry.example/kollm:1")


def specs(path):
    from kfp.kubernetes import kubernetes_executor_config_pb2
    from kfp.pipeline_spec import pipeline_spec_pb2

    pipeline_doc, platform_doc = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    spec = json_format.ParseDict(pipeline_doc, pipeline_spec_pb2.PipelineSpec())  # unknown fields raise
    platform = json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec())
    assert "kubernetes" in platform.platforms
    executors = {  # each executor's Kubernetes config parses into kfp-kubernetes' proto
        name: json_format.ParseDict(cfg, kubernetes_executor_config_pb2.KubernetesExecutorConfig())
        for name, cfg in platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items()
    }
    return spec, executors


def test_ir_loads_with_kfp_and_parses_into_the_protos(compiled):
    from kfp import components

    component = components.load_component_from_file(str(compiled))
    assert component.name == "korean-quickstart"
    spec, executors = specs(compiled)
    tasks = spec.root.dag.tasks
    assert set(tasks) == {
        "step-prepare-corpus",
        "step-prepare-sft",
        "step-prepare-prefs",
        "rayjob-cpt",
        "step-sft",
        "step-align",
        "step-evaluate",
        "step-register",
    }
    assert len(executors) == 8
    assert all(e.secret_as_env[0].secret_name == "kollm-s3" for e in executors.values())


def test_outputs_flow_between_components_as_uri_parameters(compiled):
    spec, _ = specs(compiled)
    sft = spec.root.dag.tasks["step-sft"]
    model = sft.inputs.parameters["in_model"].task_output_parameter
    assert (model.producer_task, model.output_parameter_key) == ("rayjob-cpt", "model")
    data = spec.root.dag.tasks["step-prepare-corpus"].inputs.parameters["in_source"]
    assert data.component_input_parameter == "data_corpus"
    assert (
        spec.root.input_definitions.parameters["data_corpus"].default_value.string_value == ""
    )  # read as kollm.yaml names it
    outs = spec.components["comp-step-evaluate"].output_definitions.parameters
    assert set(outs) == {"metrics", "report", "kollm_outputs"} and all(
        o.parameter_type == 3 for o in outs.values()
    )  # STRING


def test_each_component_runs_one_step_attempt_with_explicit_inputs(compiled):
    spec, _ = specs(compiled)
    container = json_format.MessageToDict(spec.deployment_spec)["executors"]["exec-step-sft"]["container"]
    assert container["image"] == "registry.example/kollm:1"
    source = "\n".join(container["command"])
    # the command line comes from the one builder the Airflow DAG carries too (tests/deploy/test_command.py)
    assert textwrap.indent(STEP_COMMAND, "    ") in source
    assert (
        """cmd = step_command([sys.executable, "-m", "kollm.cli"], str(config), 'sft', """
        """{"data": in_data, "model": in_model}, 0, str(out), store)"""
    ) in source
    assert "pip install" in source and "'kfp==" in source  # the image gets the kfp it runs the component with


def test_resources_retries_and_caching(compiled):
    spec, _ = specs(compiled)
    executors = json_format.MessageToDict(spec.deployment_spec)["executors"]
    res = executors["exec-step-sft"]["container"]["resources"]
    assert res["resourceCpuLimit"] == "4" and res["resourceMemoryLimit"] == "16Gi"
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and res["accelerator"]["resourceCount"] == "1"
    sft = spec.root.dag.tasks["step-sft"]
    assert sft.retry_policy.max_retry_count == 2 and sft.retry_policy.backoff_duration.seconds == 5
    assert sft.retry_policy.backoff_factor == 2.0
    assert sft.caching_options.enable_cache  # its inputs are content-addressed URIs: KFP may reuse it
    assert not spec.root.dag.tasks["step-prepare-corpus"].caching_options.enable_cache  # reads a raw data URI
    assert not spec.root.dag.tasks["step-evaluate"].caching_options.enable_cache  # reads the eval suite


@needs_crds
def test_ray_sized_step_submits_a_valid_rayjob(compiled):
    spec, _ = specs(compiled)
    cpt = spec.root.dag.tasks["rayjob-cpt"]
    job = json.loads(cpt.inputs.parameters["rayjob_manifest"].runtime_value.constant.string_value)
    assert job["kind"] == "RayJob" and job["spec"]["suspend"] is False and job["spec"]["entrypointNumGpus"] == 2
    assert (
        "kollm step run kollm.yaml --step cpt" in job["spec"]["entrypoint"]
        and "KOLLM_RESULT_URI" in job["spec"]["entrypoint"]
    )
    assert crd_errors(job) == []
    source = "\n".join(
        json_format.MessageToDict(spec.deployment_spec)["executors"]["exec-rayjob-cpt"]["container"]["command"]
    )
    assert "create_namespaced_custom_object" in source and '"SUCCEEDED"' in source


def test_unknown_ray_step_and_cli(project, tmp_path, kollm_bin):
    with pytest.raises(ConfigError, match="--ray: no step named 'nope'"):
        compile_kfp(project, tmp_path / "x.yaml", image="i", ray_steps=("nope",))
    r = subprocess.run(
        [
            kollm_bin,
            "compile",
            "kfp",
            str(project),
            "-o",
            str(tmp_path / "p.yaml"),
            "--image",
            "kollm:2",
            "--ray",
            "sft",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    spec, _ = specs(tmp_path / "p.yaml")
    assert "rayjob-sft" in spec.root.dag.tasks


@pytest.mark.slow(reason="kfp.local runs the whole quickstart, a process per step")
@pytest.mark.timeout(1800)
def test_kfp_local_runs_the_quickstart_with_the_digests_of_kollm_run(tmp_path, quickstart_run):
    """The Korean quickstart (3 prepare steps, cpt, sft, align, evaluate, register), once with `kollm run` and once
    compiled and run by kfp.local (a process per component), each in its own folder and registry: every output of
    every step has the same content digest."""
    import kfp.local
    from kfp import components

    from kollm.examples import init_project

    _, expected = quickstart_run
    project = init_project(tmp_path / "kfp", "korean-quickstart")  # the same files, no cache, its own registry
    # this interpreter has kfp: no `pip install kfp` before each of the eight components (seconds each)
    compiled = compile_kfp(
        project, tmp_path / "pipeline.yaml", image="unused-by-the-subprocess-runner", install_kfp_package=False
    )
    assert "pip install" not in compiled.read_text(encoding="utf-8")
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    pipeline = components.load_component_from_file(str(compiled))
    pipeline(project_dir=str(project), store=str(tmp_path / "store"))  # raw data: as kollm.yaml names it
    results = {
        f.parent.name.removeprefix("step-"): json.loads(f.read_text())
        for f in (tmp_path / "root").rglob("executor_output.json")
    }
    assert set(results) == set(expected.steps)
    for name, rec in expected.steps.items():
        got = json.loads(results[name]["parameterValues"]["kollm_outputs"])
        assert {o: v["digest"] for o, v in got["outputs"].items()} == {o: a.digest for o, a in rec.outputs.items()}, (
            name
        )


def test_kfp_without_kfp_kubernetes_is_one_message(tmp_path):
    """Found: with `kfp` installed but not `kfp-kubernetes`, `kollm compile kfp` printed an ImportError traceback."""
    import sys

    from kollm.examples import init_project

    root = init_project(tmp_path / "q")
    script = (
        "import sys\nsys.modules['kfp.kubernetes'] = None  # as if kfp-kubernetes were not installed\n"
        f"from kollm.cli import main\nsys.argv = ['kollm', 'compile', 'kfp', {str(root)!r}, '-o', {str(tmp_path / 'p.yaml')!r}]\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "kfp-kubernetes" in r.stderr and "pip install 'kollm[kfp]'" in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3 and not (tmp_path / "p.yaml").exists()
