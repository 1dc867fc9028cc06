"""`kollm serve` as a user runs it: a real process, JSON logs under .kollm/logs, graceful shutdown on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from .conftest import free_port, wait_ready

pytestmark = pytest.mark.slow(reason="starts `kollm serve` processes and waits for their shutdown")


def test_sigterm_finishes_the_stream_in_flight_then_exits(tiny_model_dir, tmp_path):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", KOLLM_API_KEY="env-key")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kollm.cli",
            "serve",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--served-model-name",
            "tiny",
            "--device",
            "cpu",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        assert httpx.get(url + "/v1/models").status_code == 401  # $KOLLM_API_KEY turned auth on
        headers = {"authorization": "Bearer env-key"}
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 200 and r.headers["x-kollm-model-version"] == "local"
        body = {
            "model": "tiny",
            "prompt": "안녕하세요",
            "max_tokens": 200,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
            "stream_options": {"include_usage": True},
        }
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=60) as stream:
            for line in stream.iter_lines():
                if not line:
                    continue
                lines.append(line)
                if len(lines) == 2:
                    proc.send_signal(signal.SIGTERM)  # mid-stream
        assert lines[-1] == "data: [DONE]"
        usage = json.loads(lines[-2][len("data: ") :])["usage"]
        assert usage["completion_tokens"] == 200  # the request in flight was finished, not cut
        finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines[:-2]]
        assert finishes[-1] == "length"
        proc.wait(timeout=60)
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = proc.stdout.read()
    assert "Traceback" not in output, output
    api = [json.loads(line) for line in (tmp_path / ".kollm" / "logs" / "api" / "api.jsonl").read_text().splitlines()]
    inference = [
        json.loads(line)
        for line in (tmp_path / ".kollm" / "logs" / "inference" / "inference.jsonl").read_text().splitlines()
    ]
    streamed = [e for e in api if e["path"] == "/v1/completions"]
    assert len(streamed) == 1 and streamed[0]["status"] == 200
    assert inference[-1]["request_id"] == streamed[0]["request_id"] and inference[-1]["completion_tokens"] == 200


def test_serve_reports_a_missing_model_without_a_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "kollm.cli", "serve", str(tmp_path / "nope"), "--port", str(free_port())],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 4, r.stderr
    assert "Traceback" not in r.stderr and "not found" in r.stderr


def test_a_busy_port_fails_before_the_model_loads_with_exit_code_5(tiny_model_dir, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "kollm.cli", "serve", str(tiny_model_dir), "--port", str(port), "--device", "cpu"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert r.returncode == 5, (r.returncode, r.stderr)
    assert f"port {port} on 127.0.0.1 is already in use" in r.stderr and "--port" in r.stderr
    assert "Traceback" not in r.stderr and "loaded" not in r.stderr  # nothing was loaded
    # a model that cannot be found is still a not-found (4), and bad options a usage error (2): all distinct from the gate's 3
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kollm.cli",
            "serve",
            str(tiny_model_dir),
            "--port",
            str(free_port()),
            "--follow-interval",
            "-1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "--follow-interval" in r.stderr, r.stderr
