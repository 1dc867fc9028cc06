"""The real `openai` client against kollm on uvicorn (127.0.0.1), serving the tiny model."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from .conftest import start_server


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


MSG = [{"role": "system", "content": "한국어로 답하세요."}, {"role": "user", "content": "서울은 어떤 도시인가요?"}]


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_completion(client):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MSG, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert raw.headers["x-kollm-model-version"] == "7"
    assert raw.headers["x-request-id"]
    r = raw.parse()
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    again = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert again.choices[0].message.content == r.choices[0].message.content  # greedy is deterministic


def test_streaming_chat_equals_non_streaming(client):
    whole = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    stream = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert content == whole.choices[0].message.content
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20
    assert chunks[0].choices[0].delta.role == "assistant"


def test_completions_n_seed_and_stream(client):
    kwargs = dict(
        model="tiny",
        prompt="한국어 언어 모델을",
        max_tokens=12,
        temperature=1.0,
        top_p=0.95,
        n=3,
        seed=7,
        extra_body={"ignore_eos": True},
    )
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same answers
    assert len({c.text for c in a.choices}) > 1  # but the n choices differ from each other
    assert a.usage.completion_tokens == 36
    streamed = {}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in a.choices]


def test_stop_sequences(client):
    full = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].text
    stop = text[10:12]
    cut = client.completions.create(
        model="tiny",
        prompt="The quick brown fox",
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_errors_are_openai_errors(client, tiny_server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[])
    assert e.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=0)
    assert e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="가나다라 " * 200, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSG, extra_body={"frequency_penalty_typo": 1})
    assert "unknown field" in e.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSG, temperature="warm")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSG, stream=True, max_tokens=-1)
    raw = httpx.post(
        tiny_server.url + "/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
        headers={"content-type": "application/json"},
    )
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    # still serving
    assert client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices[0].finish_reason in (
        "length",
        "stop",
    )


def test_api_key_with_the_openai_client(tiny_model_dir):
    from kollm.serve import create_app, load_engine

    live = start_server(
        create_app(load_engine(tiny_model_dir, device="cpu"), model_name="tiny", model_version="1", api_key="k-123")
    )
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="k-123", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(live.url + "/health").status_code == 200
    finally:
        live.stop()


def test_logs_and_metrics_after_traffic(client, tiny_server):
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=MSG, max_tokens=3)
    rid = raw.headers["x-request-id"]

    def logged(kind: str) -> list[dict]:
        return [json.loads(line) for line in (tiny_server.log_dir / kind / f"{kind}.jsonl").read_text().splitlines()]

    deadline = (
        time.time() + 10
    )  # the access line is written once the last byte has gone out, just after the client has it
    while not any(e["request_id"] == rid for e in logged("api")) and time.time() < deadline:
        time.sleep(0.05)
    assert any(
        e["request_id"] == rid and e["status"] == 200 and e["path"] == "/v1/chat/completions" for e in logged("api")
    )
    assert any(e["request_id"] == rid and e["prompt_tokens"] > 0 for e in logged("inference"))
    text = httpx.get(tiny_server.url + "/metrics").text
    assert 'kollm_requests_total{endpoint="/v1/chat/completions",model_version="7",status_code="200"}' in text
    assert 'kollm_requests_total{endpoint="/v1/chat/completions",model_version="7",status_code="400"}' in text
    assert httpx.get(tiny_server.url + "/ready").json()["status"] == "ready"


def test_openai_client_defaults_logprobs_and_penalties(client):
    """The SDK's own parameters at their defaults, logprobs and penalties, against the real engine."""
    base = dict(model="tiny", messages=MSG, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**base)
    r = client.chat.completions.create(
        **base,
        logprobs=False,
        presence_penalty=0,
        frequency_penalty=0,
        n=1,
        stream_options=None,
        service_tier="auto",
        parallel_tool_calls=True,
        store=False,
        tools=[],
        user="u1",
        metadata={"a": "b"},
    )
    assert r.choices[0].message.content == plain.choices[0].message.content and r.choices[0].logprobs is None
    r = client.chat.completions.create(**base, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and "".join(t.token for t in content) == plain.choices[0].message.content
    assert all(
        len(t.top_logprobs) == 3 and t.token == t.top_logprobs[0].token and t.logprob <= 0 for t in content
    )  # greedy: the top token
    penalised = client.chat.completions.create(**{**base, "max_tokens": 12}, presence_penalty=2, frequency_penalty=2)
    assert penalised.usage.completion_tokens == 12
    c = client.completions.create(
        model="tiny",
        prompt="서울은",
        max_tokens=4,
        temperature=0,
        logprobs=2,
        echo=False,
        extra_body={"ignore_eos": True},
    )
    # two byte-fragment tokens can both read "\ufffd", and OpenAI's format keys top_logprobs by text: 1 or 2 entries
    assert len(c.choices[0].logprobs.tokens) == 4 and all(1 <= len(d) <= 2 for d in c.choices[0].logprobs.top_logprobs)
    assert c.choices[0].logprobs.token_logprobs == [
        max(d.values()) for d in c.choices[0].logprobs.top_logprobs
    ]  # greedy
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            **base, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]
        )
    assert e.value.param == "tools"


def test_structured_outputs_through_the_sdk(client):
    """response_format as the SDK sends it: json_object, json_schema, and `chat.completions.parse` with a pydantic
    model (what LangChain's `with_structured_output` and LlamaIndex's structured predict come down to); the tiny
    random model answers JSON only because the engine constrains it."""
    from typing import Literal

    from pydantic import BaseModel

    class City(BaseModel):
        city: Literal["부산", "서울"]
        ok: bool

    base = dict(model="tiny", messages=MSG, max_tokens=150, temperature=0)
    free = client.chat.completions.create(**base).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(free)
    r = client.chat.completions.create(**base, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {"name": "city", "schema": City.model_json_schema(), "strict": True}
    r = client.chat.completions.create(**base, response_format={"type": "json_schema", "json_schema": schema})
    City.model_validate_json(r.choices[0].message.content)
    parsed = client.chat.completions.parse(**base, response_format=City).choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.city in ("부산", "서울")
    c = client.completions.create(
        model="tiny",
        prompt="도시:",
        max_tokens=200,
        temperature=0.8,
        seed=1,
        extra_body={"response_format": {"type": "json_schema", "json_schema": schema}},
    )
    City.model_validate_json(c.choices[0].text)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            **base, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
        )
    assert e.value.param == "response_format" and "nope" in e.value.message


def test_tiny_temperatures_answer_and_leave_the_engine_healthy(client, tiny_server):
    for t in (1e-38, 5e-324, 1e-6):
        r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, temperature=t, top_p=1e-9)
        assert r.choices[0].finish_reason in ("length", "stop")
    assert httpx.get(tiny_server.url + "/health").status_code == 200
    assert client.completions.create(model="tiny", prompt="안녕", max_tokens=2).usage.completion_tokens >= 1
