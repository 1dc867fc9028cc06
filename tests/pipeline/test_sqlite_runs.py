"""kollm's direct SQLite writer (pipeline/sqlite_runs.py) writes the same rows MLflow writes, declines what it
must leave to MLflow, and lets a fully cached `kollm run` record its runs without importing MLflow."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

import kollm
from kollm.errors import KollmError
from kollm.pipeline.sqlite_runs import SCHEMA_REVISIONS, SqliteRuns
from kollm.config import load_config
from kollm.pipeline.tracking import (
    EXPERIMENT_KIND_TAG,
    TRAINING_EXPERIMENT_KIND,
    PipelineTracker,
    RunWriter,
    StepTracker,
    client_for,
    source_tags,
)

from .helpers import make_project

TAGS = {
    "mlflow.parentRunId": "p" * 32,
    "kollm.step": "s",
    "kollm.cache_key": "abc",
    "kollm.input.data.digest": "sha256:00",
}
PARAMS = {"callable": "m:f", "params.lr": "0.1", "inputs.src": "source"}
TS = 1_700_000_000_000
HEAVY = ("mlflow", "sqlalchemy", "pandas", "torch", "transformers")  # none of them is needed to rerun a cached pipeline


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = client_for(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    return uri, client, exp


def _log_both_ways(tmp_path):
    """The same runs written by MLflow's client and by SqliteRuns; returns (uri, client, mlflow_run, kollm_run)."""
    uri, client, exp = _store(tmp_path)
    a = client.create_run(exp, run_name="s", tags=TAGS).info.run_id
    client.log_batch(
        a,
        params=[Param(k, v) for k, v in PARAMS.items()],
        metrics=[Metric("loss", 2.0, TS, 5), Metric("nan", float("nan"), TS, 5), Metric("inf", float("inf"), TS, 5)],
        tags=[RunTag("kollm.output.out.digest", "sha256:11")],
        synchronous=True,
    )
    client.log_batch(
        a,
        metrics=[Metric("loss", 3.0, TS + 1, 4), Metric("acc", 0.5, TS, 0)],
        tags=[RunTag("kollm.step", "s2")],
        synchronous=True,
    )
    client.log_batch(a, params=[Param("callable", "m:f")], synchronous=True)  # the same value again is allowed
    client.set_terminated(a, status="FINISHED")

    fast = SqliteRuns.open(uri, "e")
    assert fast is not None and fast.experiment_id == exp
    b = fast.create_run("s", TAGS)
    assert (
        fast.log_batch(
            b,
            PARAMS,
            {"loss": 2.0, "nan": float("nan"), "inf": float("inf")},
            {"kollm.output.out.digest": "sha256:11"},
            timestamp=TS,
            step=5,
        )
        is True
    )
    # log_batch gives one step and timestamp per call, as StepTracker.log does
    assert fast.log_batch(b, {}, {"loss": 3.0}, {"kollm.step": "s2"}, timestamp=TS + 1, step=4) is True
    assert fast.log_batch(b, {}, {"acc": 0.5}, {}, timestamp=TS, step=0) is True
    assert fast.log_batch(b, {"callable": "m:f"}, {}, {}, timestamp=TS, step=0) is True
    assert fast.set_terminated(b, "FINISHED") is True
    fast.close()
    return uri, client, a, b


def _rows(db, run_id):
    con = sqlite3.connect(db)
    try:
        run = con.execute(
            "SELECT name, source_type, source_name, entry_point_name, user_id, status, source_version, lifecycle_stage,"
            " replace(artifact_uri, ?, 'ID'), experiment_id, deleted_time, end_time IS NOT NULL, start_time > 0 FROM runs WHERE run_uuid = ?",
            (run_id, run_id),
        ).fetchall()
        out = {"runs": run}
        for table, cols in [
            ("tags", "key, value"),
            ("params", "key, value"),
            ("metrics", "key, value, step, is_nan"),
            ("latest_metrics", "key, value, step, is_nan"),
        ]:
            out[table] = sorted(
                con.execute(f"SELECT {cols} FROM {table} WHERE run_uuid = ?", (run_id,)).fetchall(), key=repr
            )
        return out
    finally:
        con.close()


def test_installed_mlflow_schema_is_one_the_writer_was_checked_against(tmp_path):
    _store(tmp_path)
    (revision,) = sqlite3.connect(tmp_path / "mlflow.db").execute("SELECT version_num FROM alembic_version").fetchone()
    assert revision in SCHEMA_REVISIONS, (
        f"MLflow's tracking schema is now at {revision}: check sqlite_runs.py against MLflow's SqlAlchemyStore, then add it"
    )


def test_rows_match_what_mlflow_writes(tmp_path):
    uri, client, a, b = _log_both_ways(tmp_path)
    ra, rb = _rows(tmp_path / "mlflow.db", a), _rows(tmp_path / "mlflow.db", b)
    assert ra == rb
    assert ("loss", 2.0, 5, 0) in rb["latest_metrics"]  # greatest step wins, as in MLflow
    ga, gb = client.get_run(a), client.get_run(b)  # and MLflow reads both back alike
    assert gb.data.params == ga.data.params == PARAMS
    assert gb.data.tags == ga.data.tags and gb.data.tags["kollm.step"] == "s2" and gb.data.tags["mlflow.runName"] == "s"
    assert gb.data.metrics.keys() == ga.data.metrics.keys()
    assert gb.info.status == "FINISHED" and gb.info.artifact_uri == ga.info.artifact_uri.replace(a, b)
    assert [m.value for m in client.get_metric_history(b, "loss")] == [2.0, 3.0]


def test_declined_writes_go_through_mlflow_and_its_errors(tmp_path):
    uri, client, exp = _store(tmp_path)
    fast = SqliteRuns.open(uri, "e")
    writer = RunWriter(uri, fast=fast)
    run = writer.create_run(exp, "s", {"kollm.step": "s"})
    tracker = StepTracker(writer, run)
    tracker.log(params={"lr": 0.1})
    assert fast.log_batch(run, {"lr": "0.2"}, {}, {}, timestamp=TS, step=0) is False  # a changed param: declined
    with pytest.raises(KollmError, match="Changing param values is not allowed"):
        tracker.log(params={"lr": 0.2})
    assert fast.log_batch(run, {}, {"bad@name": 1.0}, {}, timestamp=TS, step=0) is False
    with pytest.raises(KollmError, match="MLflow tracking failed"):
        tracker.log(metrics={"bad@name": 1.0})
    tracker.log(tags={"mlflow.runName": "renamed"})  # MLflow also renames the run itself
    assert client.get_run(run).info.run_name == "renamed"
    tracker.end("FINISHED")
    assert fast.set_terminated(run, "FINISHED") is True
    client.delete_run(run)
    assert fast.set_terminated(run, "KILLED") is False  # not active any more: MLflow decides


def test_a_dataset_input_is_the_rows_mlflow_writes(tmp_path):
    """StepTracker.log_dataset (a training step's data) through kollm's writer: the dataset, input and input tag rows
    MLflow's client writes for the same call, a dataset of the same name and digest reused, and MLflow reads it."""
    from kollm.pipeline.step import Artifact

    uri, client, exp = _store(tmp_path)
    data = Artifact(type="dataset", path=tmp_path / "d", digest="sha256:" + "ab" * 32, meta={"rows": 3})
    fast = SqliteRuns.open(uri, "e")
    ids = []
    no_mlflow = object()  # kollm's writer must not fall back on MLflow's client: it has none
    for writer in (RunWriter(uri, client=client), RunWriter(uri, fast=fast, client=no_mlflow)):  # type: ignore[arg-type]
        for _ in range(2):  # two runs on one dataset: one datasets row for both
            tracker = StepTracker(writer, writer.create_run(exp, "s", {}))
            tracker.log_dataset(data, name="sft-data", context="training")
            tracker.log_dataset(data, name="sft-data", context="training")  # again: no second edge
            ids.append(tracker.run_id)
    con = sqlite3.connect(tmp_path / "mlflow.db")

    def edges(run_id):
        return con.execute(
            "SELECT d.name, d.digest, d.dataset_source_type, d.dataset_source, d.dataset_schema, d.dataset_profile,"
            " i.source_type, i.destination_type, i.step, t.name, t.value FROM inputs i"
            " JOIN datasets d ON d.dataset_uuid = i.source_id JOIN input_tags t ON t.input_uuid = i.input_uuid"
            " WHERE i.destination_id = ?",
            (run_id,),
        ).fetchall()

    assert [edges(r) for r in ids[2:]] == [edges(r) for r in ids[:2]] and len(edges(ids[0])) == 1
    assert con.execute("SELECT count(*) FROM datasets").fetchone() == (1,)
    con.close()
    got = client.get_run(ids[3]).inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.digest, [(t.key, t.value) for t in d.tags]) for d in got] == [
        ("sft-data", "ab" * 16, [("mlflow.data.context", "training")])
    ]
    assert "rows" in got[0].dataset.profile
    fast.close()


def test_a_logged_file_lands_where_mlflow_puts_it_without_importing_mlflow(tmp_path):
    """StepTracker.log_artifact into a run whose artifacts are a local folder copies the file where MLflow's client
    would (MLflow lists and downloads it), in a process that never imports MLflow; elsewhere MLflow's client logs."""
    uri, client, exp = _store(tmp_path)
    report = tmp_path / "report.html"
    report.write_text("<p>리포트</p>", encoding="utf-8")
    a = client.create_run(exp, run_name="s").info.run_id
    client.log_artifact(a, str(report), "prepare")
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from kollm.pipeline.sqlite_runs import SqliteRuns
        from kollm.pipeline.tracking import RunWriter, StepTracker
        fast = SqliteRuns.open({uri!r}, "e")
        writer = RunWriter({uri!r}, fast=fast)
        tracker = StepTracker(writer, writer.create_run({exp!r}, "s", {{}}))
        tracker.log_artifact(Path({str(report)!r}), "prepare")
        tracker.log_artifact(Path({str(report)!r}))
        tracker.end("FINISHED")
        print(tracker.run_id, ",".join(m for m in ("mlflow", "sqlalchemy") if m in sys.modules) or "-")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    b, imported = proc.stdout.split()
    assert imported == "-"
    assert [f.path for f in client.list_artifacts(b, "prepare")] == [
        f.path for f in client.list_artifacts(a, "prepare")
    ]
    assert [f.path for f in client.list_artifacts(b)] == ["prepare", "report.html"]
    got = client.download_artifacts(b, "prepare/report.html", str(tmp_path))
    assert open(got, encoding="utf-8").read() == "<p>리포트</p>"
    assert not [p for p in (tmp_path / "art").rglob(".artifact.uploading.*")]  # no temp file left behind
    # a run whose artifacts are not a local folder: MLflow's client (and its errors) decide
    con = sqlite3.connect(tmp_path / "mlflow.db")
    con.execute("UPDATE runs SET artifact_uri = 's3://bucket/x' WHERE run_uuid = ?", (b,))
    con.commit()
    con.close()
    fast = SqliteRuns.open(uri, "e")
    assert fast.local_artifact_dir(b) is None and fast.local_artifact_dir(a) is not None
    fast.close()


def test_a_prepare_step_run_imports_no_mlflow_and_its_reports_are_in_its_run(tmp_path):
    """`kollm step run` of a `prepare` step (an Airflow task, a pod) in a project whose store exists: no MLflow
    imported, and MLflow lists the reports it logged in the step's run."""
    import json

    root = tmp_path / "p"
    (root / "data").mkdir(parents=True)
    rows = [
        {"messages": [{"role": "user", "content": f"질문 {i}"}, {"role": "assistant", "content": f"대답 {i}"}]}
        for i in range(20)
    ]
    (root / "data" / "chat.jsonl").write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8"
    )
    (root / "kollm.yaml").write_text(
        "project: prepnoml\ndata: {chat: {path: data/chat.jsonl}}\nsteps:\n  - {kind: prepare, name: prep, config: "
        "{dataset: instructions, split: {eval_fraction: 0.1}, filters: {min_chars: 1, min_hangul_ratio: 0}}}\n",
        encoding="utf-8",
    )
    kollm.run(root)  # creates the store (through MLflow)
    out = tmp_path / "out.json"
    cli = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; from kollm.cli import main\ntry:\n    main()\nfinally:\n    print(','.join(m for m in {HEAVY[:2]!r} if m in sys.modules) or '-')",
            "step", "run", str(root / "kollm.yaml"), "--step", "prep", "--force", "--outputs-json", str(out),
        ],
        capture_output=True,
        text=True,
        cwd=root,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.split()[-1] == "-"
    run_id = json.loads(out.read_text(encoding="utf-8"))["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{root.resolve()}/.kollm/mlflow.db")
    assert {"prepare/stats.json", "prepare/report.html"} <= {f.path for f in client.list_artifacts(run_id, "prepare")}
    assert client.get_run(run_id).info.status == "FINISHED"


def test_open_declines_stores_it_does_not_know(tmp_path):
    assert SqliteRuns.open(f"sqlite:///{tmp_path / 'none.db'}", "e") is None
    assert not (tmp_path / "none.db").exists()  # nothing created: MLflow creates new stores
    uri, client, exp = _store(tmp_path)
    assert SqliteRuns.open(uri, "missing") is None
    assert SqliteRuns.open("postgresql://u@127.0.0.1:5432/db", "e") is None
    con = sqlite3.connect(tmp_path / "mlflow.db")
    con.execute("UPDATE alembic_version SET version_num = 'abcdef012345'")
    con.commit()
    con.close()
    assert SqliteRuns.open(uri, "e") is None


def test_cached_rerun_tracks_every_step_without_importing_mlflow(tmp_path, kollm_bin):
    root = make_project(tmp_path / "p")
    first = kollm.run(root)  # creates the store (through MLflow)
    script = textwrap.dedent(f"""
        import sys, kollm
        result = kollm.run({str(root)!r})
        assert all(r.cache_hit for r in result.steps.values())
        print(result.run_id, ",".join(m for m in {HEAVY!r} if m in sys.modules) or "-")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    run_id, imported = out[0], out[1]
    assert imported == "-"
    cli = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; from kollm.cli import main\ntry:\n    main()\nfinally:\n    print(','.join(m for m in {HEAVY!r} if m in sys.modules) or '-')",
            "run",
            str(root),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.split()[-1] == "-"

    client = MlflowClient(tracking_uri=f"sqlite:///{root.resolve()}/.kollm/mlflow.db")
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kollm.pipeline"] == "true"
    assert parent.data.metrics["cache_hits"] == 3 and parent.data.metrics["steps"] == 3
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(c.data.tags["kollm.step"] for c in children) == ["corpus", "count", "count2"]
    for child in children:
        rec = first.steps[child.data.tags["kollm.step"]]
        tags = child.data.tags
        assert child.info.status == "FINISHED" and child.info.end_time >= child.info.start_time
        assert tags["kollm.cache_key"] == rec.key and tags["kollm.cache_hit"] == "true"
        assert tags["kollm.kind"] == "python" and tags["mlflow.runName"] == rec.name
        for name, art in rec.outputs.items():
            assert tags[f"kollm.output.{name}.digest"] == art.digest
        assert any(k.startswith("kollm.input.") and k.endswith(".digest") for k in tags)
        assert child.data.params["callable"].endswith((":make_corpus", ":count"))
        assert "duration_s" in child.data.metrics
        assert all(child.data.metrics[k] == v for k, v in rec.metrics.items())
    count = next(c for c in children if c.data.tags["kollm.step"] == "count")
    assert count.data.tags["kollm.input.data.digest"] == first.steps["corpus"].outputs["data"].digest
    listing = subprocess.run(
        [kollm_bin, "show", run_id[:10], "--path", str(root)], capture_output=True, text=True, check=True
    ).stdout
    assert "hit" in listing and "miss" not in listing


def test_bad_key_is_mlflows_rule_for_metric_param_and_tag_keys():
    """One rule for the runner's metric-name check and the writer: MLflow's characters and path_not_unique."""
    from kollm.pipeline.sqlite_runs import bad_key

    assert not any(bad_key(k) for k in ("loss", "eval/loss", "a.b", "train loss", "x-y:z"))
    assert all(bad_key(k) for k in ("", "acc@1", ".", "./a", "a/../b", "../a", "/a", "a//b", "a/"))


def _tracker(root, **kw) -> PipelineTracker:
    cfg, _ = load_config(root)
    return PipelineTracker(cfg, root, **kw)


def test_experiment_opens_as_a_training_experiment(tmp_path):
    """MLflow 3's UI shows an experiment without mlflow.experimentKind in GenAI mode; kollm's is a training one."""
    root = make_project(tmp_path / "p")
    first = _tracker(root)  # a new store: MLflow creates it and the experiment, with the tag
    uri, exp_id = first.uri, first.experiment_id
    first.close()
    client = MlflowClient(tracking_uri=uri)
    assert TRAINING_EXPERIMENT_KIND == "custom_model_development"
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND
    # an experiment made before kollm tagged it (or by MLflow itself) is tagged at the next run, through MLflow
    client.delete_experiment_tag(exp_id, EXPERIMENT_KIND_TAG)
    fast = SqliteRuns.open(uri, "testproj")
    assert fast is not None and fast.experiment_tag(EXPERIMENT_KIND_TAG) is None
    fast.close()
    again = _tracker(root)
    again.close()
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_EXPERIMENT_KIND
    # a kind the user picked in the UI stays, and the direct writer is used again
    client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, "genai_development")
    third = _tracker(root)
    assert third.writer.fast is not None
    third.close()
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_source_and_user_tags_are_the_same_through_both_writers(tmp_path):
    """mlflow.user, mlflow.source.name and mlflow.source.type on parent and step runs, row for row the same
    whether kollm's SQLite writer or MLflow's client wrote them."""
    import getpass

    root = make_project(tmp_path / "p")
    db = root / ".kollm" / "mlflow.db"
    config_file = str(root / "kollm.yaml")
    fast = _tracker(root, source_name=config_file)
    slow = _tracker(root, source_name=config_file)
    slow.writer.close()  # no direct writer: every write through MLflow's client
    assert fast.writer.fast is not None and slow.writer.fast is None
    ids = []
    for tracker in (fast, slow):
        parent = tracker.start("testproj", {"kollm.config_file": config_file})
        step = tracker.step("count", "python", {"kollm.cache_key": "k"})
        step.end("FINISHED")
        tracker.finish("FINISHED", {"steps": 1.0})
        ids += [parent, step.run_id]
    fast.close()
    runs = [_rows(db, run_id) for run_id in ids]

    def system(rows):  # MLflow's tags that do not name the run or its parent
        names = ("mlflow.runName", "mlflow.parentRunId")
        return {k: v for k, v in rows["tags"] if k.startswith("mlflow.") and k not in names}

    user = getpass.getuser()
    local = {"mlflow.user": user, "mlflow.source.name": config_file, "mlflow.source.type": "LOCAL"}
    assert source_tags(config_file) == local
    assert [system(rows) for rows in runs] == [local] * 4
    # the same rows otherwise: runs.user_id (the UI's User column) is mlflow.user, as MLflow's client writes it
    for fast_rows, slow_rows in ((runs[0], runs[2]), (runs[1], runs[3])):
        assert fast_rows["runs"][0][1:] == slow_rows["runs"][0][1:] and fast_rows["runs"][0][4] == user  # [0]: the name
        assert {k for k, _ in fast_rows["tags"]} == {k for k, _ in slow_rows["tags"]}
    step = MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(ids[1])  # and MLflow reads them back
    assert step.info.user_id == user and step.data.tags["mlflow.source.name"] == config_file


@pytest.mark.slow(
    reason="a real prepare, a tiny model's evaluation, then a cached rerun in a fresh process: 170-235 s on a loaded machine"
)
def test_cached_rerun_with_an_evaluate_step_imports_no_mlflow(tmp_path):
    """An evaluate step's reference to `champion` (registry:NAME@champion) is tagged under a key MLflow and kollm's
    writer accept, so a cached rerun of a pipeline with an evaluate step never imports MLflow."""
    from tests.steps.evalproject import make_project as make_eval_project

    root = make_eval_project(tmp_path / "p", gate=["perplexity <= champion * 2"], register=False)
    kollm.run(root)
    script = textwrap.dedent(f"""
        import sys, kollm
        result = kollm.run({str(root)!r})
        assert all(r.cache_hit for r in result.steps.values())
        print(result.run_id, ",".join(m for m in ("mlflow", "sqlalchemy") if m in sys.modules) or "-")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.split()
    assert out[1] == "-"
    client = MlflowClient(tracking_uri=f"sqlite:///{root.resolve()}/.kollm/mlflow.db")
    runs = client.search_runs(
        [client.get_run(out[0]).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{out[0]}'"
    )
    evaluate = next(r for r in runs if r.data.tags["kollm.step"] == "evaluate")
    assert evaluate.data.tags["kollm.reference.registry:evaltest_champion"] == "none"
