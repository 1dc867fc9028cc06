"""The local runner: caching, invalidation, --force/--from/--only, atomic outputs, retries, lineage in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

import kollm
from kollm.errors import ConfigError, StepFailed
from kollm.pipeline.step import ARTIFACT_META_FILE

from .helpers import calls, make_project


def test_rerun_is_fully_cached(tmp_path):
    root = make_project(tmp_path / "p")
    first = kollm.run(root)
    assert [r.cache_hit for r in first.steps.values()] == [False, False, False]
    assert calls(root) == ["make_corpus", "count:count", "count:count2"]
    second = kollm.run(root)
    assert [r.cache_hit for r in second.steps.values()] == [True, True, True]
    assert calls(root) == ["make_corpus", "count:count", "count:count2"]  # nothing recomputed
    for name, rec in first.steps.items():
        assert second.steps[name].outputs == rec.outputs
        assert second.steps[name].metrics == rec.metrics
    assert first.steps["count"].metrics["chars"] > 0


def test_outputs_are_published_with_digest_and_meta(tmp_path):
    root = make_project(tmp_path / "p")
    rec = kollm.run(root).steps["corpus"]
    art = rec.outputs["data"]
    assert art.type == "corpus" and art.digest.startswith("sha256:")
    assert art.path == root / ".kollm" / "steps" / rec.key / "data"
    assert (art.path / "lines.txt").read_text(encoding="utf-8").startswith("안녕하세요".upper())
    meta = json.loads((art.path / ARTIFACT_META_FILE).read_text())
    assert meta["digest"] == art.digest and meta["step"] == "corpus"
    assert not any((root / ".kollm" / "tmp").glob("*"))  # nothing half-written left behind


def test_config_change_invalidates_only_that_step(tmp_path):
    root = make_project(tmp_path / "p", module="steps_cfg")
    kollm.run(root)
    make_project(root, scale=3, module="steps_cfg")
    result = kollm.run(root)
    hits = {n: r.cache_hit for n, r in result.steps.items()}
    assert hits == {"corpus": True, "count": False, "count2": True}
    assert result.steps["count"].metrics["chars"] == 3 * kollm.run(root).steps["count2"].metrics["chars"]


def test_data_change_invalidates_downstream(tmp_path):
    root = make_project(tmp_path / "p")
    kollm.run(root)
    (root / "data" / "c.txt").write_text("새 문장\n", encoding="utf-8")
    result = kollm.run(root)
    assert not any(r.cache_hit for r in result.steps.values())


def test_identical_output_keeps_downstream_cached(tmp_path):
    root = make_project(tmp_path / "p")
    kollm.run(root)
    result = kollm.run(root, force=["corpus"])
    hits = {n: r.cache_hit for n, r in result.steps.items()}
    # the forced step re-ran, produced the same bytes, so later steps keep their cache (content addressing)
    assert hits == {"corpus": False, "count": True, "count2": True}


def test_code_change_invalidates(tmp_path):
    root = make_project(tmp_path / "p", module="steps_code")
    kollm.run(root)
    src = root / "steps_code.py"
    src.write_text(src.read_text() + "\n# edited\n")
    result = kollm.run(root)
    assert not any(r.cache_hit for r in result.steps.values())


def test_from_and_only(tmp_path):
    root = make_project(tmp_path / "p")
    kollm.run(root)
    result = kollm.run(root, from_step="count")
    assert {n: r.cache_hit for n, r in result.steps.items()} == {"corpus": True, "count": False, "count2": False}
    only = kollm.run(root, only="count")
    assert list(only.steps) == ["corpus", "count"] and only.steps["count"].cache_hit


def test_only_needs_cached_upstream(tmp_path):
    root = make_project(tmp_path / "p")
    with pytest.raises(StepFailed, match="has no cached result"):
        kollm.run(root, only="count")


def test_unknown_step_flags(tmp_path):
    root = make_project(tmp_path / "p")
    with pytest.raises(ConfigError, match="--force nope: no such step; steps are: corpus, count, count2"):
        kollm.run(root, force=["nope"])


def test_retries_with_backoff(tmp_path):
    steps = """\
- kind: python
  name: flaky
  retries: 2
  retry_backoff_s: 0.01
  config: {callable: "mysteps:flaky", outputs: {m: metrics}, params: {fail_times: 2}}
"""
    root = make_project(tmp_path / "p", steps_yaml=steps)
    result = kollm.run(root)
    assert result.steps["flaky"].metrics["attempts"] == 3
    events = [json.loads(l)["event"] for l in (root / ".kollm/logs/system" / f"{result.run_id}.jsonl").read_text().splitlines()]
    assert events.count("step_error") == 2


def test_failure_after_retries_is_one_clear_error(tmp_path):
    steps = """\
- kind: python
  name: flaky
  retries: 1
  retry_backoff_s: 0
  config: {callable: "mysteps:flaky", outputs: {m: metrics}, params: {fail_times: 5}}
"""
    root = make_project(tmp_path / "p", steps_yaml=steps)
    with pytest.raises(StepFailed) as e:
        kollm.run(root)
    assert "step 'flaky' (python) failed: RuntimeError: transient failure 2" in str(e.value)
    assert "traceback in" in e.value.hint
    assert not (root / ".kollm" / "steps").exists() or not any((root / ".kollm" / "steps").iterdir())


def test_missing_output_is_an_error(tmp_path):
    steps = """\
- kind: python
  name: lazy
  config: {callable: "mysteps:forgets_output", outputs: {m: metrics}}
"""
    root = make_project(tmp_path / "p", steps_yaml=steps)
    with pytest.raises(StepFailed, match="finished without writing its output"):
        kollm.run(root)


def test_mlflow_lineage(tmp_path):
    root = make_project(tmp_path / "p")
    result = kollm.run(root)
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/.kollm/mlflow.db")
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kollm.pipeline"] == "true"
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert sorted(c.data.tags["kollm.step"] for c in children) == ["corpus", "count", "count2"]
    count = next(c for c in children if c.data.tags["kollm.step"] == "count")
    rec = result.steps["count"]
    assert count.data.tags["kollm.cache_key"] == rec.key
    assert count.data.tags["kollm.cache_hit"] == "false"
    assert count.data.tags["kollm.input.data.digest"] == result.steps["corpus"].outputs["data"].digest
    assert count.data.tags["kollm.output.m.digest"] == rec.outputs["m"].digest
    assert count.data.params["callable"].endswith(":count") and count.data.params["params.scale"] == "1"
    assert count.data.metrics["chars"] == rec.metrics["chars"] and "duration_s" in count.data.metrics
    again = kollm.run(root)
    child = client.get_run(again.steps["count"].run_id)
    assert child.data.tags["kollm.cache_hit"] == "true"


@pytest.mark.postgres
def test_tracking_on_postgres(tmp_path, postgres_uri):
    root = make_project(tmp_path / "p")
    cfg = (root / "kollm.yaml").read_text()
    (root / "kollm.yaml").write_text(cfg.replace("project: testproj\n", f"project: testproj\ntracking: {{uri: '{postgres_uri}'}}\n"))
    result = kollm.run(root)
    again = kollm.run(root)
    assert all(r.cache_hit for r in again.steps.values())
    client = MlflowClient(tracking_uri=postgres_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert client.get_run(again.steps["count"].run_id).data.tags["kollm.cache_hit"] == "true"
    assert not (root / ".kollm" / "mlflow.db").exists()


def test_unreachable_tracking_store_is_a_clear_error(tmp_path):
    root = make_project(tmp_path / "p")
    cfg = (root / "kollm.yaml").read_text()
    (root / "kollm.yaml").write_text(cfg.replace("project: testproj\n", "project: testproj\ntracking: {uri: 'postgresql://nobody@127.0.0.1:1/none'}\n"))
    with pytest.raises(kollm.errors.KollmError, match="cannot open the MLflow tracking store postgresql://nobody@127.0.0.1:1/none"):
        kollm.run(root)


def test_fsspec_url_source(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/kollm-test/a.txt", "가나다\n".encode())
    fs.pipe("/kollm-test/b.txt", "라마바\n".encode())
    (tmp_path / "memsteps.py").write_text(
        "import fsspec\n"
        "def read(ctx):\n"
        "    files = ctx.inputs['src'].meta['files']\n"
        "    text = ''.join(fsspec.open(f, 'rt', encoding='utf-8').open().read() for f in files)\n"
        "    (ctx.output_path('data') / 'all.txt').write_text(text, encoding='utf-8')\n"
        "    return {'files': len(files)}\n"
    )
    (tmp_path / "kollm.yaml").write_text(
        "project: mem\ndata: {raw: {path: 'memory://kollm-test/*.txt'}}\n"
        "steps:\n  - {kind: python, name: read, config: {callable: 'memsteps:read', inputs: {src: source}, outputs: {data: corpus}}}\n"
    )
    first = kollm.run(tmp_path)
    assert first.steps["read"].metrics["files"] == 2
    assert (first.steps["read"].outputs["data"].path / "all.txt").read_text(encoding="utf-8") == "가나다\n라마바\n"
    assert kollm.run(tmp_path).steps["read"].cache_hit
    fs.pipe("/kollm-test/c.txt", "사아자\n".encode())  # new remote file -> new source digest -> re-run
    assert not kollm.run(tmp_path).steps["read"].cache_hit
