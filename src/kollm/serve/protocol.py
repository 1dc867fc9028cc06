"""OpenAI-compatible request and response models (the subset kollm serves), as strict pydantic models.

Requests are strict: a field of the wrong type, an unknown field or an out-of-range value is a 400 with an
OpenAI-style error body (see `ErrorResponse`), never a silent coercion. Strings that cannot be encoded as
UTF-8 (lone surrogates from `\\ud800` escapes) are rejected too, so nothing downstream sees them.

Sampling fields: temperature (0 = greedy), top_p, max_tokens (chat also takes `max_completion_tokens`),
stop (a string or up to 16 strings, not included in the output), n, seed, stream (+ stream_options.include_usage).
`ignore_eos` (as in vLLM) keeps generating past the end-of-sequence token, for benchmarks.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_N = 16
MAX_STOP = 16


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text must be valid UTF-8 (found {value[e.start:e.end]!a} at character {e.start})") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]
StopText = Annotated[str, Field(min_length=1), AfterValidator(_utf8)]

REQUEST_CONFIG = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool = Field(False, description="Send a last chunk with token usage before [DONE].")


class TextPart(BaseModel):
    model_config = REQUEST_CONFIG
    type: Literal["text"] = Field(description="Only text parts are served.")
    text: Text = Field(description="The text of this part.")


class ChatMessage(BaseModel):
    model_config = REQUEST_CONFIG
    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who wrote the message.")
    content: Text | Annotated[list[TextPart], Field(min_length=1)] = Field(description="The message text or text parts.")
    name: Text | None = Field(None, description="Accepted for compatibility; not shown to the model.")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _SamplingFields(BaseModel):
    model_config = REQUEST_CONFIG
    model: Text = Field(description="The served model name (see GET /v1/models).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Sampling temperature; 0 means greedy.")
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.")
    n: int = Field(1, ge=1, le=MAX_N, description="How many choices to generate.")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = Field(None, description="Stop sequences (not included in the output).")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="Seed for reproducible sampling.")
    stream: bool = Field(False, description="Stream the answer as server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    user: Text | None = Field(None, description="An end-user id (logged, and used by the canary gateway for sticky routing).")
    ignore_eos: bool = Field(False, description="kollm/vLLM extension: do not stop at the end-of-sequence token.")

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(description="The conversation so far.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default: the rest of the context).")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for max_tokens.")


class CompletionRequest(_SamplingFields):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_N)] = Field(description="The prompt, or a list of prompts.")
    max_tokens: int | None = Field(16, ge=1, description="Most tokens to generate (OpenAI's default is 16).")


# --- responses (serialized by the server, never validated from users) --------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: None = None


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
    logprobs: None = None


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
    logprobs: None = None


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
