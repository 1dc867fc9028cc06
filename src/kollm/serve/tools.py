"""Tool calling for the native engine: the call format of the model family, parsing calls out of the generated
text, and the JSON schema that constrains the output when a call is required.

Public API:
    ParsedCall(name, arguments)        one tool call: the function's name and its arguments as JSON text
    tool_format(tokenizer, model_type) the model's call format: "hermes", "llama3_json" or None (no tool template)
    parse_calls(fmt, text)             (content before the calls or None, [ParsedCall]) from generated text
    required_schema(tools, parallel)   tool_choice required: the JSON schema of a list of calls to any of `tools`
    calls_from_json(text, named)       the calls a constrained output holds (named: the one function's arguments)

Call formats, picked from the chat template (it is what the model was trained to read and write):
- "hermes" (Qwen2/2.5/3, Hermes, many fine-tunes): the template mentions `<tool_call>`; the model writes
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, once per call, possibly after some text.
- "llama3_json" (Llama 3.1-3.3): a llama model whose template renders `tools` without `<tool_call>`; the model
  writes `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`), several separated by `;`.
A template that does not mention `tools` cannot show them to the model: a request with tools is a 400.

With tool_choice `required` or a named function the output is generated under a JSON-schema grammar (xgrammar,
as vLLM does): `required` as a JSON list of {"name", "parameters"} objects (one item when parallel_tool_calls is
false), a named function as its arguments object, so even a model that never learned the format emits a valid call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

ToolFormat = Literal["hermes", "llama3_json"]
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text of an object


def tool_format(tokenizer: Any, model_type: str | None) -> ToolFormat | None:
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    if "tools" not in template:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if (model_type or "").startswith("llama"):
        return "llama3_json"
    return None


def _call(obj: Any) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def parse_calls(fmt: ToolFormat, text: str) -> tuple[str | None, list[ParsedCall]]:
    """The text before the calls (None when there is none) and the calls; text with no well-formed call is all
    content, with no calls (a model may answer in prose rather than call a tool)."""
    if fmt == "hermes":
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for body in _HERMES.findall(text[start:]):
            try:
                call = _call(json.loads(body))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return (text[:start].strip() or None), calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    calls, pos = [], 0
    while pos < len(body):
        try:
            obj, end = _DECODER.raw_decode(body, pos)
        except json.JSONDecodeError:
            return text, []
        call = _call(obj)
        if call is None:
            return text, []
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \t\n;":
            pos += 1
    return (None, calls) if calls else (text, [])


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object"}


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> str:
    """A JSON list of calls to any of `tools` (vLLM's schema for tool_choice required)."""
    items = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]}, "parameters": _parameters(t)},
            "required": ["name", "parameters"],
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return json.dumps(schema)


def named_schema(tools: list[dict[str, Any]], name: str) -> str:
    return json.dumps(next(_parameters(t) for t in tools if t["function"]["name"] == name))


def calls_from_json(text: str, named: str | None) -> list[ParsedCall]:
    """The calls of an output generated under required_schema (named None) or named_schema; [] if it is not
    complete JSON (cut at max_tokens)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    if named is not None:
        return [ParsedCall(named, json.dumps(value, ensure_ascii=False))] if isinstance(value, dict) else []
    calls = [_call(v) for v in value] if isinstance(value, list) else []
    return [c for c in calls if c is not None]
