"""Unit tests of the HTTP layer (kollm.serve.router) over a scripted fake engine."""

from __future__ import annotations

import json

import pytest
from .fake_engine import FakeEngine
from prometheus_client import REGISTRY
from starlette.testclient import TestClient

from kollm.serve.engine import EngineClosed, EngineOverloaded
from kollm.serve.router import create_app

REPLY = "안녕하세요, kollm입니다."


def make(engine: FakeEngine | None = None, **kwargs) -> tuple[TestClient, FakeEngine]:
    engine = engine or FakeEngine(REPLY)
    kwargs.setdefault("model_name", "ko-chat")
    kwargs.setdefault("model_version", "3")
    return TestClient(create_app(engine, **kwargs), raise_server_exceptions=False), engine


def chat(content="안녕?", **extra) -> dict:
    return {"model": "ko-chat", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(text: str) -> list:
    events = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_chat_completion_shape_usage_and_headers():
    client, engine = make()
    r = client.post("/v1/chat/completions", json=chat(max_tokens=5), headers={"x-request-id": "req-123"})
    assert r.status_code == 200
    assert r.headers["x-kollm-model-version"] == "3"
    assert r.headers["x-request-id"] == "req-123"
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "ko-chat" and body["id"] == "chatcmpl-req-123"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": REPLY[:5], "refusal": None},
            "finish_reason": "length",
            "logprobs": None,
        }
    ]
    prompt_len = len(engine.calls[0][0])
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 5, "total_tokens": prompt_len + 5}


def test_sampling_fields_reach_the_engine():
    client, engine = make()
    body = chat(temperature=0.7, top_p=0.9, stop=["kollm"], seed=11, n=3, ignore_eos=True)
    body["messages"] = [
        {"role": "developer", "content": "존댓말로"},
        {"role": "user", "content": [{"type": "text", "text": "안녕"}, {"type": "text", "text": "하세요"}]},
    ]
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert all(c["message"]["content"] == "안녕하세요, " and c["finish_reason"] == "stop" for c in choices)
    assert [(t.role, t.content) for t in engine.last_chat] == [("system", "존댓말로"), ("user", "안녕하세요")]
    params = [p for _, p, _ in engine.calls]
    assert [p.seed for p in params] == [11, 12, 13]  # distinct but reproducible choices
    assert {(p.temperature, p.top_p, p.stop, p.ignore_eos) for p in params} == {(0.7, 0.9, ("kollm",), True)}
    # no max_tokens on chat: the rest of the context
    assert params[0].max_tokens == engine.context_length - len(engine.calls[0][0])


def test_max_completion_tokens_and_completion_default():
    client, engine = make()
    assert (
        client.post("/v1/chat/completions", json=chat(max_completion_tokens=4)).json()["choices"][0]["message"][
            "content"
        ]
        == REPLY[:4]
    )
    r = client.post("/v1/completions", json={"model": "ko-chat", "prompt": "서울은"})
    assert engine.calls[-1][1].max_tokens == 16  # OpenAI's default for completions
    assert r.json()["choices"][0]["text"] == REPLY[:16]


def test_completions_several_prompts_times_n():
    client, engine = make()
    r = client.post("/v1/completions", json={"model": "ko-chat", "prompt": ["가", "나다"], "n": 2, "max_tokens": 3})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [len(ids) for ids, _, _ in engine.calls] == [1, 1, 2, 2]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}


def test_chat_stream_events():
    client, _ = make()
    r = client.post(
        "/v1/chat/completions", json=chat(stream=True, n=2, max_tokens=6, stream_options={"include_usage": True})
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-kollm-model-version"] == "3"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 12
    chunks = events[:-2]
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "ko-chat" for e in chunks)
    for index in (0, 1):
        mine = [e["choices"][0] for e in chunks if e["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content") or "" for c in mine) == REPLY[:6]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["length"]
        assert mine[-1]["finish_reason"] == "length"


def test_completion_stream_holds_back_stop_prefix():
    client, _ = make()
    r = client.post(
        "/v1/completions",
        json={"model": "ko-chat", "prompt": "x", "stream": True, "stop": "kollm입니", "max_tokens": 50},
    )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == "안녕하세요, "
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


BAD = [
    # (raw body, status, param, code)
    (b"{", 400, None, "invalid_request"),
    (b"\xff\xfe{}", 400, None, None),
    (b"[1, 2]", 400, None, "invalid_request"),
    (b'"text"', 400, None, "invalid_request"),
    (b"", 400, None, "invalid_request"),
    (json.dumps({"model": "ko-chat", "messages": []}).encode(), 400, "messages", "invalid_request"),
    (json.dumps({"model": "ko-chat"}).encode(), 400, "messages", "invalid_request"),
    (json.dumps(chat(foo=1)).encode(), 400, "foo", "invalid_request"),
    (json.dumps(chat(top_logprobs=2)).encode(), 400, "top_logprobs", "invalid_request"),
    (json.dumps(chat(logprobs=True, top_logprobs=21)).encode(), 400, "top_logprobs", "invalid_request"),
    (
        json.dumps(chat(tools=[{"type": "function", "function": {"name": "f g"}}])).encode(),
        400,
        "tools.0.function.name",
        "invalid_request",
    ),
    (json.dumps(chat(tool_choice="required")).encode(), 400, "tool_choice", "invalid_request"),
    (json.dumps(chat(response_format={"type": "json_schema"})).encode(), 400, "response_format", "invalid_request"),
    (json.dumps(chat(store=True)).encode(), 400, "store", "invalid_request"),
    (json.dumps(chat(modalities=["text", "audio"])).encode(), 400, "modalities", "invalid_request"),
    (json.dumps(chat(presence_penalty=2.5)).encode(), 400, "presence_penalty", "invalid_request"),
    (json.dumps(chat(logit_bias={"abc": 1})).encode(), 400, "logit_bias", "invalid_request"),
    (json.dumps(chat(logit_bias={"5": 101})).encode(), 400, "logit_bias", "invalid_request"),
    (json.dumps(chat(repetition_penalty=0)).encode(), 400, "repetition_penalty", "invalid_request"),
    (
        json.dumps({"model": "ko-chat", "messages": [{"role": "function", "content": "42", "name": "f"}]}).encode(),
        400,
        "messages.0.role",
        "invalid_request",
    ),
    (
        json.dumps(
            {
                "model": "ko-chat",
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            }
        ).encode(),
        400,
        "messages.0.content",
        "invalid_request",
    ),
    (json.dumps({"model": "ko-chat", "messages": [{"role": "user"}]}).encode(), 400, "messages.0.content", None),
    (json.dumps(chat(content=5)).encode(), 400, "messages.0.content", "invalid_request"),
    (json.dumps(chat(content=[])).encode(), 400, "messages.0.content", "invalid_request"),
    (
        json.dumps({"model": "ko-chat", "messages": [{"role": "robot", "content": "x"}]}).encode(),
        400,
        "messages.0.role",
        "invalid_request",
    ),
    (json.dumps(chat(temperature="hot")).encode(), 400, "temperature", "invalid_request"),
    (json.dumps(chat(temperature=2.5)).encode(), 400, "temperature", "invalid_request"),
    (
        b'{"model": "ko-chat", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        400,
        "temperature",
        "invalid_request",
    ),
    (json.dumps(chat(n=1.5)).encode(), 400, "n", "invalid_request"),
    (json.dumps(chat(n=0)).encode(), 400, "n", "invalid_request"),
    (json.dumps(chat(n=100)).encode(), 400, "n", "invalid_request"),
    (json.dumps(chat(stream="yes")).encode(), 400, "stream", "invalid_request"),
    (json.dumps(chat(stop="")).encode(), 400, "stop", "invalid_request"),
    (json.dumps(chat(max_tokens=0)).encode(), 400, "max_tokens", "invalid_request"),
    (json.dumps(chat(max_tokens=-3)).encode(), 400, "max_tokens", "invalid_request"),
    (json.dumps(chat(max_tokens="10")).encode(), 400, "max_tokens", "invalid_request"),
    (json.dumps(chat(max_tokens=60)).encode(), 400, "max_tokens", "context_length_exceeded"),
    (json.dumps(chat(max_tokens=10**30)).encode(), 400, "max_tokens", "context_length_exceeded"),
    (json.dumps(chat(content="가" * 100)).encode(), 400, "messages", "context_length_exceeded"),
    (json.dumps(chat(content="REJECT")).encode(), 400, "messages", "invalid_prompt"),
    (json.dumps(chat(max_tokens=3, max_completion_tokens=4)).encode(), 400, "max_tokens", None),
    (
        b'{"model": "ko-chat", "messages": [{"role": "user", "content": "\\ud800"}]}',
        400,
        "messages.0.content",
        "invalid_request",
    ),
    (
        b'{"model": "ko-chat", "messages": [{"role": "user", "content": "x"}], "\\udcff": 1}',
        400,
        None,
        "invalid_request",
    ),
    (json.dumps(chat(seed=2**70)).encode(), 400, "seed", "invalid_request"),
    (json.dumps({**chat(), "model": "gpt-4"}).encode(), 404, "model", "model_not_found"),
]


@pytest.mark.parametrize("raw,status,param,code", BAD)
def test_bad_chat_requests_get_openai_errors(raw, status, param, code):
    client, engine = make()
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["x-kollm-model-version"] == "3"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert engine.calls == []  # nothing bad reached the engine
    assert (
        client.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200
    )  # and the server keeps serving


def test_bad_completion_requests():
    client, _ = make()
    for body, param in [
        ({"model": "ko-chat", "prompt": ""}, "prompt"),
        ({"model": "ko-chat", "prompt": []}, "prompt"),
        ({"model": "ko-chat", "prompt": "가" * 64}, "prompt"),
        ({"model": "ko-chat", "prompt": ["a"] * 5, "n": 16}, "n"),
        ({"model": "ko-chat", "prompt": "a", "messages": []}, "messages"),
    ]:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param, (body, r.text)


def test_engine_overload_and_shutdown_are_503_not_bad_requests():
    client, engine = make()
    engine.fail_with = EngineOverloaded("4096 requests are already waiting")
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    engine.fail_with = EngineClosed("the server is shutting down")
    r = client.post("/v1/completions", json={"model": "ko-chat", "prompt": "x", "stream": True})
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


def test_engine_bug_is_a_500_with_the_openai_shape_and_headers():
    client, engine = make()
    engine.fail_with = RuntimeError("boom")
    r = client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 500
    assert r.headers["x-kollm-model-version"] == "3"
    assert r.json()["error"]["code"] == "internal_error"


def test_api_key():
    client, _ = make(api_key="s3cret")
    for headers in (
        {},
        {"authorization": "Bearer nope"},
        {"authorization": "s3cret"},
        {"authorization": "Basic s3cret"},
    ):
        r = client.post("/v1/chat/completions", json=chat(), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["x-kollm-model-version"] == "3"
    assert client.get("/v1/models").status_code == 401
    assert (
        client.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer s3cret"}).status_code == 200
    )
    assert client.get("/v1/models", headers={"authorization": "bearer s3cret"}).status_code == 200
    # probes and scraping stay open
    assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
    assert client.get("/metrics").status_code == 200


def test_models_health_ready():
    client, engine = make(model_version=None)
    r = client.get("/v1/models")
    assert r.json()["data"][0]["id"] == "ko-chat" and r.json()["data"][0]["max_model_len"] == 64
    assert r.headers["x-kollm-model-version"] == "unversioned"
    assert client.get("/v1/models/ko-chat").status_code == 200
    assert client.get("/v1/models/other").status_code == 404
    assert client.get("/health").json() == {"status": "ok", "serving_path": "fake engine (tests)"}
    engine.is_ready = False
    assert client.get("/ready").status_code == 503
    assert client.get("/health").status_code == 200
    r = client.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("no route")
    assert client.get("/v1/chat/completions").status_code == 405


def test_metrics_count_by_version_and_status():
    client, _ = make(model_version="m-41")
    ok_before = metric("kollm_requests_total", model_version="m-41", endpoint="/v1/chat/completions", status_code="200")
    bad_before = metric(
        "kollm_requests_total", model_version="m-41", endpoint="/v1/chat/completions", status_code="400"
    )
    tokens_before = metric("kollm_output_tokens_total", model_version="m-41")
    for _ in range(3):
        client.post("/v1/chat/completions", json=chat(max_tokens=4))
    client.post("/v1/chat/completions", json=chat(max_tokens=0))
    client.get("/no/such/route")
    assert (
        metric("kollm_requests_total", model_version="m-41", endpoint="/v1/chat/completions", status_code="200")
        == ok_before + 3
    )
    assert (
        metric("kollm_requests_total", model_version="m-41", endpoint="/v1/chat/completions", status_code="400")
        == bad_before + 1
    )
    assert metric("kollm_requests_total", model_version="m-41", endpoint="other", status_code="404") >= 1
    assert metric("kollm_output_tokens_total", model_version="m-41") == tokens_before + 12
    assert metric("kollm_request_latency_seconds_count", model_version="m-41", endpoint="/v1/chat/completions") >= 4
    assert metric("kollm_time_to_first_token_seconds_count", model_version="m-41", endpoint="/v1/chat/completions") >= 3
    assert metric("kollm_requests_in_flight", model_version="m-41") == 0
    text = client.get("/metrics").text
    for name in (
        "kollm_requests_total",
        "kollm_request_latency_seconds_bucket",
        "kollm_time_to_first_token_seconds_bucket",
        "kollm_output_tokens_total",
        "kollm_request_tokens_per_second_bucket",
        "kollm_requests_in_flight",
        "kollm_queue_depth",
    ):
        assert name in text


def test_json_logs_share_the_request_id(tmp_path):
    client, _ = make(log_dir=tmp_path)
    client.post("/v1/chat/completions", json=chat(max_tokens=2, user="u-9"), headers={"x-request-id": "abc-1"})
    client.post("/v1/chat/completions", json=chat(max_tokens=0))
    api = [json.loads(line) for line in (tmp_path / "api" / "api.jsonl").read_text().splitlines()]
    inference = [json.loads(line) for line in (tmp_path / "inference" / "inference.jsonl").read_text().splitlines()]
    assert [(e["request_id"], e["status"]) for e in api][0] == ("abc-1", 200)
    assert api[1]["status"] == 400 and api[1]["request_id"] != "abc-1"
    assert all(e["model_version"] == "3" and e["latency_ms"] >= 0 for e in api)
    assert len(inference) == 1
    entry = inference[0]
    assert entry["request_id"] == "abc-1" and entry["completion_tokens"] == 2 and entry["user"] == "u-9"
    assert entry["finish_reasons"] == ["length"] and entry["ttft_s"] is not None


def test_openapi_spec_documents_request_bodies():
    client, _ = make()
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("ChatCompletionRequest")
    assert spec["components"]["schemas"]["ChatCompletionRequest"]["additionalProperties"] is False


def test_lifespan_shuts_the_engine_down():
    client, engine = make()
    with client:
        assert client.get("/health").status_code == 200
    assert engine.shut_down
