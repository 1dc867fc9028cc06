"""Fuzzing the live server (real engine on the tiny model): no request, valid or not, may cause a 5xx.

schemathesis generates requests from the app's OpenAPI spec (valid ones, and invalid ones that break the
schema); hypothesis adds raw bodies (arbitrary bytes and arbitrary JSON). After each run the server must
still answer a normal request.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from .conftest import start_server

pytestmark = pytest.mark.slow(reason="schemathesis and hypothesis send hundreds of requests to a live server")


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir):
    from kollm.serve import create_app, load_engine

    # a short context keeps valid requests cheap: at most 32 tokens of prompt + output
    app = create_app(
        load_engine(tiny_model_dir, device="cpu", context_length=32), model_name="tiny", model_version="f1"
    )
    live = start_server(app)
    live.spec = app.openapi()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def fuzz_gateway(tiny_model_dir):
    """The canary gateway as `kollm serve --canary` runs it: two arms (their own engines) at 50 %, behind the Host
    check."""
    from kollm.hostcheck import HostCheck, allowed_hosts
    from kollm.serve import create_app, load_engine
    from kollm.serve.gateway import Arm, Gateway

    arms = [
        Arm(
            create_app(
                load_engine(tiny_model_dir, device="cpu", context_length=32), model_name="tiny", model_version=v
            ),
            version=v,
            model_name="tiny",
        )
        for v in ("1", "2")
    ]
    gateway = Gateway(*arms)
    gateway.set_weight(50)
    live = start_server(HostCheck(gateway, allowed_hosts("127.0.0.1")))
    live.spec = arms[0].app.openapi()
    yield live
    live.stop()


def check(response_status: int, body: bytes, content_type: str) -> None:
    assert response_status < 500, body[:500]
    if response_status >= 400 and content_type.startswith("application/json"):
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}


def still_serving(url: str) -> None:
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "안녕", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_finds_no_server_error(fuzz_server, mode):
    schema = schemathesis.openapi.from_dict(fuzz_server.spec)
    calls = []

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=schema.as_strategy(generation_mode=mode))
    def fuzz(case):
        response = case.call(base_url=fuzz_server.url, timeout=60)
        calls.append(response.status_code)
        content_type = response.headers.get("content-type") or [""]  # schemathesis gives each header as a list
        check(response.status_code, response.content, content_type[0])

    fuzz()
    assert len(calls) >= 40
    if mode is GenerationMode.POSITIVE:
        assert 200 in calls  # valid requests were really served, not all rejected
    else:
        assert any(400 <= s < 500 for s in calls)
    still_serving(fuzz_server.url)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_schemathesis_through_the_gateway_finds_no_server_error(fuzz_gateway, mode):
    """The serving API's schema, bounded to 25 examples a mode, against the gateway: its body buffering, user
    routing and header rewriting never turn a request into a 5xx."""
    schema = schemathesis.openapi.from_dict(fuzz_gateway.spec)
    arms = set()

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=schema.as_strategy(generation_mode=mode))
    def fuzz(case):
        response = case.call(base_url=fuzz_gateway.url, timeout=60)
        arms.update(response.headers.get("x-kollm-arm") or [])
        content_type = response.headers.get("content-type") or [""]
        check(response.status_code, response.content, content_type[0])

    fuzz()
    assert arms and arms <= {"stable", "canary"}  # the gateway dispatched them
    still_serving(fuzz_gateway.url)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
fields = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "other", ""]) | st.text(max_size=5)},
    optional={
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": json_values}
            ),
            max_size=3,
        )
        | json_values,
        "prompt": st.text(max_size=40) | json_values,
        "max_tokens": st.integers(-5, 10_000) | json_values,
        "temperature": st.floats(-1, 3) | json_values,
        "top_p": st.floats(-1, 2) | json_values,
        "n": st.integers(-1, 20) | json_values,
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | json_values,
        "seed": st.integers(-(2**70), 2**70) | json_values,
        "stream": st.booleans() | json_values,
    },
)


def test_raw_bodies_never_cause_a_server_error(fuzz_server):
    seen = []
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as http:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(
            path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
            body=st.binary(max_size=200)
            | json_values.map(lambda v: json.dumps(v).encode())
            | fields.map(lambda v: json.dumps(v).encode()),
        )
        def fuzz(path, body):
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            seen.append(r.status_code)
            check(r.status_code, r.content, r.headers.get("content-type", ""))

        fuzz()
    assert len(seen) >= 100 and any(s == 400 for s in seen)
    still_serving(fuzz_server.url)
