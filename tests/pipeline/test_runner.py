"""The local runner: caching, invalidation, --force/--from/--only, atomic outputs, retries, lineage in MLflow."""

from __future__ import annotations

import json
import os

import pytest
from mlflow import MlflowClient

import kollm
from kollm.errors import ConfigError, StepFailed, Superseded
from kollm.pipeline.step import ARTIFACT_META_FILE

from .helpers import calls, make_project


def test_rerun_is_fully_cached(tmp_path):
    root = make_project(tmp_path / "p")
    first = kollm.run(root)
    assert [r.cache_hit for r in first.steps.values()] == [False, False, False]
    assert calls(root)[0] == "make_corpus" and sorted(calls(root)) == [
        "count:count",
        "count:count2",
        "make_corpus",
    ]  # count, count2: side by side
    second = kollm.run(root)
    assert [r.cache_hit for r in second.steps.values()] == [True, True, True]
    assert sorted(calls(root)) == ["count:count", "count:count2", "make_corpus"]  # nothing recomputed
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
    events = [
        json.loads(l)["event"]
        for l in (root / ".kollm/logs/system" / f"{result.run_id}.jsonl").read_text().splitlines()
    ]
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


@pytest.mark.parametrize("published", [True, False])
def test_an_attempt_whose_lease_ended_publishes_nothing(tmp_path, published):
    """An attempt whose step was published meanwhile by another attempt (a retry that went on while this one was
    left running; kollm.pipeline.lease) does not publish over it: the published result stands. When its lease ended
    without a published result (the checkpoint folder removed), the step fails with one message and nothing is kept."""
    steps = f"""\
- kind: python
  name: late
  config: {{callable: "mysteps:published_meanwhile", outputs: {{m: metrics}}, params: {{publish: {str(published).lower()}}}}}
"""
    root = make_project(tmp_path / "p", steps_yaml=steps)
    if not published:
        with pytest.raises(Superseded, match="stopped without writing its outputs: its lease on the step's checkpoint"):
            kollm.run(root)
        assert not (root / ".kollm" / "steps").exists() or not any((root / ".kollm" / "steps").iterdir())
    else:
        record = kollm.run(root).steps["late"]
        assert record.metrics == {"who": 2.0} and not record.cache_hit
        assert (record.outputs["m"].path / "who.txt").read_text() == "the other attempt"
    assert not list((root / ".kollm" / "tmp").iterdir())  # this attempt's staged outputs: discarded
    assert not list((root / ".kollm" / "checkpoints").iterdir())


def test_mlflow_lineage(tmp_path):
    root = make_project(tmp_path / "p")
    result = kollm.run(root)
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/.kollm/mlflow.db")
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kollm.pipeline"] == "true"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
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
    (root / "kollm.yaml").write_text(
        cfg.replace("project: testproj\n", f"project: testproj\ntracking: {{uri: '{postgres_uri}'}}\n")
    )
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
    (root / "kollm.yaml").write_text(
        cfg.replace(
            "project: testproj\n", "project: testproj\ntracking: {uri: 'postgresql://nobody@127.0.0.1:1/none'}\n"
        )
    )
    with pytest.raises(
        kollm.errors.KollmError, match="cannot open the MLflow tracking store postgresql://nobody@127.0.0.1:1/none"
    ):
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


def test_metric_name_mlflow_rejects_is_a_clear_error_and_nothing_is_cached(tmp_path):
    (tmp_path / "badmetric.py").write_text(
        "def f(ctx):\n    (ctx.output_path('m') / 'x.txt').write_text('x')\n    return {'acc@1': 0.5}\n"
    )
    (tmp_path / "kollm.yaml").write_text(
        "project: bm\nsteps:\n  - {kind: python, name: f, config: {callable: 'badmetric:f', outputs: {m: metrics}, params: {'a@b?': 1}}}\n"
    )
    with pytest.raises(StepFailed, match="returned metric name\\(s\\) MLflow cannot store: 'acc@1'"):
        kollm.run(tmp_path)
    assert not (tmp_path / ".kollm" / "steps").exists() or not any((tmp_path / ".kollm" / "steps").iterdir())
    (tmp_path / "badmetric.py").write_text(
        "def f(ctx):\n    (ctx.output_path('m') / 'x.txt').write_text('x')\n    return {'acc_at_1': 0.5}\n"
    )
    result = kollm.run(tmp_path)  # the param key with odd characters is logged under a cleaned name
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve()}/.kollm/mlflow.db")
    assert client.get_run(result.steps["f"].run_id).data.params["params.a_b_"] == "1"


def test_edited_user_module_runs_its_new_code_in_the_same_process(tmp_path):
    mod = tmp_path / "userstep_edit.py"
    body = "def f(ctx):\n    (ctx.output_path('m') / 'v.txt').write_text('{v}')\n    return {{'v': {v}}}\n"
    mod.write_text(body.format(v=1))
    (tmp_path / "kollm.yaml").write_text(
        "project: ed\nsteps:\n  - {kind: python, name: f, config: {callable: 'userstep_edit:f', outputs: {m: metrics}}}\n"
    )
    assert kollm.run(tmp_path).steps["f"].metrics["v"] == 1
    mod.write_text(body.format(v=2) + "# a longer file\n")
    second = kollm.run(tmp_path).steps["f"]
    assert not second.cache_hit and second.metrics["v"] == 2
    assert (second.outputs["m"].path / "v.txt").read_text() == "2"


def test_same_module_name_in_two_projects(tmp_path):
    for name, value in [("one", 1), ("two", 2)]:
        root = tmp_path / name
        root.mkdir()
        (root / "shared_name_steps.py").write_text(
            f"def f(ctx):\n    (ctx.output_path('m') / 'v.txt').write_text('x')\n    return {{'v': {value}}}\n"
        )
        (root / "kollm.yaml").write_text(
            f"project: {name}\nsteps:\n  - {{kind: python, name: f, config: {{callable: 'shared_name_steps:f', outputs: {{m: metrics}}}}}}\n"
        )
    assert kollm.run(tmp_path / "one").steps["f"].metrics["v"] == 1
    assert kollm.run(tmp_path / "two").steps["f"].metrics["v"] == 2


def test_only_reads_upstream_from_cache_without_new_runs(tmp_path):
    root = make_project(tmp_path / "p")
    first = kollm.run(root)
    only = kollm.run(root, only="count", force=["count"])
    assert only.steps["corpus"].run_id == first.steps["corpus"].run_id  # the cached run, not a new one
    assert not only.steps["count"].cache_hit
    with pytest.raises(ConfigError, match="--only and --from cannot be combined"):
        kollm.run(root, only="count", from_step="corpus")
    # a forced step before --from is recomputed, not demanded from the cache
    forced = kollm.run(root, from_step="count2", force=["corpus"])
    assert not forced.steps["corpus"].cache_hit


def test_a_projects_tracking_uri_does_not_leak_into_later_child_processes(tmp_path, monkeypatch):
    """After kollm ran project A in this process, a child process working on project B (kfp.local's, a script's)
    must track to B's store, not take A's URI (left in $MLFLOW_TRACKING_URI) for the user's own."""
    import subprocess
    import sys

    from kollm.pipeline import tracking

    monkeypatch.setattr(tracking, "USER_TRACKING_URI", None)  # as when pytest started without the variable
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("KOLLM_SET_TRACKING_URI", raising=False)
    a = make_project(tmp_path / "a")
    kollm.run(a)
    (tmp_path / "b").mkdir()
    code = "import sys; from pathlib import Path; from kollm.pipeline.tracking import tracking_uri; print(tracking_uri(Path(sys.argv[1])))"
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "b")], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip() == f"sqlite:///{(tmp_path / 'b').resolve()}/.kollm/mlflow.db"
    # the user's own variable is still honoured by child processes
    mine = f"sqlite:///{tmp_path.resolve()}/mine.db"
    env = {k: v for k, v in os.environ.items() if k != "KOLLM_SET_TRACKING_URI"} | {"MLFLOW_TRACKING_URI": mine}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    ).stdout
    assert out.strip() == mine
