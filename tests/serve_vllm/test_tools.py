"""Tool calling with `kollm serve --backend vllm`: vLLM's tool parser (hermes, picked from the template) and its
structured outputs for tool_choice named/required, driven by the real `openai` client. Runs where vLLM imports."""

from __future__ import annotations

import json

import openai
import pytest
from transformers import AutoTokenizer

from tests.tiny import TOOL_CHAT_TEMPLATE

from .conftest import needs_vllm, save_vllm_tiny, start_kollm

pytestmark = [needs_vllm, pytest.mark.timeout(900)]

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["서울", "부산"]}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": CITY}}
ASK = [{"role": "user", "content": "서울 날씨 알려 줘"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = save_vllm_tiny(tmp_path_factory.mktemp("vllm-tools") / "model", context=2048)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = TOOL_CHAT_TEMPLATE
    tok.save_pretrained(folder)
    server = start_kollm(folder, tmp_path_factory.mktemp("serve"), "--served-model-name", "tiny")
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    server.stop()


def test_named_and_required_tool_calls(client):
    for choice in ({"type": "function", "function": {"name": "weather"}}, "required"):
        r = client.chat.completions.create(
            model="tiny", messages=ASK, tools=[WEATHER], tool_choice=choice, max_tokens=300, temperature=0
        )
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "weather"
        assert json.loads(call.function.arguments)["city"] in ("서울", "부산")
    stream = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=300, temperature=0, stream=True
    )
    calls = [c.choices[0].delta.tool_calls[0] for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert calls[0].id and calls[0].function.name == "weather" and calls[0].function.arguments == ""
    assert json.loads("".join(c.function.arguments for c in calls[1:]))["city"] in ("서울", "부산")
