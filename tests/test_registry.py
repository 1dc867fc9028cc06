"""The registry against real MLflow stores (SQLite, and PostgreSQL with @pytest.mark.postgres)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from tests.tiny import save_tiny

from kollm import registry
from kollm.errors import KollmError, NotFound


def make_project(root: Path, uri: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tracking = f"tracking: {{uri: '{uri}'}}\n" if uri else ""
    (root / "kollm.yaml").write_text(
        f"project: reg-test\n{tracking}steps:\n  - kind: python\n    config: {{callable: 'm:f'}}\n"
    )
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def new_run(project: Path) -> str:
    c = registry.client(project)
    exp = c.get_experiment_by_name("reg-test")
    exp_id = (
        exp.experiment_id
        if exp
        else c.create_experiment("reg-test", artifact_location=(project / "mlartifacts").as_uri())
    )
    return c.create_run(exp_id).info.run_id


def register(project: Path, folder: Path, name: str = "tiny", **tags: str) -> registry.VersionInfo:
    return registry.register_folder(name, folder, run_id=new_run(project), tags=tags, project_dir=project)


def test_register_loads_in_plain_mlflow_and_resolves_to_hf_folder(tmp_path, tiny_folder):
    project = make_project(tmp_path / "p")
    v = register(project, tiny_folder, **{"kollm.data.prepare.data": "sha256:abc"})
    assert v.version == "1" and v.aliases == ("challenger",)
    assert v.tags["kollm.data.prepare.data"] == "sha256:abc"

    uri = registry.tracking_uri(project)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/tiny@challenger")
    out = model.predict(["안녕하세요", "서울은"], params={"max_new_tokens": 4})
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    chat = model.predict([[{"role": "user", "content": "안녕?"}]], params={"max_new_tokens": 3})
    assert len(chat) == 1

    folder = registry.resolve_model_uri("models:/tiny@challenger", project)
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert folder.is_relative_to(project / ".kollm" / "models")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(folder).config.hidden_size == 32
    # the same version resolves to the same downloaded folder; by number too
    assert registry.resolve_model_uri("models:/tiny@challenger", project) == folder
    assert registry.resolve_model_uri("models:/tiny/1", project) == folder
    # runs:/ and local folders
    run_folder = registry.resolve_model_uri(f"runs:/{v.run_id}/model", project)
    assert (run_folder / "model.safetensors").is_file()
    assert registry.resolve_model_uri(str(tiny_folder), project) == tiny_folder.resolve()


def test_registered_model_has_transformers_flavor_signature_and_example(tmp_path, tiny_folder):
    """One MLflow logged model, listed under its run (the UI's Models column), with kollm's pyfunc and the
    transformers flavor over a single copy of the weights, a signature and an input example; it loads offline
    through mlflow.transformers and pyfunc, and MLflow's scoring server (`mlflow models serve`) answers with it."""
    import yaml
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    project = make_project(tmp_path / "p")
    v = register(project, tiny_folder)
    c = registry.client(project)
    model_id = v.source.removeprefix("models:/")
    assert v.source.startswith("models:/m-")
    logged = c.get_logged_model(model_id)
    assert logged.name == "model" and logged.source_run_id == v.run_id and logged.status.to_int() == 2  # READY
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "tiny", "version": "1"}]
    assert [o.model_id for o in c.get_run(v.run_id).outputs.model_outputs] == [model_id]
    found = c.search_logged_models([c.get_run(v.run_id).info.experiment_id], filter_string="name = 'model'")
    assert [m.model_id for m in found] == [model_id]

    folder = Path(c.get_model_version_download_uri("tiny", "1").removeprefix("file://"))
    spec = yaml.safe_load((folder / "MLmodel").read_text())
    assert set(spec["flavors"]) == {"python_function", "transformers"}
    hf = spec["flavors"]["python_function"]["artifacts"]["hf_model"]["path"]
    flavor = spec["flavors"]["transformers"]
    assert flavor["task"] == "text-generation" and flavor["model_binary"] == hf  # the weights once, for both
    assert flavor["pipeline_model_type"] == "LlamaForCausalLM" and flavor["components"] == ["tokenizer"]
    assert [p.relative_to(folder) for p in folder.rglob("model.safetensors")] == [Path(hf) / "model.safetensors"]
    weights = (tiny_folder / "model.safetensors").stat().st_size
    tokenizer = sum(p.stat().st_size for p in (folder / "components" / "tokenizer").iterdir())
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != "MLmodel")
    assert total == spec["model_size_bytes"] and total < weights + 2 * tokenizer + 10_000  # no second copy of weights
    assert json.loads(spec["signature"]["inputs"]) == [{"type": "any", "required": True}]
    assert json.loads(spec["signature"]["outputs"]) == [{"type": "string", "required": True}]
    assert [p["name"] for p in json.loads(spec["signature"]["params"])] == ["max_new_tokens", "batch_size"]
    example = json.loads((folder / spec["saved_input_example_info"]["serving_input_path"]).read_text())
    assert example == {"inputs": ["서울은 대한민국의"], "params": {"max_new_tokens": 32}}

    uri = registry.tracking_uri(project)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    pipe = mlflow.transformers.load_model("models:/tiny@challenger")
    assert type(pipe).__name__ == "TextGenerationPipeline"
    out = pipe("서울은", max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"].startswith("서울은")
    components = mlflow.transformers.load_model("models:/tiny@challenger", return_type="components")
    assert components["model"].config.hidden_size == 32 and components["tokenizer"].chat_template

    model = mlflow.pyfunc.load_model("models:/tiny@challenger")
    chat = [{"role": "system", "content": "짧게"}, {"role": "user", "content": "안녕?"}]
    rows = model.predict([chat, {"messages": chat}, {"prompt": "서울은"}, "서울은"], params={"max_new_tokens": 3})
    assert len(rows) == 4 and rows[0] == rows[1] and rows[2] == rows[3]  # a whole conversation per row
    server = TestClient(scoring_server.init(model))
    answer = server.post("/invocations", json=example)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
    answer = server.post("/invocations", json={"inputs": [chat], "params": {"max_new_tokens": 3}})
    assert answer.status_code == 200 and answer.json()["predictions"] == rows[:1]


def test_resolve_errors_name_what_exists(tmp_path, tiny_folder):
    project = make_project(tmp_path / "p")
    with pytest.raises(NotFound, match="no registered model 'tiny'"):
        registry.resolve_model_uri("models:/tiny@champion", project)
    register(project, tiny_folder)
    with pytest.raises(NotFound, match="no alias 'champion'") as e:
        registry.resolve_model_uri("models:/tiny@champion", project)
    assert "challenger -> v1" in str(e.value)
    with pytest.raises(NotFound, match="no version 7"):
        registry.resolve_model_uri("models:/tiny/7", project)
    with pytest.raises(NotFound, match="no folder"):
        registry.resolve_model_uri("does/not/exist", project)
    with pytest.raises(NotFound, match="no MLflow run"):
        registry.resolve_model_uri("runs:/0123456789abcdef/model", project)
    with pytest.raises(NotFound, match="cannot parse"):
        registry.resolve_model_uri("models:/tiny", project)
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(NotFound, match="not a Hugging Face model"):
        registry.resolve_model_uri(str(not_a_model), project)


def alias_flow(project: Path, folder: Path) -> None:
    """register -> promote -> register -> promote -> rollback, checking aliases and the audit trail."""
    with pytest.raises(NotFound, match="no registered model"):
        registry.promote("tiny", project_dir=project)
    register(project, folder)
    with pytest.raises(NotFound, match="no 'previous'"):
        registry.rollback("tiny", reason="nothing to roll back", project_dir=project)

    first = registry.promote("tiny", reason="first release", project_dir=project)
    assert (first.champion, first.previous) == ("1", None)
    assert registry.show("tiny", "champion", project).aliases == ("champion",)  # challenger consumed
    with pytest.raises(NotFound, match="no 'challenger'"):
        registry.promote("tiny", project_dir=project)
    with pytest.raises(KollmError, match="already the champion"):
        registry.promote("tiny", version=1, project_dir=project)

    register(project, folder)  # v2 -> challenger
    assert registry.show("tiny", "@challenger", project).version == "2"
    move = registry.promote("tiny", reason="canary passed: success 0.99", project_dir=project)
    assert (move.champion, move.previous, move.replaced) == ("2", "1", "1")
    versions = {v.version: v for v in registry.list_versions("tiny", project)}
    assert list(versions) == ["2", "1"]
    assert versions["2"].aliases == ("champion",) and versions["1"].aliases == ("previous",)
    assert versions["2"].tags["kollm.champion_reason"] == "canary passed: success 0.99"
    assert "kollm.champion_since" in versions["2"].tags

    back = registry.rollback("tiny", reason="p95 latency 2.3 s > 1 s", project_dir=project)
    assert (back.champion, back.replaced) == ("1", "2")
    versions = {v.version: v for v in registry.list_versions("tiny", project)}
    assert versions["1"].aliases == ("champion",) and versions["2"].aliases == ()
    assert versions["2"].tags["kollm.rolled_back_reason"] == "p95 latency 2.3 s > 1 s"
    assert versions["1"].tags["kollm.champion_reason"] == "p95 latency 2.3 s > 1 s"
    with pytest.raises(NotFound, match="no 'previous'"):
        registry.rollback("tiny", project_dir=project)

    trail = registry.audit_trail("tiny", project)
    assert [(e.action, e.alias, e.version, e.replaced) for e in trail] == [
        ("register", "challenger", "1", None),
        ("promote", "champion", "1", None),
        ("register", "challenger", "2", None),
        ("promote", "previous", "1", None),
        ("promote", "champion", "2", "1"),
        ("rollback", "champion", "1", "2"),
    ]
    assert trail[-1].reason == "p95 latency 2.3 s > 1 s" and trail[-1].at
    raw = registry.client(project).get_registered_model("tiny").tags
    assert json.loads(raw["kollm.audit.000005"])["action"] == "rollback"
    # kollm resolves the champion alias to v1's files after the rollback
    assert registry.resolve_model_uri("models:/tiny@champion", project).is_relative_to(project / ".kollm" / "models")
    assert "-v1-" in str(registry.resolve_model_uri("models:/tiny@champion", project))


def test_promote_and_rollback_sqlite(tmp_path, tiny_folder):
    alias_flow(make_project(tmp_path / "p"), tiny_folder)


@pytest.mark.postgres
def test_promote_and_rollback_postgres(tmp_path, tiny_folder, postgres_uri):
    project = make_project(tmp_path / "p", uri=postgres_uri)
    assert registry.tracking_uri(project).startswith("postgresql://")
    alias_flow(project, tiny_folder)
    assert not (project / ".kollm" / "mlflow.db").exists()


@pytest.mark.slow(reason="four `kollm` CLI processes (each imports torch and MLflow)")
def test_cli_promote_rollback_list_show(tmp_path, tiny_folder, kollm_bin):
    import subprocess

    project = make_project(tmp_path / "p")
    register(project, tiny_folder, name="reg-test")  # the project's name: commands default to it
    registry.promote("reg-test", reason="baseline", project_dir=project)
    register(project, tiny_folder, name="reg-test")

    def kollm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([kollm_bin, "registry", *args], cwd=project, capture_output=True, text=True, timeout=120)

    done = kollm("promote", "-m", "canary ok")  # the challenger (v2)
    assert done.returncode == 0, done.stderr
    assert "champion -> v2; previous -> v1" in done.stdout
    done = kollm("rollback", "reg-test", "--reason", "error rate 12%")
    assert done.returncode == 0 and "champion -> v1 (was v2)" in done.stdout
    shown = json.loads(kollm("show", "2", "--json").stdout)
    assert shown["aliases"] == [] and shown["tags"]["kollm.rolled_back_reason"] == "error rate 12%"
    assert [h["action"] for h in shown["history"]] == ["register", "promote", "rollback"]
    missing = kollm("rollback")
    assert missing.returncode == 4 and "no 'previous'" in missing.stderr and "Traceback" not in missing.stderr


def test_same_model_digest_registers_no_new_version_after_a_promote(tmp_path, tiny_folder):
    """An unchanged rerun (same model files) after `kollm registry promote` makes no new version and points no
    `challenger` at the champion; a version that holds no alias gets the alias back."""
    project = make_project(tmp_path / "p")
    v1 = register(project, tiny_folder, **{"kollm.model_digest": "sha256:same"})
    registry.promote("tiny", project_dir=project)
    again = register(project, tiny_folder, **{"kollm.model_digest": "sha256:same"})
    assert again.version == v1.version and again.aliases == ("champion",)
    assert [v.version for v in registry.list_versions("tiny", project)] == ["1"]
    v2 = register(project, tiny_folder, **{"kollm.model_digest": "sha256:other"})
    assert v2.version == "2" and v2.aliases == ("challenger",)
    registry.set_alias("tiny", "challenger", "1", reason="test", project_dir=project)  # v2 now holds no alias
    assert register(project, tiny_folder, **{"kollm.model_digest": "sha256:other"}).aliases == ("challenger",)
    assert [v.version for v in registry.list_versions("tiny", project)] == ["2", "1"]
    described = registry.register_folder(  # the same files with another description: a deliberate new version
        "tiny",
        tiny_folder,
        run_id=new_run(project),
        tags={"kollm.model_digest": "sha256:other"},
        description="a second run",
        project_dir=project,
    )
    assert described.version == "3"


def test_registry_commands_outside_a_project_create_no_store(tmp_path):
    """Found: `kollm registry list` outside a project silently created ./.kollm/mlflow.db."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    for args in (["list"], ["show", "some-model"]):
        r = subprocess.run(
            [sys.executable, "-m", "kollm.cli", "registry", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert "no kollm.yaml" in r.stderr and "MLFLOW_TRACKING_URI" in r.stderr
        assert list(tmp_path.iterdir()) == []


@pytest.mark.slow(reason="a registration and MLflow's pyfunc load in a fresh process")
def test_readme_plain_mlflow_snippet_loads_the_champion_as_written(tmp_path, tiny_folder):
    """Found: the README's `mlflow.pyfunc.load_model("models:/...@champion")` failed as written (MLflow did not know
    the project's store) and left an mlflow.db behind."""
    import re
    import subprocess
    import sys

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    setup = re.search(r'`(mlflow\.set_tracking_uri\("[^"]+"\))`', readme).group(1)
    load = re.search(r'`(mlflow\.pyfunc\.load_model\("models:/korean-quickstart@champion"\)[^`]*)`', readme).group(1)
    project = make_project(tmp_path / "p")
    registry.register_folder(
        "korean-quickstart", tiny_folder, run_id=new_run(project), tags={}, alias="champion", project_dir=project
    )
    before = sorted(p.relative_to(project) for p in project.rglob("*"))
    script = f"import mlflow\n{setup}\nout = {load}\nassert len(out) == 1 and isinstance(out[0], str)\n"
    r = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [p for p in project.rglob("*") if p.name in ("mlflow.db", "mlruns") and p.parent != project / ".kollm"]
    assert not (project / "mlruns").exists() and len(before) > 0


def test_a_name_with_a_quote_does_not_break_registry_searches(tmp_path, tiny_folder):
    """MLflow stores o'brien; kollm's searches must not splice it into a filter string (validate refuses such a
    project name, but the registry commands take any name, and models registered elsewhere may have one)."""
    project = make_project(tmp_path / "p")
    name = "o'brien"
    run_id = new_run(project)
    first = registry.register_folder(name, tiny_folder, run_id=run_id, tags={}, project_dir=project, step_key="k1")
    again = registry.register_folder(name, tiny_folder, run_id=run_id, tags={}, project_dir=project, step_key="k1")
    assert first.version == again.version == "1"
    assert [v.version for v in registry.list_versions(name, project)] == ["1"]
    with pytest.raises(NotFound, match="no version 7") as e:
        registry.resolve_model_uri(f"models:/{name}/7", project)
    assert "versions: 1" in str(e.value.hint)
