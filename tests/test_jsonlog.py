"""kollm's one JSON log schema (kollm.jsonlog): the writer's rules, and every line the real writers produce (the
runner on a tiny pipeline, a tiny training run, requests through the router) checked against it."""

from __future__ import annotations

import json
import pickle
import threading

import pandas as pd
import pytest
import torch
from starlette.testclient import TestClient

import kollm
from kollm.jsonlog import COMPONENTS, FIXED, LABELS, JsonLog, check, clip, log_path
from kollm.pipeline.step import Artifact
from kollm.serve.engine import EngineError
from kollm.serve.router import create_app
from kollm.steps import cpt
from kollm.train.recipe import Env, Job, TrainingLog

from .pipeline.helpers import make_project
from .serve.fake_engine import FakeEngine
from .tiny import CORPUS


def _lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_a_line_has_the_fixed_fields_first_then_labels_then_its_own(tmp_path):
    log = JsonLog(tmp_path / "x" / "a.jsonl", "runner", project="p")
    log.log("step_started", step="sft", key="k" * 64)
    log.log("step_failed", "ERROR", step=None, error="boom")
    first, second = _lines(tmp_path / "x" / "a.jsonl")
    assert list(first) == [*FIXED, "project", "step", "key"] and check(first) == []
    assert first["component"] == "runner" and first["level"] == "INFO" and first["event"] == "step_started"
    assert first["ts"].endswith("+00:00") and first["project"] == "p" and first["step"] == "sft"
    assert "step" not in second and second["level"] == "ERROR" and check(second) == []


def test_the_writer_refuses_what_would_break_the_schema(tmp_path):
    with pytest.raises(ValueError, match="component"):
        JsonLog(tmp_path / "a.jsonl", "nobody")
    log = JsonLog(tmp_path / "a.jsonl", "serve")
    with pytest.raises(ValueError, match="level"):
        log.log("x", "LOUD")
    with pytest.raises(TypeError):
        log.log("x", ts="yesterday")


def test_strings_are_masked_and_clipped_at_any_depth(tmp_path):
    log = JsonLog(tmp_path / "a.jsonl", "runner", field_limit=100)
    log.log(
        "step_error",
        error="cannot open postgresql://u:s3cret@db/x",
        traceback="a" * 1000 + "LAST LINE",
        nested={"list": ["token=abcdef", "b" * 500]},
    )
    (line,) = _lines(tmp_path / "a.jsonl")
    assert "s3cret" not in json.dumps(line) and "abcdef" not in json.dumps(line)
    traceback = line["traceback"]
    assert len(traceback) < 130 and traceback.endswith("LAST LINE") and "[1009 chars]" in traceback
    assert len(line["nested"]["list"][1]) < 130
    assert clip("abc", 5) == "abc" and clip(None) is None and clip(3) == 3


def test_check_names_what_is_wrong():
    good = {"ts": "2026-01-02T03:04:05.000+00:00", "level": "INFO", "component": "train", "event": "train_metrics"}
    assert check(good) == []
    assert check({**good, "ts": 17e8}) and check({**good, "ts": "2026-01-02T03:04:05"})  # a number; no time zone
    assert check({**good, "level": "info"}) and check({**good, "component": "x"})
    assert check({**good, "event": "Bad Event"})
    assert check({**good, "step": 3}) and check({k: v for k, v in good.items() if k != "event"}) and check([1])
    assert check({"event": "x", **good})  # the fixed fields come first


def test_writers_of_one_file_share_it_and_rotation(tmp_path):
    path = tmp_path / "api.jsonl"
    a, b = JsonLog(path, "serve", max_bytes=4000, backups=9), JsonLog(path, "serve", model="m")  # 100 lines: ~13 kB
    threads = [threading.Thread(target=lambda w=w: [w.log("http_request", i=i) for i in range(50)]) for w in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    a.close()
    lines = [x for p in sorted(tmp_path.iterdir()) for x in _lines(p)]
    assert len(lines) == 100 and all(check(x) == [] for x in lines)  # no line lost or torn across the rotations
    assert {"api.jsonl", "api.jsonl.1", "api.jsonl.2"} <= {p.name for p in tmp_path.iterdir()}
    assert all(p.stat().st_size < 4200 for p in tmp_path.iterdir())  # one rotation for both writers, not one each


def test_a_pickled_writer_opens_the_file_itself(tmp_path):
    log = JsonLog(tmp_path / "a.jsonl", "train", step="sft")
    log.log("params", params={"lr": 1e-3})
    copy = pickle.loads(pickle.dumps(log))
    copy.log("params", params={"lr": 2e-3})
    assert [x["params"]["lr"] for x in _lines(tmp_path / "a.jsonl")] == [1e-3, 2e-3]


def _train(project, name: str) -> None:
    """A two-step scratch cpt run whose training log goes where a pipeline's would."""
    data = project / "data-cpt"
    data.mkdir()
    pd.DataFrame({"text": CORPUS[:60]}).to_parquet(data / "train.parquet")
    pd.DataFrame({"text": CORPUS[60:66]}).to_parquet(data / "eval.parquet")
    config = cpt.Config(
        base_model="scratch", vocab_size=300, seq_len=32, max_steps=2, lr=3e-3, batch_size=2, log_every=1
    )
    art = Artifact("corpus", data, "sha256:test")
    job = Job(
        step=name,
        kind="cpt",
        config=config,
        data=art,
        base_model="scratch",
        base_artifact=None,
        tokenizer_corpus=art,
        output_dir=project / "out" / "model",
        checkpoint_dir=project / "out" / "ckpt",
        log_file=log_path(project / ".kollm", "training", name),
    )
    training_log = TrainingLog(job.log_file, name, None)  # no tracker: params are logged as a line too
    cpt.train(job, Env(device=torch.device("cpu"), on_log=training_log, log_params=training_log.log_params))


def test_every_line_the_real_writers_write_follows_the_schema(tmp_path):
    steps = """\
- kind: python
  name: corpus
  inputs: {src: raw}
  config: {callable: "mysteps:make_corpus", inputs: {src: source}, outputs: {data: corpus}}
- kind: python
  name: flaky
  retries: 1
  retry_backoff_s: 0.01
  config: {callable: "mysteps:flaky", outputs: {m: metrics}, params: {fail_times: 1}}
"""
    project = make_project(tmp_path / "p", steps_yaml=steps)
    result = kollm.run(project)  # the runner: started, error (retried), finished
    kollm.run(project)  # and a cached rerun
    _train(project, "cpt")

    engine = FakeEngine("안녕", context_length=1000)
    client = TestClient(
        create_app(engine, model_name="tiny", model_version="3", log_dir=project / ".kollm" / "logs"),
        raise_server_exceptions=False,
    )
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "서울?"}], "max_tokens": 2, "user": "u" * 1000}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert client.get("/v1/nothing-here").status_code == 404
    engine.fail_with = EngineError("the engine broke")
    assert client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}).status_code == 500

    files = sorted((project / ".kollm" / "logs").rglob("*.jsonl"))
    assert {f.parent.name for f in files} == {"system", "training", "api", "inference"}
    lines = {f: _lines(f) for f in files}
    for f, records in lines.items():
        for i, record in enumerate(records):
            assert check(record) == [], f"{f.relative_to(project)} line {i + 1}: {check(record)}: {record}"
    every = [r for records in lines.values() for r in records]
    assert {r["component"] for r in every} == set(COMPONENTS)
    assert all(r[k] is None or isinstance(r[k], str) for r in every for k in LABELS if k in r)

    system = lines[log_path(project / ".kollm", "system", result.run_id)]
    assert {r["component"] for r in system} == {"runner"} and {r["project"] for r in system} == {"testproj"}
    events = [r["event"] for r in system]
    assert events[0] == "pipeline_started" and events[-1] == "pipeline_finished" and "step_error" in events
    error = next(r for r in system if r["event"] == "step_error")
    assert error["level"] == "ERROR" and error["step"] == "flaky" and "transient failure" in error["traceback"]

    training = lines[log_path(project / ".kollm", "training", "cpt")]
    metrics = [r for r in training if r["event"] == "train_metrics"]
    assert [r["global_step"] for r in metrics] == [1, 2] and all(r["step"] == "cpt" and r["loss"] > 0 for r in metrics)
    assert any(r["event"] == "params" for r in training)

    api = lines[log_path(project / ".kollm", "api")]
    assert [(r["status"], r["level"]) for r in api] == [(200, "INFO"), (404, "INFO"), (500, "ERROR")]
    assert all(r["model"] == "tiny" and r["component"] == "serve" for r in api)
    (generation,) = lines[log_path(project / ".kollm", "inference")]
    assert generation["event"] == "generation" and generation["model"] == "tiny" and generation["model_version"] == "3"
    assert generation["request_id"] == api[0]["request_id"] and len(generation["user"]) < 300
