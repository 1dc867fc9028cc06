"""Tool calling on the native engine, through the real `openai` client and a LangChain agent against a server on
127.0.0.1: tools rendered by the model's chat template (a Qwen-style Hermes template), calls parsed from its
`<tool_call>` format, and with tool_choice required or a named function generated under the call's JSON schema,
so even the random tiny model emits a valid call."""

from __future__ import annotations

import json
import time
from typing import Literal

import httpx
import openai
import pytest

from kollm.serve.tools import calls_from_json, parse_calls, required_schema
from tests.tiny import save_tiny_with_tools

from .conftest import start_server

pytest.importorskip("xgrammar")

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["서울", "부산"]}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "weather", "description": "오늘 날씨", "parameters": CITY}}
TIME = {
    "type": "function",
    "function": {"name": "now", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}
ASK = [{"role": "user", "content": "서울 날씨 알려 줘"}]


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    from kollm.serve import create_app, load_engine

    folder = save_tiny_with_tools(tmp_path_factory.mktemp("tools") / "model", init_range=0.5, context=2048)
    engine = load_engine(folder, device="cpu", max_batch_size=8)
    live = start_server(create_app(engine, model_name="tiny", model_version="1"))
    deadline = time.time() + 20
    while not engine.ready() and time.time() < deadline:
        time.sleep(0.02)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(tool_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_parsing_hermes_and_llama3_json_calls():
    content, calls = parse_calls(
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "서울"}}\n</tool_call>\n'
        '<tool_call>{"name": "now", "arguments": {}}</tool_call>',
    )
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("weather", {"city": "서울"}),
        ("now", {}),
    ]
    assert parse_calls("hermes", "그냥 답입니다.") == ("그냥 답입니다.", [])
    assert parse_calls("hermes", "<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])
    _, calls = parse_calls(
        "llama3_json",
        '<|python_tag|>{"name": "weather", "parameters": {"city": "부산"}}; {"name": "now", "parameters": {}}',
    )
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("weather", {"city": "부산"}), ("now", {})]
    assert parse_calls("llama3_json", "안녕하세요") == ("안녕하세요", [])
    schema = json.loads(required_schema([WEATHER, TIME], parallel=False))
    assert schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    assert [c.name for c in calls_from_json('[{"name": "now", "parameters": {}}]', None)] == ["now"]
    assert calls_from_json('{"city": "서', "weather") == []  # cut at max_tokens: no call


def test_named_function_is_called_with_schema_valid_arguments(client):
    r = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "weather"}},
        max_tokens=60,
        temperature=0,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments)["city"] in ("서울", "부산")


def test_required_streams_calls_as_openai_does(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=300,
        temperature=0,
        stream=True,
        parallel_tool_calls=False,
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    head, fragments = calls[0], calls[1:]
    assert head.id and head.type == "function" and head.function.name in ("weather", "now")
    assert head.function.arguments == ""
    assert all(f.id is None and f.function.name is None and f.index == 0 for f in fragments)
    args = json.loads("".join(f.function.arguments for f in fragments))
    assert args.keys() <= {"city"} and (head.function.name == "now" or args["city"] in ("서울", "부산"))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    r = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=300, temperature=0
    )
    (call,) = r.choices[0].message.tool_calls  # the same call, not streamed
    assert (call.function.name, json.loads(call.function.arguments)) == (head.function.name, args)


def test_a_tool_round_trip_in_the_history_is_served(client):
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "서울"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "맑음, 21도"},
    ]
    r = client.chat.completions.create(
        model="tiny", messages=history, tools=[WEATHER], tool_choice="none", max_tokens=5, temperature=0
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 60  # the tools and the call were rendered into the prompt


@pytest.mark.parametrize(
    "tools, tool_choice, param",
    [
        (
            [{"type": "function", "function": {"name": "w", "parameters": {"type": "string"}}}],
            None,
            "tools.0.function.parameters",
        ),
        ([{"type": "function", "function": {"name": "날씨 조회", "parameters": CITY}}], None, "tools.0.function.name"),
        (
            [{"type": "function", "function": {"name": "w", "parameters": {"type": "object", "properties": []}}}],
            None,
            "tools.0.function.parameters",
        ),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        (
            [
                {
                    "type": "function",
                    "function": {
                        "name": "w",
                        "parameters": {"type": "object", "properties": {"x": {"type": "nonsense"}}},
                    },
                }
            ],
            "required",
            "tools",
        ),
    ],
)
def test_bad_tools_are_400s_naming_the_field(tool_server, tools, tool_choice, param):
    body = {"model": "tiny", "messages": ASK, "tools": tools, "max_tokens": 4}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    r = httpx.post(tool_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_template_without_tools_is_a_400_naming_tools(tiny_server):
    body = {"model": "tiny", "messages": ASK, "tools": [WEATHER], "max_tokens": 4}
    r = httpx.post(tiny_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "does not show tools" in r.json()["error"]["message"]


def test_langchain_agent_runs_one_tool_round_trip(tool_server):
    """LangChain's ChatOpenAI with bind_tools: the model calls the tool, the tool runs, its result goes back."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    ran = []

    @tool
    def weather(city: Literal["서울", "부산"]) -> str:
        """오늘 날씨."""
        ran.append(city)
        return f"{city}: 맑음"

    llm = ChatOpenAI(model="tiny", base_url=tool_server.url + "/v1", api_key="unused", temperature=0, max_tokens=300)
    agent = llm.bind_tools([weather], tool_choice="weather")
    messages = [HumanMessage("서울 날씨 알려 줘")]
    ai = agent.invoke(messages)
    assert [c["name"] for c in ai.tool_calls] == ["weather"]
    messages += [ai, ToolMessage(weather.invoke(ai.tool_calls[0]["args"]), tool_call_id=ai.tool_calls[0]["id"])]
    final = llm.bind_tools([weather]).invoke(messages)
    assert ran and ran[0] in ("서울", "부산")
    assert isinstance(final.content, str) and final.response_metadata["finish_reason"] in (
        "stop",
        "length",
        "tool_calls",
    )
