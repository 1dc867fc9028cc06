"""OpenAI compatibility of the HTTP layer over a scripted engine: every OpenAI field at its default value is
accepted, the request bodies popular clients send by default are served, and what the engine is asked for
(penalties, logprobs, response_format, ...) reaches it. The same against the real engine: test_openai_client.py."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from kollm.serve.engine import SamplingParams
from kollm.serve.router import create_app

from .fake_engine import FakeEngine

REPLY = "안녕하세요, kollm입니다."
NEUTRAL = SamplingParams(max_tokens=1)  # the engine defaults: what "every field at its default" must come to


def make(**kwargs) -> tuple[TestClient, FakeEngine]:
    engine = FakeEngine(REPLY, context_length=256)
    return TestClient(
        create_app(engine, model_name="ko-chat", model_version="3", **kwargs), raise_server_exceptions=False
    ), engine


def sse(text: str) -> list:
    return [json.loads(b[6:]) if b[6:] != "[DONE]" else "[DONE]" for b in text.strip().split("\n\n")]


def neutral(params: SamplingParams, **expected) -> None:
    """Everything but max_tokens (and `expected`) is at the engine's neutral default; final_only (how chunks are
    delivered, not what is sampled) follows `stream` (test_default_bodies_of_popular_clients_are_served)."""
    for name in SamplingParams.__dataclass_fields__:
        if name not in ("max_tokens", "final_only"):
            assert getattr(params, name) == expected.get(name, getattr(NEUTRAL, name)), name


# Every field of OpenAI's chat/completions request at its documented default (https://platform.openai.com/docs/api-reference/chat/create)
CHAT_ALL_DEFAULTS = {
    "model": "ko-chat",
    "messages": [
        {"role": "developer", "content": "한국어로 답하세요.", "name": "ops"},
        {"role": "system", "content": [{"type": "text", "text": "짧게."}]},
        {"role": "user", "content": "안녕?", "name": "minsu"},
        {
            "role": "assistant",
            "content": "네.",
            "name": "bot",
            "refusal": None,
            "tool_calls": [],
            "function_call": None,
            "audio": None,
        },
        {"role": "user", "content": [{"type": "text", "text": "서울은?"}]},
    ],
    "audio": None,
    "frequency_penalty": 0,
    "function_call": None,
    "functions": None,
    "logit_bias": None,
    "logprobs": False,
    "max_completion_tokens": None,
    "max_tokens": None,
    "metadata": {"team": "nlp"},
    "modalities": ["text"],
    "n": 1,
    "parallel_tool_calls": True,
    "prediction": None,
    "presence_penalty": 0,
    "prompt_cache_key": "k1",
    "reasoning_effort": None,
    "response_format": {"type": "text"},
    "safety_identifier": "u-hash",
    "seed": None,
    "service_tier": "auto",
    "stop": None,
    "store": False,
    "stream": False,
    "stream_options": None,
    "temperature": 1,
    "tool_choice": "none",
    "tools": [],
    "top_logprobs": None,
    "top_p": 1,
    "user": "minsu",
    "verbosity": "medium",
    "web_search_options": None,
}
COMPLETION_ALL_DEFAULTS = {  # https://platform.openai.com/docs/api-reference/completions/create
    "model": "ko-chat",
    "prompt": "안녕",
    "best_of": 1,
    "echo": False,
    "frequency_penalty": 0,
    "logit_bias": None,
    "logprobs": None,
    "max_tokens": 16,
    "n": 1,
    "presence_penalty": 0,
    "seed": None,
    "stop": None,
    "stream": False,
    "stream_options": None,
    "suffix": None,
    "temperature": 1,
    "top_p": 1,
    "user": None,
}


def test_every_openai_chat_field_at_its_default_is_accepted_and_changes_nothing():
    client, engine = make()
    r = client.post("/v1/chat/completions", json=CHAT_ALL_DEFAULTS)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == REPLY
    neutral(engine.calls[0][1])
    assert [t.role for t in engine.last_chat] == ["system", "system", "user", "assistant", "user"]
    # null means "the default" for every optional field, as in OpenAI's API
    nulls = {k: None for k in CHAT_ALL_DEFAULTS if k not in ("model", "messages")}
    r = client.post(
        "/v1/chat/completions", json={"model": "ko-chat", "messages": [{"role": "user", "content": "x"}], **nulls}
    )
    assert r.status_code == 200, r.text
    neutral(engine.calls[-1][1])


def test_every_openai_completion_field_at_its_default_is_accepted():
    client, engine = make()
    r = client.post("/v1/completions", json=COMPLETION_ALL_DEFAULTS)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == REPLY[:16]
    neutral(engine.calls[0][1])
    nulls = {k: None for k in COMPLETION_ALL_DEFAULTS if k not in ("model", "prompt")}
    assert client.post("/v1/completions", json={"model": "ko-chat", "prompt": "x", **nulls}).status_code == 200


# What popular clients send with their default settings, written from their documented defaults:
# - LangChain ChatOpenAI (langchain-openai `_default_params`: model, stream, and only fields that were set; with
#   streaming it adds stream_options.include_usage; messages carry `name` when the message has one); 0.1.x also
#   sent n=1 and temperature=0.7.
# - LlamaIndex OpenAILike (`_get_model_kwargs`: model, temperature 0.1, stream; is_chat_model=False by default, so
#   /v1/completions with a prompt; logprobs=True adds logprobs + top_logprobs (chat) or logprobs=top_logprobs (completions)).
MSGS = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "안녕하세요", "name": "minsu"}]
CLIENT_BODIES = [
    ("langchain ChatOpenAI", "/v1/chat/completions", {"model": "ko-chat", "stream": False, "messages": MSGS}),
    (
        "langchain ChatOpenAI stream",
        "/v1/chat/completions",
        {"model": "ko-chat", "stream": True, "stream_options": {"include_usage": True}, "messages": MSGS},
    ),
    (
        "langchain-openai 0.1",
        "/v1/chat/completions",
        {"model": "ko-chat", "stream": False, "n": 1, "temperature": 0.7, "messages": MSGS},
    ),
    (
        "langchain with logprobs",
        "/v1/chat/completions",
        {"model": "ko-chat", "stream": False, "logprobs": True, "top_logprobs": 2, "messages": MSGS},
    ),
    (
        "llamaindex OpenAILike",
        "/v1/completions",
        {"prompt": "안녕하세요", "stream": False, "model": "ko-chat", "temperature": 0.1},
    ),
    (
        "llamaindex OpenAILike chat",
        "/v1/chat/completions",
        {"messages": MSGS, "stream": False, "model": "ko-chat", "temperature": 0.1},
    ),
    (
        "llamaindex OpenAILike chat stream",
        "/v1/chat/completions",
        {
            "messages": MSGS,
            "stream": True,
            "model": "ko-chat",
            "temperature": 0.1,
            "stream_options": {"include_usage": True},
        },
    ),
    (
        "llamaindex logprobs chat",
        "/v1/chat/completions",
        {
            "messages": MSGS,
            "stream": False,
            "model": "ko-chat",
            "temperature": 0.1,
            "logprobs": True,
            "top_logprobs": 0,
        },
    ),
    (
        "llamaindex logprobs completions",
        "/v1/completions",
        {"prompt": "안녕", "stream": False, "model": "ko-chat", "temperature": 0.1, "logprobs": 0},
    ),
]


@pytest.mark.parametrize("name,path,body", CLIENT_BODIES, ids=[c[0] for c in CLIENT_BODIES])
def test_default_bodies_of_popular_clients_are_served(name, path, body):
    client, engine = make()
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    if body["stream"]:
        events = sse(r.text)
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == len(REPLY)
        assert "".join(c["delta"].get("content") or "" for e in events[:-2] for c in e["choices"]) == REPLY
    else:
        choice = r.json()["choices"][0]
        assert (choice.get("message") or {}).get("content", choice.get("text")) in (REPLY, REPLY[:16])
        if body.get("logprobs") is not None and body.get("logprobs") is not False:
            assert choice["logprobs"] is not None
    assert engine.calls[0][1].temperature == body.get("temperature", 1.0)
    assert engine.calls[0][1].final_only is not body["stream"]  # a non-streamed answer is delivered in one piece


def test_chat_logprobs_have_openai_shape():
    client, engine = make()
    r = client.post(
        "/v1/chat/completions",
        json={"model": "ko-chat", "messages": MSGS, "logprobs": True, "top_logprobs": 2, "max_tokens": 3},
    )
    lp = r.json()["choices"][0]["logprobs"]
    assert engine.calls[0][1].logprobs == 2
    assert [e["token"] for e in lp["content"]] == list(REPLY[:3])
    first = lp["content"][0]
    assert first["logprob"] == -0.5 and first["bytes"] == list(REPLY[0].encode())
    assert [t["token"] for t in first["top_logprobs"]] == [REPLY[0], REPLY[0] * 2] and first["top_logprobs"][1][
        "logprob"
    ] == -2.0
    # logprobs: true alone gives each token's logprob with no alternatives; leaving it out gives null
    r = client.post(
        "/v1/chat/completions", json={"model": "ko-chat", "messages": MSGS, "logprobs": True, "max_tokens": 2}
    )
    assert [e["top_logprobs"] for e in r.json()["choices"][0]["logprobs"]["content"]] == [[], []]
    assert (
        client.post("/v1/chat/completions", json={"model": "ko-chat", "messages": MSGS, "max_tokens": 2}).json()[
            "choices"
        ][0]["logprobs"]
        is None
    )


def test_streamed_chat_logprobs_come_with_their_tokens():
    client, _ = make()
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "ko-chat",
            "messages": MSGS,
            "logprobs": True,
            "top_logprobs": 1,
            "max_tokens": 4,
            "stream": True,
        },
    )
    events = [e for e in sse(r.text) if e != "[DONE]"]
    tokens = [t["token"] for e in events for c in e["choices"] if c["logprobs"] for t in c["logprobs"]["content"]]
    assert tokens == list(REPLY[:4])


def test_completion_logprobs_and_echo():
    client, engine = make()
    r = client.post("/v1/completions", json={"model": "ko-chat", "prompt": "서울", "max_tokens": 3, "logprobs": 1})
    lp = r.json()["choices"][0]["logprobs"]
    assert engine.calls[0][1].logprobs == 1
    assert lp["tokens"] == list(REPLY[:3]) and lp["token_logprobs"] == [-0.5] * 3
    assert lp["top_logprobs"] == [{c: -1.0} for c in REPLY[:3]] and lp["text_offset"] == [0, 1, 2]
    r = client.post("/v1/completions", json={"model": "ko-chat", "prompt": "서울", "max_tokens": 3, "echo": True})
    assert r.json()["choices"][0]["text"] == "서울" + REPLY[:3]
    r = client.post(
        "/v1/completions", json={"model": "ko-chat", "prompt": "서울", "max_tokens": 3, "echo": True, "stream": True}
    )
    assert "".join(c["text"] for e in sse(r.text) if e != "[DONE]" for c in e["choices"]) == "서울" + REPLY[:3]
    # echo with logprobs asks the engine for the prompt's logprobs too (the real engine: test_prompt_logprobs.py)
    r = client.post("/v1/completions", json={"model": "ko-chat", "prompt": "서울", "echo": True, "logprobs": 1})
    assert r.status_code == 200 and engine.calls[-1][1].prompt_logprobs == 1
    assert engine.calls[-2][1].prompt_logprobs is None  # echo alone does not


def test_sampling_fields_reach_the_engine():
    client, engine = make()
    body = {
        "model": "ko-chat",
        "messages": MSGS,
        "max_tokens": 4,
        "temperature": 0.3,
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.25,
        "repetition_penalty": 1.2,
        "logit_bias": {"17": -100, "42": 3.5},
        "top_k": 20,
        "min_p": 0.05,
        "seed": 11,
        "n": 2,
        "stop": ["。"],
        "ignore_eos": True,
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert len(engine.calls) == 2
    neutral(
        engine.calls[1][1],
        temperature=0.3,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.2,
        logit_bias=((17, -100), (42, 3.5)),
        top_k=20,
        min_p=0.05,
        seed=12,
        stop=("。",),
        ignore_eos=True,
    )
    body.update(top_k=-1)  # vLLM's "off"
    client.post("/v1/chat/completions", json=body)
    assert engine.calls[-1][1].top_k == 0


def test_response_format_is_handed_to_the_engine_which_may_refuse_it_naming_the_field():
    client, engine = make()
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    for rf, kind in (
        ({"type": "json_object"}, "json_object"),
        ({"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}, "json_schema"),
    ):
        r = client.post("/v1/chat/completions", json={"model": "ko-chat", "messages": MSGS, "response_format": rf})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
        assert engine.calls[-1][1].response_format == kind
    assert json.loads(engine.calls[-1][1].json_schema) == schema


@pytest.mark.parametrize(
    "field,value",
    [
        ("tool_choice", "required"),  # without tools
        ("functions", [{"name": "weather"}]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("prediction", {"type": "content", "content": "x"}),
        ("web_search_options", {}),
        ("reasoning_effort", "high"),
        ("verbosity", "low"),
        ("store", True),
        ("modalities", ["audio"]),
    ],
)
def test_fields_the_server_cannot_honour_are_a_400_naming_them(field, value):
    client, engine = make()
    r = client.post("/v1/chat/completions", json={"model": "ko-chat", "messages": MSGS, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and engine.calls == []
    assert field in r.json()["error"]["message"]


def test_completion_only_fields():
    client, _ = make()
    for field, value in (("suffix", " 끝"), ("best_of", 3)):
        r = client.post("/v1/completions", json={"model": "ko-chat", "prompt": "x", field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert (
        client.post("/v1/completions", json={"model": "ko-chat", "prompt": "x", "n": 3, "best_of": 3}).status_code
        == 200
    )
