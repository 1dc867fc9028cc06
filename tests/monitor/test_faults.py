"""Fault injection (kollm.serve.faults): parsing, and 500s that the HTTP layer and its metrics see."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from kollm.errors import ConfigError
from kollm.serve import create_app
from kollm.serve.faults import FaultSpec, FaultyEngine, parse_faults
from tests.serve.conftest import free_port, start_server
from tests.serve.fake_engine import FakeEngine


def test_parse_faults():
    assert parse_faults("error_rate=0.3,latency_ms=200") == FaultSpec(0.3, 200.0, None)
    assert parse_faults(" latency_ms = 5 , seed=7") == FaultSpec(0.0, 5.0, 7)


@pytest.mark.parametrize(
    "text, message",
    [
        ("error_rate=2", "between 0 and 1"),
        ("latency_ms=-1", ">= 0"),
        ("error_rat=0.1", "KEY=VALUE with KEY one of error_rate, latency_ms, seed"),
        ("error_rate", "KEY=VALUE"),
        ("error_rate=lots", "not a number"),
        (",", "nothing to inject"),
    ],
)
def test_bad_faults_are_named(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_faults(text)


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    assert want
    return total


def test_injected_errors_are_500s_counted_by_the_serving_metrics():
    engine = FaultyEngine(FakeEngine(), FaultSpec(error_rate=0.5, latency_ms=1, seed=3))
    live = start_server(create_app(engine, model_name="fake", model_version="faulty-1"))
    try:
        statuses = []
        with httpx.Client(base_url=live.url, timeout=30) as client:
            for i in range(40):
                body = {"model": "fake", "messages": [{"role": "user", "content": f"질문 {i}"}], "max_tokens": 3}
                r = client.post("/v1/chat/completions", json=body)
                statuses.append(r.status_code)
                if r.status_code == 500:
                    assert r.json()["error"]["code"] == "internal_error"
                else:
                    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "안녕하"
            assert (
                client.post("/v1/chat/completions", json={"model": "fake", "messages": []}).status_code == 400
            )  # not injected
            assert client.get("/ready").status_code == 200
            assert client.get("/health").status_code == 200  # FaultyEngine delegates alive() (it once had none: a 500)
            text = client.get("/metrics").text
    finally:
        live.stop()
    assert statuses.count(500) == engine.injected and 5 < engine.injected < 35
    assert (
        _metric(
            text, "kollm_requests_total", model_version="faulty-1", endpoint="/v1/chat/completions", status_code="500"
        )
        == engine.injected
    )


def test_serve_names_a_bad_inject_faults_option(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kollm.cli",
            "serve",
            str(tmp_path / "model"),
            "--port",
            str(free_port()),
            "--inject-faults",
            "errors=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--inject-faults" in r.stderr and "error_rate" in r.stderr
