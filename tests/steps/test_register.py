"""The register step through the runner: lineage tags, the challenger alias, loading in plain MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from tests.steps.evalproject import make_project

import kollm
from kollm import registry
from kollm.errors import GateFailed


def check_registered(project: Path, result) -> None:
    v = registry.show("evaltest", "challenger", project)
    assert v.version == "1" and v.aliases == ("challenger",)
    prep = result.steps["prep"].outputs["dataset"]
    # the tags lead back to the prepared dataset, the pipeline run and every step run
    assert v.tags["kollm.data.prep.dataset"] == prep.digest
    assert json.loads(v.tags["kollm.data"]) == {"prep.dataset": {"type": "corpus", "digest": prep.digest}}
    assert v.tags["kollm.pipeline_run_id"] == result.run_id
    assert json.loads(v.tags["kollm.step_runs"]) == {n: result.steps[n].run_id for n in ("prep", "build", "evaluate")}
    assert v.tags["kollm.step_run_id"] == result.steps["register"].run_id == v.run_id
    assert v.tags["kollm.model_digest"] == result.steps["build"].outputs["model"].digest
    assert v.tags["kollm.gate"] == "passed" and "PASS: perplexity" in v.tags["kollm.gate.reasons"]
    evaluated = json.loads((result.steps["evaluate"].outputs["metrics"].path / "metrics.json").read_text())["metrics"]
    assert float(v.tags["kollm.metric.perplexity"]) == pytest.approx(evaluated["perplexity"], rel=1e-5)
    # the dataset digest is the one the prepare step's MLflow run recorded
    prep_run = registry.client(project).get_run(result.steps["prep"].run_id)
    assert prep_run.data.tags["kollm.output.dataset.digest"] == prep.digest
    # ... and to the raw files it read
    assert v.tags["kollm.source.prep.source"] == prep_run.data.tags["kollm.input.source.digest"]
    assert v.tags["kollm.source.prep.source"].startswith("sha256:")
    # kollm resolves the alias to the very files the pipeline built
    folder = registry.resolve_model_uri("models:/evaltest@challenger", project)
    built = result.steps["build"].outputs["model"].path
    assert (folder / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    record = json.loads((result.steps["register"].outputs["registration"].path / "registration.json").read_text())
    assert record["model_uri"] == "models:/evaltest@challenger" and record["version"] == "1"


def check_mlflow_conventions(project: Path, result) -> None:
    """What MLflow's UI shows a new user: a training ("Machine learning") experiment, runs with a user and a source,
    and the register step's run with its model (both flavors, a signature) registered from it."""
    import getpass

    import yaml

    c = registry.client(project)
    experiment = c.get_experiment_by_name("evaltest")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = [c.get_run(result.run_id), *(c.get_run(r.run_id) for r in result.steps.values())]
    for run in runs:
        assert run.data.tags["mlflow.user"] == run.info.user_id == getpass.getuser()
        assert run.data.tags["mlflow.source.type"] == "LOCAL"
        assert run.data.tags["mlflow.source.name"] == str((project / "kollm.yaml").resolve())
    v = registry.show("evaltest", "challenger", project)
    register_run = c.get_run(result.steps["register"].run_id)
    (output,) = register_run.outputs.model_outputs
    assert v.source == f"models:/{output.model_id}" and c.get_logged_model(output.model_id).source_run_id == v.run_id
    folder = Path(c.get_model_version_download_uri("evaltest", v.version).removeprefix("file://"))
    spec = yaml.safe_load((folder / "MLmodel").read_text())
    assert set(spec["flavors"]) == {"python_function", "transformers"} and spec["signature"]["inputs"]
    assert spec["saved_input_example_info"]["serving_input_path"] == "serving_input_example.json"


def test_register_through_the_runner(tmp_path):
    project = make_project(tmp_path / "p", gate=["perplexity <= 100000"])
    result = kollm.run(project)
    check_registered(project, result)

    uri = registry.tracking_uri(project)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/evaltest@challenger")  # plain MLflow, no kollm code involved
    assert len(model.predict(["서울은"], params={"max_new_tokens": 3})) == 1
    check_mlflow_conventions(project, result)

    again = kollm.run(project)  # unchanged: register is a cache hit, no second version
    assert again.steps["register"].cache_hit
    assert [v.version for v in registry.list_versions("evaltest", project)] == ["1"]


def test_register_refuses_a_failed_evaluation(tmp_path):
    project = make_project(tmp_path / "p", gate=["perplexity <= 100000"])
    (project / "fakeeval.py").write_text(
        "import json\n"
        "def failed(ctx):\n"
        "    doc = {'metrics': {'perplexity': 99.0}, 'gate': {'passed': False, 'reasons': ['FAIL: perplexity = 99, needs <= 40']}}\n"
        "    (ctx.output_path('m') / 'metrics.json').write_text(json.dumps(doc))\n"
    )
    text = (project / "kollm.yaml").read_text()
    text = text.replace(
        "  - kind: register\n",
        "  - kind: python\n    name: fake\n    config: {callable: 'fakeeval:failed', outputs: {m: metrics}}\n"
        "  - kind: register\n    inputs: {metrics: fake}\n",
    )
    (project / "kollm.yaml").write_text(text)
    with pytest.raises(GateFailed, match="refusing to register:\n  FAIL: perplexity = 99, needs <= 40"):
        kollm.run(project)
    assert registry.list_models(project) == []


@pytest.mark.postgres
def test_register_through_the_runner_on_postgres(tmp_path, postgres_uri):
    project = make_project(tmp_path / "p", gate=["perplexity <= 100000"], uri=postgres_uri)
    result = kollm.run(project)
    check_registered(project, result)
    assert not (project / ".kollm" / "mlflow.db").exists()


@pytest.mark.slow(reason="needs the session's quickstart run (the first test that does pays for it)")
def test_quickstart_registers_a_version_that_leads_back_to_its_data(quickstart_run):
    project, result = quickstart_run
    v = registry.show("korean-quickstart", "challenger", project)
    for prep in ("prepare-corpus", "prepare-sft", "prepare-prefs"):
        assert v.tags[f"kollm.data.{prep}.dataset"] == result.steps[prep].outputs["dataset"].digest
    assert v.tags["kollm.pipeline_run_id"] == result.run_id
    assert v.tags["kollm.model_digest"] == result.steps["align"].outputs["model"].digest
    assert v.tags["kollm.base_model"] == "scratch" and v.tags["kollm.gate"] == "passed"
    doc = json.loads((result.steps["evaluate"].outputs["metrics"].path / "metrics.json").read_text())
    assert [o["status"] for o in doc["gate"]["outcomes"]] == ["pass", "pass", "skip"]  # no champion yet
    html = (result.steps["evaluate"].outputs["report"].path / "report.html").read_text()
    assert all(f"<h3>{step}</h3>" in html for step in ("cpt", "sft", "align"))  # loss curves of each training step

    # after a promotion the evaluation compares with the champion (here: the same model, so the rule holds)
    registry.promote("korean-quickstart", reason="first release", project_dir=project)
    again = kollm.run(project, force=["evaluate"])
    doc = json.loads((again.steps["evaluate"].outputs["metrics"].path / "metrics.json").read_text())
    assert doc["references"]["champion"]["version"] == "1"
    assert doc["gate"]["outcomes"][2]["status"] == "pass"
