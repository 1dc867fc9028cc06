"""OpenAI-compatible request and response models, as strict pydantic models.

Requests are strict: a field of the wrong type, an unknown field or an out-of-range value is a 400 with an
OpenAI-style error body (see `ErrorResponse`), never a silent coercion. Strings that cannot be encoded as
UTF-8 (lone surrogates from `\\ud800` escapes) are rejected too, so nothing downstream sees them.

Every field of OpenAI's chat/completions and completions APIs is accepted at its default value (and `null`
means "the default" for every optional field, as in OpenAI's API), so clients that send their whole
parameter set (LangChain, LlamaIndex, the `openai` SDK) work unchanged. Served: temperature (0 = greedy),
top_p, max_tokens / max_completion_tokens, stop, n, seed, stream + stream_options.include_usage,
presence_penalty, frequency_penalty, logit_bias, logprobs + top_logprobs (completions: `logprobs: K`), echo
(completions; with logprobs, the prompt's tokens come with their logprobs, the first one's null, for prompts of up
to kollm.serve.engine.MAX_PROMPT_LOGPROBS_TOKENS tokens), prompts as token ids (completions), `name` on messages, response_format json_object / json_schema (both engines constrain the output
to JSON, on completions too, as vLLM does; the native engine with xgrammar, the `json` extra, and without it
answers a 400 naming `response_format`), and the vLLM extensions repetition_penalty, top_k, min_p and
ignore_eos, and tools / tool_choice / parallel_tool_calls with tool messages and assistant tool_calls
(kollm.serve.tools). Accepted and ignored because they mean nothing to a self-hosted server: user (logged, and
used for sticky canary routing), metadata, service_tier, prompt_cache_key, safety_identifier,
stream_options.include_obfuscation. Answered with a 400 naming the field when set to anything but their
default: the deprecated functions / function_call (and function messages), audio and audio modalities, prediction, web_search_options, reasoning_effort, verbosity other than medium, store,
suffix, best_of other than n, and content parts other than text.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_N = 16
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text must be valid UTF-8 (found {value[e.start : e.end]!a} at character {e.start})"
        ) from None
    return value


def _only(*allowed: Any, why: str) -> AfterValidator:
    """A field accepted only at its default value(s): anything else is a 400 naming the field, saying why."""

    def check(value: Any) -> Any:
        if value not in allowed and not (isinstance(value, (list, dict)) and not value and [] in allowed):
            raise ValueError(why)
        return value

    return AfterValidator(check)


Text = Annotated[str, AfterValidator(_utf8)]
TokenId = Annotated[int, Field(ge=0)]
StopText = Annotated[str, Field(min_length=1), AfterValidator(_utf8)]
NO_FUNCTIONS = "the deprecated functions / function_call are not served: use tools and tool_choice"
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"

REQUEST_CONFIG = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool | None = Field(False, description="Send a last chunk with token usage before [DONE].")
    include_obfuscation: bool | None = Field(
        None, description="Accepted and ignored (no obfuscation padding is added)."
    )


class TextPart(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["text"] = Field(description="Only text parts are served.")
    text: Text = Field(description="The text of this part.")


class FunctionCall(BaseModel):
    model_config = REQUEST_CONFIG
    name: Text = Field(description="The function called.")
    arguments: Text = Field(description="Its arguments, as JSON text.")


class ToolCallIn(BaseModel):
    """A tool call of an earlier assistant message, replayed in the history."""

    model_config = REQUEST_CONFIG
    id: Text = Field(description="The call's id (tool messages answer it by tool_call_id).")
    type: Literal["function"] = Field(description="Only function tools are served.")
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = REQUEST_CONFIG
    role: Literal["system", "developer", "user", "assistant", "tool", "function"] = Field(
        description="Who wrote the message (tool: the result of a tool call)."
    )
    content: Text | Annotated[list[TextPart], Field(min_length=1)] | None = Field(
        None, description="The message text or text parts (an assistant message may leave it out)."
    )
    name: Text | None = Field(
        None, description="A participant name; accepted for compatibility, not shown to the model."
    )
    refusal: Annotated[Any, _only(None, why="an assistant refusal cannot be replayed; send it as content")] = None
    tool_calls: list[ToolCallIn] | None = Field(None, description="An assistant message's tool calls.")
    tool_call_id: Text | None = Field(None, description="A tool message: the id of the call it answers.")
    function_call: Annotated[Any, _only(None, why=NO_FUNCTIONS)] = None
    audio: Annotated[Any, _only(None, why="audio is not served")] = None

    @field_validator("role")
    @classmethod
    def _no_function_role(cls, role: str) -> str:
        if role == "function":
            raise ValueError(f"function messages answer the deprecated function_call; {NO_FUNCTIONS}")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"content parts of type {kind!r} are not served: this model reads text parts only")
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(BaseModel):
    model_config = REQUEST_CONFIG
    name: Annotated[str, Field(pattern=TOOL_NAME)] = Field(
        description="The function's name: letters, digits, _ and -, at most 64."
    )
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(
        None, description='Its arguments, as a JSON schema of an object (default: {"type": "object"}).'
    )
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        if value.get("type", "object") != "object":
            raise ValueError(
                f'a function\'s parameters are a JSON schema of an object ("type": "object"), not {value.get("type")!r}'
            )
        props = value.get("properties", {})
        if not isinstance(props, dict) or not all(isinstance(v, (dict, bool)) for v in props.values()):
            raise ValueError('"properties" must map each argument name to a JSON schema')
        required = value.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError('"required" must be a list of argument names')
        missing = [r for r in required if r not in props]
        if missing and value.get("additionalProperties") is False:
            raise ValueError(f'"required" names {missing[0]!r}, which is not among "properties"')
        return value


class Tool(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["function"] = Field(description="Only function tools are served.")
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = REQUEST_CONFIG
    name: Text


class NamedToolChoice(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = REQUEST_CONFIG
    name: Text = Field(description="The schema's name.")
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON schema the answer must follow.")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text (default), json_object or json_schema."
    )
    json_schema: JsonSchemaFormat | None = Field(None, description="Required with type json_schema.")


Penalty = Annotated[float | None, Field(ge=-2.0, le=2.0)]


class _SamplingFields(BaseModel):
    model_config = REQUEST_CONFIG
    model: Text = Field(description="The served model name (see GET /v1/models).")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 means greedy.")
    top_p: float | None = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.",
    )
    n: int | None = Field(1, ge=1, le=MAX_N, description="How many choices to generate.")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = Field(
        None, description="Stop sequences (not included in the output)."
    )
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="Seed for reproducible sampling.")
    stream: bool | None = Field(False, description="Stream the answer as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    presence_penalty: Penalty = Field(0.0, description="Lower the logit of every token already generated by this much.")
    frequency_penalty: Penalty = Field(
        0.0, description="Lower each token's logit by this much per time it was generated."
    )
    logit_bias: (
        Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=MAX_LOGIT_BIAS)] | None
    ) = Field(None, description="Token id (as a string) -> bias added to its logit, -100 to 100.")
    user: Text | None = Field(
        None, description="An end-user id (logged, and used by the canary gateway for sticky routing)."
    )
    metadata: dict[str, Text] | None = Field(None, description="Accepted and ignored (nothing is stored).")
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = Field(
        None, description="Accepted and ignored."
    )
    store: Annotated[bool | None, _only(None, False, why="this server does not store completions")] = None
    # vLLM extensions
    repetition_penalty: float | None = Field(
        1.0,
        ge=0.01,
        le=100.0,
        description="vLLM extension: divide the logits of prompt and generated tokens by this (>1 discourages repeats).",
    )
    top_k: int | None = Field(
        None, ge=-1, description="vLLM extension: sample from the k most likely tokens only (0 or -1: all)."
    )
    min_p: float | None = Field(
        0.0, ge=0.0, le=1.0, description="vLLM extension: drop tokens less likely than min_p times the most likely one."
    )
    ignore_eos: bool | None = Field(
        False, description="kollm/vLLM extension: do not stop at the end-of-sequence token."
    )

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def choices(self) -> int:
        return 1 if self.n is None else self.n

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(description="The conversation so far.")
    max_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate (default: the rest of the context)."
    )
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for max_tokens.")
    logprobs: bool | None = Field(False, description="Return the log probability of each generated token.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: also the N most likely tokens at each position."
    )
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object or json_schema (if the engine can constrain its output)."
    )
    tools: Annotated[list[Tool], Field(max_length=128)] | None = Field(
        None, description="Functions the model may call (rendered by the model's chat template)."
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required, or one named function."
    )
    parallel_tool_calls: bool | None = Field(None, description="Whether several calls may come in one answer.")
    functions: Annotated[Any, _only(None, [], why=NO_FUNCTIONS)] = None
    function_call: Annotated[Any, _only(None, "none", "auto", why=NO_FUNCTIONS)] = None
    audio: Annotated[Any, _only(None, why="audio output is not served")] = None
    modalities: Annotated[
        list[Literal["text", "audio"]] | None,
        _only(None, ["text"], why='only text output is served: send ["text"] or leave it out'),
    ] = None
    prediction: Annotated[Any, _only(None, why="predicted outputs are not served")] = None
    web_search_options: Annotated[Any, _only(None, why="web search is not served")] = None
    reasoning_effort: Annotated[Any, _only(None, why="this model has no reasoning-effort setting")] = None
    verbosity: Annotated[
        Literal["low", "medium", "high"] | None,
        _only(None, "medium", why="this model has no verbosity setting; send medium or leave it out"),
    ] = None
    prompt_cache_key: Text | None = Field(None, description="Accepted and ignored.")
    safety_identifier: Text | None = Field(None, description="Accepted and ignored.")

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def top_logprobs_count(self) -> int | None:
        """None: no logprobs; K: the sampled token's logprob and the K most likely (0: only the sampled one's)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_N)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_N)]
    ) = Field(description="The prompt, a list of prompts, or prompts as token ids (a list of ids, or of such lists).")
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate (OpenAI's default is 16).")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Return the logprob of each token and the N most likely at each position.",
    )
    echo: bool | None = Field(False, description="Put the prompt before the completion in the text.")
    best_of: int | None = Field(
        None, ge=1, le=MAX_N, description="Only best_of = n is served (no server-side reranking)."
    )
    suffix: Annotated[Any, _only(None, "", why="text insertion (suffix) is not served")] = None
    response_format: ResponseFormat | None = Field(
        None, description="As in chat completions (an extension, as vLLM's): text, json_object or json_schema."
    )

    def prompts(self) -> list[str | list[int]]:
        """The prompts: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info) -> int | None:
        n = info.data.get("n") or 1
        if value is not None and value != n:
            raise ValueError(
                f"best_of={value} with n={n}: ranking several candidates server-side is not served; leave best_of out"
            )
        return value


# --- responses (serialized by the server, never validated from users) --------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ToolCallFunction(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ToolCallsMessage(BaseModel):
    """An answer that calls tools (content: any text the model wrote before the calls)."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage | ToolCallsMessage
    finish_reason: FinishReason | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kollm"
    version: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
