"""Load: 2,000 requests at concurrency 32 against `kollm serve` (its own process, tiny model), with zero errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import free_port, wait_ready
from .rawhttp import Connection

pytestmark = pytest.mark.slow(reason="2,000 requests against a `kollm serve` process")

TOTAL = 2000
CONCURRENCY = 32


def served(url: str) -> float:
    """Requests to /v1 routes counted by the server's own Prometheus metrics."""
    text = httpx.get(url + "/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "kollm_requests"
        for sample in family.samples
        if sample.name == "kollm_requests_total" and sample.labels["endpoint"].startswith("/v1/")
    )


@pytest.fixture(scope="module")
def server_process(tiny_model_dir, tmp_path_factory):
    port = free_port()
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
        cwd=tmp_path_factory.mktemp("load"),
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_2000_requests_at_concurrency_32(server_process):
    url = server_process
    port = int(url.rsplit(":", 1)[1])
    before = served(url)
    peak_in_flight = 0

    async def main():
        nonlocal peak_in_flight
        statuses: list[int] = []
        tokens = 0
        todo = list(range(TOTAL))[::-1]
        in_flight = 0

        async def client():
            nonlocal tokens, in_flight, peak_in_flight
            conn = await Connection.open("127.0.0.1", port)  # one keep-alive connection per client
            try:
                while todo:
                    i = todo.pop()
                    in_flight += 1
                    peak_in_flight = max(peak_in_flight, in_flight)
                    if i % 10 < 5:
                        body = {"model": "tiny", "prompt": f"요청 {i}", "max_tokens": 4, "temperature": 0.8, "seed": i}
                        status, _, data = await conn.request("POST", "/v1/completions", json.dumps(body).encode())
                        if status == 200:
                            tokens += json.loads(data)["usage"]["completion_tokens"]
                    elif i % 10 < 8:
                        body = {
                            "model": "tiny",
                            "messages": [{"role": "user", "content": f"질문 {i}"}],
                            "max_tokens": 4,
                        }
                        status, _, data = await conn.request("POST", "/v1/chat/completions", json.dumps(body).encode())
                        if status == 200:
                            tokens += json.loads(data)["usage"]["completion_tokens"]
                    else:
                        body = {
                            "model": "tiny",
                            "messages": [{"role": "user", "content": f"질문 {i}"}],
                            "max_tokens": 4,
                            "stream": True,
                            "stream_options": {"include_usage": True},
                        }
                        status, headers, data = await conn.request(
                            "POST", "/v1/chat/completions", json.dumps(body).encode()
                        )
                        if status == 200:
                            events = [e for e in data.decode().split("\n\n") if e]
                            assert (
                                headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"
                            )
                            tokens += json.loads(events[-2][6:])["usage"]["completion_tokens"]
                    statuses.append(status)
                    in_flight -= 1
            finally:
                await conn.close()

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
        return statuses, tokens

    start = time.perf_counter()
    statuses, tokens = asyncio.run(main())
    elapsed = time.perf_counter() - start
    print(
        f"\n{TOTAL} requests at concurrency {CONCURRENCY}: {elapsed:.1f}s, {TOTAL / elapsed:.0f} req/s, {tokens / elapsed:.0f} output tok/s"
    )
    assert len(statuses) == TOTAL
    assert statuses.count(200) == TOTAL, {s: statuses.count(s) for s in set(statuses)}
    assert peak_in_flight == CONCURRENCY
    assert TOTAL <= tokens <= 4 * TOTAL
    assert served(url) - before == TOTAL
