"""Drift of served traffic: per-request features in the serving log, PSI/KS against the training data, the
report, MLflow metrics and the exporter's gauges."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import pandas as pd
import pytest

from kollm.errors import ConfigError, KollmError
from kollm.monitor.drift import check_drift, parse_window, psi
from kollm.monitor.exporter import exporter_registry
from kollm.monitor.features import text_features
from kollm.serve import create_app
from tests.serve.conftest import start_server
from tests.serve.fake_engine import FakeEngine

KOREAN = [
    "오늘 서울의 날씨는 맑고 기온은 {n}도입니다.",
    "한국어 언어 모델을 학습하는 방법을 알려 주세요 {n}.",
    "회의는 오후 {n}시에 시작합니다. 자료를 준비해 주세요.",
    "이 문서를 세 문장으로 요약해 주세요: 정부는 {n}일 발표했다.",
]
ENGLISH = [
    "Please summarise this report about quarterly revenue number {n}.",
    "What is the weather like in Berlin on day {n}?",
]


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, 5000)
    assert psi(ref, rng.normal(0, 1, 2000)) < 0.02
    assert psi(ref, rng.normal(1.0, 1, 2000)) > 0.25
    zeros = np.zeros(1000)  # a discrete feature (PII hits): the quantile edges collapse to one
    assert psi(zeros, np.zeros(100)) == pytest.approx(0.0)
    assert psi(zeros, np.ones(100)) > 1.0
    ones = np.ones(1000)  # a point mass at the top (all-Hangul training text) against lower values
    assert psi(ones, np.full(100, 0.2)) > 1.0 and psi(ones, np.ones(100)) == pytest.approx(0.0)


def test_text_features():
    f = text_features("홍길동 010-1234-5678, hong@example.com 😀")
    assert f["pii_hits"] == 2 and f["hangul_ratio"] == pytest.approx(
        3 / 17, abs=1e-4
    )  # 홍길동 / (홍길동 hong example com)
    assert f["prompt_chars"] == len("홍길동 010-1234-5678, hong@example.com 😀")
    assert f["unknown_char_rate"] == pytest.approx(1 / f["prompt_chars"], abs=1e-4)
    assert text_features("Привет мир")["unknown_char_rate"] == pytest.approx(0.9)
    assert text_features("")["prompt_chars"] == 0.0


@pytest.mark.parametrize("text", ["24", "h", "-1h", "1w"])
def test_bad_window_is_named(text):
    with pytest.raises(ConfigError, match="--window"):
        parse_window(text)


def _reference(folder, n=400):
    folder.mkdir(parents=True)
    rows = [KOREAN[i % len(KOREAN)].format(n=i) for i in range(n)]
    pd.DataFrame({"text": rows, "source": "test"}).to_parquet(folder / "train.parquet")
    (folder / "stats.json").write_text(json.dumps({"dataset": "corpus", "rows_kept": n}))
    return folder


def _serve(project, prompts, chat_every=2, system=None, embedder=None):
    """Send the prompts through a real kollm serving app (fake engine) that logs under project/.kollm/logs."""
    live = start_server(
        create_app(
            FakeEngine(context_length=512),
            model_name="m",
            model_version="1",
            log_dir=project / ".kollm" / "logs",
            embedder=embedder,
        )
    )
    try:
        with httpx.Client(base_url=live.url, timeout=30) as client:
            for i, p in enumerate(prompts):
                if i % chat_every:
                    system_turn = [{"role": "system", "content": system}] if system else []
                    body = {"model": "m", "messages": [*system_turn, {"role": "user", "content": p}], "max_tokens": 3}
                    assert client.post("/v1/chat/completions", json=body).status_code == 200
                else:
                    assert (
                        client.post("/v1/completions", json={"model": "m", "prompt": p, "max_tokens": 3}).status_code
                        == 200
                    )
    finally:
        live.stop()


def test_serving_logs_request_features(tmp_path):
    _serve(tmp_path, ["안녕하세요 010-1234-5678", "hello"], chat_every=2, system="친절하게")
    lines = [
        json.loads(line)
        for line in (tmp_path / ".kollm" / "logs" / "inference" / "inference.jsonl").read_text().splitlines()
    ]
    completion, chat = lines
    assert completion["features"]["pii_hits"] == 1 and completion["features"]["hangul_ratio"] == 1.0
    assert completion["features"]["prompt_tokens"] == completion["prompt_tokens"]
    assert completion["features"]["output_tokens"] == completion["completion_tokens"] == 3
    assert chat["features"]["prompt_chars"] == len("친절하게\nhello")  # system + user messages
    assert chat["features"]["hangul_ratio"] == pytest.approx(4 / 9, abs=1e-3)


def test_the_native_engine_logs_output_perplexity(tmp_path, tiny_model_dir):
    """kollm's engine on a real (tiny) model: the logged output perplexity is exp of the mean negative logprob of the
    generated tokens, the same logprobs the API returns for that request; a fake engine that does not measure it
    logs none."""
    import math

    from kollm.serve import load_engine

    engine = load_engine(str(tiny_model_dir), device="cpu", max_batch_size=4)
    live = start_server(create_app(engine, model_name="m", model_version="1", log_dir=tmp_path / ".kollm" / "logs"))
    try:
        with httpx.Client(base_url=live.url, timeout=120) as client:
            body = {"model": "m", "prompt": "서울은", "max_tokens": 6, "temperature": 0, "logprobs": 0, "stream": False}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            logprobs = r.json()["choices"][0]["logprobs"]["token_logprobs"]
            chat = {
                "model": "m",
                "messages": [{"role": "user", "content": "안녕"}],
                "max_tokens": 5,
                "n": 2,
                "stream": True,
            }
            with client.stream("POST", "/v1/chat/completions", json=chat) as s:
                assert s.status_code == 200 and "[DONE]" in "".join(s.iter_text())
    finally:
        live.stop()
    completion, streamed = [
        json.loads(x) for x in (tmp_path / ".kollm" / "logs" / "inference" / "inference.jsonl").read_text().splitlines()
    ]
    expected = math.exp(-sum(logprobs) / len(logprobs))
    assert completion["features"]["output_perplexity"] == pytest.approx(expected, rel=1e-3)
    assert streamed["features"]["output_perplexity"] > 1.0 and streamed["n"] == 2  # over both choices
    from kollm.serve.metrics import OUTPUT_PERPLEXITY

    assert OUTPUT_PERPLEXITY.labels("1")._sum.get() >= expected  # the histogram behind `/metrics`
    _serve(tmp_path / "fake", ["안녕하세요"], chat_every=2)
    fake = json.loads((tmp_path / "fake" / ".kollm" / "logs" / "inference" / "inference.jsonl").read_text())
    assert "output_perplexity" not in fake["features"]


def test_drift_is_found_when_traffic_turns_english_and_not_for_similar_traffic(tmp_path):
    ref = _reference(tmp_path / ".kollm" / "artifacts" / "prepare" / "dataset")
    similar = [KOREAN[i % len(KOREAN)].format(n=(7 * i) % 400) for i in range(60)]  # same lengths as the reference
    _serve(tmp_path, similar)
    result = check_drift(tmp_path, window="1h", min_requests=50)
    assert result.reference == str(ref) and result.window_requests == 60 and result.drifted == []
    assert result.features["hangul_ratio"].psi < 0.25

    latest = json.loads((tmp_path / ".kollm" / "monitor" / "drift" / "latest.json").read_text())
    assert latest["drifted"] == [] and latest["mlflow_run_id"] == result.mlflow_run_id

    english = [ENGLISH[i % len(ENGLISH)].format(n=i) for i in range(120)]
    _serve(tmp_path, english)
    result = check_drift(tmp_path, window="1h", min_requests=50)
    assert result.window_requests == 180
    assert "hangul_ratio" in result.drifted and result.features["hangul_ratio"].ks_pvalue < 1e-6
    assert result.features["hangul_ratio"].current_mean < 0.5 < result.features["hangul_ratio"].reference_mean
    report = (tmp_path / ".kollm" / "monitor" / "drift").glob("drift-*.html")
    assert any("hangul_ratio" in p.read_text() and "drifted" in p.read_text() for p in report)

    from prometheus_client import generate_latest

    text = generate_latest(exporter_registry(tmp_path)).decode()
    assert 'kollm_drift_detected{feature="hangul_ratio"} 1.0' in text and "kollm_drift_window_requests 180.0" in text

    from kollm.registry import client

    c = client(tmp_path)
    runs = c.search_runs(
        [c.get_experiment_by_name("kollm-monitor").experiment_id], order_by=["attribute.start_time ASC"]
    )
    assert [r.data.tags["kollm.drifted"] for r in runs][0] == "none" and "hangul_ratio" in runs[-1].data.tags[
        "kollm.drifted"
    ]
    assert runs[-1].data.metrics["drift.hangul_ratio.psi"] == pytest.approx(result.features["hangul_ratio"].psi)
    assert runs[-1].data.metrics["drift.window_requests"] == 180


def _logged(project, n: int, timeout: float = 60) -> list[dict]:
    import time

    path, deadline = project / ".kollm" / "logs" / "inference" / "inference.jsonl", time.monotonic() + timeout
    while len(lines := path.read_text().splitlines() if path.exists() else []) < n:
        assert time.monotonic() < deadline, f"{len(lines)} of {n} log lines"
        time.sleep(0.1)
    return [json.loads(x) for x in lines]


TOPICS = [
    "주식 시장에서 반도체 종목이 {n}% 올랐고 투자자들이 매수에 나섰습니다.",
    "축구 대표팀이 {n}번째 경기에서 역전승을 거두었습니다.",
    "병원 응급실 대기 시간이 {n}분으로 늘어 환자들이 불편을 겪었습니다.",
    "새 스마트폰의 배터리가 {n}시간 동안 유지됩니다.",
]


def test_prompt_embeddings_drift_when_the_topic_moves(tmp_path, tiny_model_dir):
    """`kollm serve --embedding-model` logs each prompt's embedding (after the response); `kollm monitor drift
    --embedding-model` embeds the training texts with the same model: traffic like the training data passes the MMD²
    test, Korean traffic on other topics does not."""
    from kollm.monitor.embeddings import DIM, Embedder

    _reference(tmp_path / ".kollm" / "steps" / "k" / "dataset")
    embedder = Embedder(str(tiny_model_dir))
    _serve(tmp_path, [KOREAN[i % len(KOREAN)].format(n=(7 * i) % 400) for i in range(40)], embedder=embedder)
    lines = _logged(tmp_path, 40)  # written once each embedding is done, after the response
    assert all(len(x["embedding"]["vector"]) == DIM and x["embedding"]["model"] == str(tiny_model_dir) for x in lines)
    result = check_drift(tmp_path, window="1h", min_requests=30, track=False, embedding_model=str(tiny_model_dir))
    assert result.embedding is not None and not result.embedding.drifted and result.embedding.p_value > 0.05, (
        result.embedding
    )

    other = tmp_path / "other"
    _reference(other / ".kollm" / "steps" / "k" / "dataset")
    _serve(other, [TOPICS[i % len(TOPICS)].format(n=i) for i in range(40)], embedder=embedder)
    _logged(other, 40)
    result = check_drift(other, window="1h", min_requests=30, track=False, embedding_model=str(tiny_model_dir))
    assert result.embedding is not None and result.embedding.drifted and "embedding" in result.drifted, result.embedding
    assert result.features["hangul_ratio"].psi < 0.25  # the text features do not see it: both sides are Korean

    from prometheus_client import generate_latest

    text = generate_latest(exporter_registry(other)).decode()
    assert 'kollm_drift_detected{feature="embedding"} 1.0' in text and "kollm_drift_embedding_pvalue" in text
    with pytest.raises(KollmError, match="carry a prompt embedding by 'elsewhere'"):
        check_drift(other, window="1h", min_requests=30, track=False, embedding_model="elsewhere")


def test_too_little_traffic_is_a_clear_error(tmp_path):
    _reference(tmp_path / "ref")
    with pytest.raises(KollmError, match="only 0 served requests"):
        check_drift(tmp_path, tmp_path / "ref", window="1h", track=False)
    with pytest.raises(KollmError, match="no prepared dataset"):
        check_drift(tmp_path / "elsewhere", window="1h", track=False)


def test_cli_drift_json(tmp_path):
    _reference(tmp_path / "ref")
    _serve(tmp_path, [ENGLISH[i % 2].format(n=i) for i in range(40)])
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kollm.cli",
            "monitor",
            "drift",
            "--reference",
            str(tmp_path / "ref"),
            "--window",
            "1h",
            "--no-mlflow",
            "--json",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["window_requests"] == 40 and "hangul_ratio" in data["drifted"] and data["mlflow_run_id"] is None
    r = subprocess.run(
        [sys.executable, "-m", "kollm.cli", "monitor", "drift", "--reference", str(tmp_path / "ref"), "--window", "1x"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 2 and "--window '1x'" in r.stderr and "Traceback" not in r.stderr


def test_drift_run_keeps_its_artifacts_in_the_project_store(tmp_path, monkeypatch):
    """Found: `kollm monitor drift` left MLflow's default ./mlruns in the project root (the report artifact)."""
    project = tmp_path / "p"
    project.mkdir()
    (project / "kollm.yaml").write_text("project: driftp\nsteps:\n  - kind: python\n    config: {callable: 'm:f'}\n")
    _reference(project / "ref")
    _serve(project, [KOREAN[i % len(KOREAN)].format(n=i) for i in range(30)])
    monkeypatch.chdir(project)
    result = check_drift(project, reference=project / "ref", window="1h", min_requests=10)
    assert result.mlflow_run_id and not (project / "mlruns").exists()
    from kollm.registry import client

    uri = client(project).get_run(result.mlflow_run_id).info.artifact_uri
    assert uri.startswith((project / ".kollm" / "mlartifacts").resolve().as_uri())
