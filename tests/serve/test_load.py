"""Load: 2,000 requests at concurrency 32 against kollm on uvicorn (tiny model), with zero errors."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from prometheus_client import REGISTRY

pytestmark = pytest.mark.slow

TOTAL = 2000
CONCURRENCY = 32


def served(version: str) -> float:
    return sum(
        s.value
        for m in REGISTRY.collect()
        if m.name == "kollm_requests"
        for s in m.samples
        if s.name == "kollm_requests_total" and s.labels["model_version"] == version and s.labels["endpoint"].startswith("/v1/")
    )


def test_2000_requests_at_concurrency_32(tiny_server):
    before = served("7")
    peak_in_flight = 0

    async def main():
        nonlocal peak_in_flight
        statuses: list[int] = []
        tokens = 0
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(TOTAL):
            queue.put_nowait(i)
        in_flight = 0

        async def worker(http: httpx.AsyncClient):
            nonlocal tokens, in_flight, peak_in_flight
            while not queue.empty():
                i = queue.get_nowait()
                in_flight += 1
                peak_in_flight = max(peak_in_flight, in_flight)
                try:
                    if i % 10 < 5:
                        r = await http.post("/v1/completions", json={"model": "tiny", "prompt": f"요청 {i}", "max_tokens": 4, "temperature": 0.8, "seed": i})
                        statuses.append(r.status_code)
                        tokens += r.json()["usage"]["completion_tokens"]
                    elif i % 10 < 8:
                        body = {"model": "tiny", "messages": [{"role": "user", "content": f"질문 {i}"}], "max_tokens": 4}
                        r = await http.post("/v1/chat/completions", json=body)
                        statuses.append(r.status_code)
                        tokens += r.json()["usage"]["completion_tokens"]
                    else:
                        body = {"model": "tiny", "messages": [{"role": "user", "content": f"질문 {i}"}], "max_tokens": 4, "stream": True,
                                "stream_options": {"include_usage": True}}
                        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                        statuses.append(r.status_code)
                        assert lines[-1] == "data: [DONE]"
                        tokens += json.loads(lines[-2][6:])["usage"]["completion_tokens"]
                finally:
                    in_flight -= 1

        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=tiny_server.url, limits=limits, timeout=120) as http:
            await asyncio.gather(*(worker(http) for _ in range(CONCURRENCY)))
        return statuses, tokens

    start = time.perf_counter()
    statuses, tokens = asyncio.run(main())
    elapsed = time.perf_counter() - start
    print(f"\n{TOTAL} requests at concurrency {CONCURRENCY}: {elapsed:.1f}s, {TOTAL / elapsed:.0f} req/s, {tokens / elapsed:.0f} output tok/s")
    assert len(statuses) == TOTAL
    assert statuses.count(200) == TOTAL, {s: statuses.count(s) for s in set(statuses)}
    assert peak_in_flight == CONCURRENCY
    assert 1 <= tokens <= 4 * TOTAL
    assert served("7") - before == TOTAL
