"""The canary gateway in front of two real serving apps (create_app around fake engines), on real uvicorn."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter

import httpx
import openai
import pytest
from .conftest import start_server
from .fake_engine import FakeEngine

from kollm.serve import create_app
from kollm.serve.gateway import Arm, Gateway, user_bucket

CHAT = "/v1/chat/completions"


def body(user: str | None = None, **extra) -> dict:
    b = {"model": "m", "messages": [{"role": "user", "content": "안녕"}], "max_tokens": 3, **extra}
    if user is not None:
        b["user"] = user
    return b


def gateway(weight: float = 0.0, *, stable_delay: float = 0.0, canary_delay: float = 0.0):
    engines = {
        "1": FakeEngine("stable reply", delay=stable_delay, context_length=100_000),
        "2": FakeEngine("canary reply", delay=canary_delay, context_length=100_000),
    }
    arms = [Arm(create_app(e, model_name="m", model_version=v), version=v, model_name="m") for v, e in engines.items()]
    gw = Gateway(arms[0], arms[1])
    gw.set_weight(weight)
    return gw, engines


@pytest.fixture
def served():
    servers = []

    def serve(gw):
        servers.append(start_server(gw))
        return servers[-1].url

    yield serve
    for s in servers:
        s.stop()


def test_header_override_and_version_header(served):
    gw, engines = gateway(weight=0)
    url = served(gw)
    with httpx.Client(base_url=url) as c:
        r = c.post(CHAT, json=body(), headers={"x-kollm-canary": "always"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "can"
        assert r.headers.get_list("x-kollm-model-version") == ["2"] and r.headers["x-kollm-arm"] == "canary"
        r = c.post(CHAT, json=body())
        assert r.headers.get_list("x-kollm-model-version") == ["1"] and r.headers["x-kollm-arm"] == "stable"
        gw.set_weight(100)
        assert c.post(CHAT, json=body(), headers={"x-kollm-canary": "never"}).headers["x-kollm-model-version"] == "1"
        assert c.post(CHAT, json=body()).headers["x-kollm-model-version"] == "2"
        bad = c.post(CHAT, json=body(), headers={"x-kollm-canary": "sometimes"})
        assert bad.status_code == 400 and "always" in bad.json()["error"]["message"]
        assert c.get("/v1/models").json()["data"][0]["id"] == "m"


def test_sticky_by_user_and_monotone_as_the_weight_grows(served):
    gw, _ = gateway(weight=30)
    url = served(gw)
    users = [f"user-{i}" for i in range(60)]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)

    def arms_of() -> dict[str, str]:
        out = {}
        for u in users:
            raw = client.chat.completions.with_raw_response.create(
                model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, user=u
            )
            out[u] = raw.headers["x-kollm-arm"]
        return out

    first, again = arms_of(), arms_of()
    assert first == again  # sticky
    assert first == {u: "canary" if user_bucket(u) < 30 else "stable" for u in users}
    assert 5 < Counter(first.values())["canary"] < 35
    gw.set_weight(60)
    grown = arms_of()
    assert all(grown[u] == "canary" for u in users if first[u] == "canary")  # nobody flips back
    assert Counter(grown.values())["canary"] > Counter(first.values())["canary"]


def test_buffered_body_reaches_the_chosen_app_intact(served):
    gw, engines = gateway(weight=50)
    url = served(gw)
    long_text = "한국어 " * 5000  # arrives in several chunks
    with httpx.Client(base_url=url) as c:
        r = c.post(CHAT, json={**body(user="u1"), "messages": [{"role": "user", "content": long_text}]})
        assert r.status_code == 200
        served_by = engines[r.headers["x-kollm-model-version"]]
        assert served_by.last_chat[-1].content == long_text
        # bad JSON still gets the serving app's own 400, not a gateway error
        r = c.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()


def test_streaming_through_the_gateway(served):
    gw, _ = gateway(weight=0)
    url = served(gw)
    with (
        httpx.Client(base_url=url) as c,
        c.stream("POST", CHAT, json=body(stream=True, max_tokens=6), headers={"x-kollm-canary": "always"}) as r,
    ):
        assert r.headers["x-kollm-model-version"] == "2"
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in lines[:-1]
        if json.loads(line[6:])["choices"]
    )
    assert text == "canary"


def test_promotion_mid_request_finishes_on_the_old_arm_and_retires_it_after(served):
    """A slow stable request in flight while the canary is promoted completes on the old version; the old
    engine is shut down only after it finished; new requests go to the new version."""
    gw, engines = gateway(weight=0, stable_delay=0.05)
    loops = []

    async def remember_loop():
        loops.append(asyncio.get_running_loop())

    gw.on_startup.append(remember_loop)
    url = served(gw)
    results = {}

    def slow_request():
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post(CHAT, json=body(max_tokens=12))
            results["slow"] = (
                r.status_code,
                r.headers["x-kollm-model-version"],
                r.json()["choices"][0]["message"]["content"],
            )

    t = threading.Thread(target=slow_request)
    t.start()
    while gw.stable.inflight == 0:
        threading.Event().wait(0.005)

    async def promote():  # on the server's loop, as the rollout controller does
        gw.promote_canary()

    asyncio.run_coroutine_threadsafe(promote(), loops[0]).result(timeout=5)
    with httpx.Client(base_url=url) as c:
        assert c.post(CHAT, json=body()).headers["x-kollm-model-version"] == "2"
    assert not engines["1"].shut_down  # still serving the slow request
    t.join(timeout=30)
    assert results["slow"] == (200, "1", "stable reply")
    for _ in range(100):
        if engines["1"].shut_down:
            break
        threading.Event().wait(0.02)
    assert engines["1"].shut_down and not engines["2"].shut_down


def test_arms_keep_samples_only_while_an_analysis_window_is_open(served):
    """The stable arm and a canary outside a rollout keep no per-request samples (their traffic is unbounded);
    an open window on the canary keeps every one of its requests for the analysis."""
    gw, _ = gateway(weight=0)
    url = served(gw)
    with httpx.Client(base_url=url) as c:
        for _ in range(5):
            assert c.post(CHAT, json=body()).headers["x-kollm-arm"] == "stable"
            assert c.post(CHAT, json=body(), headers={"x-kollm-canary": "always"}).headers["x-kollm-arm"] == "canary"
        assert gw.stable.take_window()[0] == [] and gw.canary.take_window()[0] == []  # the latter opens a window
        gw.stable.close_window()
        for _ in range(3):
            c.post(CHAT, json=body(), headers={"x-kollm-canary": "always"})
            c.post(CHAT, json=body())
        samples, pending = gw.canary.take_window()
        assert len(samples) == 3 and all(s.ok for s in samples) and pending == []
        assert gw.stable.take_window()[0] == []
        gw.canary.close_window()
        c.post(CHAT, json=body(), headers={"x-kollm-canary": "always"})
        assert gw.canary.take_window()[0] == []


@pytest.mark.parametrize("weight", [0, 50, 100])
def test_bodies_over_the_buffer_limit_are_served_at_every_weight(served, monkeypatch, weight):
    """A body larger than the gateway buffers is not rejected mid-rollout (nor at any weight): what was read is
    replayed, the rest streams through, and the chosen app gets it intact."""
    import kollm.serve.gateway as gateway_module

    monkeypatch.setattr(gateway_module, "MAX_BODY_BYTES", 1000)
    gw, engines = gateway(weight=weight)
    url = served(gw)
    long_text = "한국어 " * 20_000  # well over 64 KiB: several receive() messages, the first already over the limit
    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(3):
            r = c.post(CHAT, json={**body(user=f"u{i}"), "messages": [{"role": "user", "content": long_text}]})
            assert r.status_code == 200, r.text
            assert engines[r.headers["x-kollm-model-version"]].last_chat[-1].content == long_text
        small = c.post(CHAT, json=body(user="u1"))  # under the limit the user is still read (sticky)
        assert small.status_code == 200
        if weight == 50:
            assert small.headers["x-kollm-arm"] == ("canary" if user_bucket("u1") < 50 else "stable")
