"""The HTTP layer: an OpenAI-compatible FastAPI app around any `Engine`.

Public API:
    create_app(engine, *, model_name, model_version=None, api_key=None, log_dir=None, shutdown_engine=True,
               max_body_bytes=MAX_BODY_BYTES) -> FastAPI
    router                 the APIRouter with the handlers (they read the `Served` in `app.state.served`)
    Served                 what one app serves: the engine, the model name and version, the inference log

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions (JSON or, with
`"stream": true`, server-sent events ending in `data: [DONE]`), GET /health (liveness: 503 once the engine is
dead), GET /ready (200 once the model is loaded and warm, 503 while loading or draining), GET /metrics
(Prometheus, see kollm.serve.metrics). The request fields served are listed in kollm.serve.protocol.

Every response carries `x-kollm-model-version` (the version that served it, "unversioned" when none was given)
and `x-request-id` (the client's, when it sent a well-formed one, else a new one). Errors are OpenAI-style JSON
`{"error": {"message", "type", "param", "code"}}`: 400 for anything wrong with the request (bad JSON, invalid
UTF-8, wrong types, unknown fields, empty messages, max_tokens <= 0 or past the context, a prompt longer than the
context, a field set to a value this engine cannot serve), 401 for a missing/wrong API key (when `api_key` is
set; /health, /ready and /metrics stay open), 404 for an unknown model or route, 413 for a body over
`max_body_bytes`, 503 when the engine is overloaded, shutting down or dead, and 500 (for that request only)
when the engine failed while serving it. A bad request never gets a 5xx.

Prompts are tokenized in a worker thread, so a long prompt never stalls other requests or the probes.

Logs (when `log_dir` is given, normally `<project>/.kollm/logs`): one JSON line per HTTP request in
`api/api.jsonl`, one per generation in `inference/inference.jsonl`, both with the request id; client-controlled
fields (`user`, the path) are cut to 256 characters and the files rotate at 64 MiB (kollm.jsonlog, component
"serve", label `model`: the served name; an answer of 500 or more is logged at level ERROR).

The app's lifespan shuts the engine down on exit (after uvicorn has let in-flight requests finish). To mount the
app inside another ASGI app (the canary gateway, Ray Serve), drive its lifespan (`app.router.lifespan_context(app)`)
or pass `shutdown_engine=False` and shut the engine down yourself. `app.state.engine`, `app.state.model_name` and
`app.state.model_version` are set for wrappers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from kollm.jsonlog import JsonLog, clip
from kollm.monitor.features import prompt_text, request_features
from kollm.serve import metrics
from kollm.serve.engine import (
    MAX_PROMPT_LOGPROBS_TOKENS,
    ChatTurn,
    Engine,
    EngineClosed,
    EngineError,
    EngineOverloaded,
    PromptLogprobs,
    RequestError,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
    TransformersEngine,
)
from kollm.serve.faults import InjectedFault
from kollm.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenLogprobEntry,
    ToolCall,
    ToolCallFunction,
    ToolCallsMessage,
    TopLogprob,
    Usage,
)
from kollm.serve.tools import ParsedCall, calls_from_json, named_schema, required_schema

if TYPE_CHECKING:
    from kollm.monitor.embeddings import Embedder

log = logging.getLogger("kollm.serve")

VERSION_HEADER = "x-kollm-model-version"
REQUEST_ID_HEADER = "x-request-id"
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_CHOICES = 64
ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/ready", "/metrics"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_SERVED_FIELDS = (
    "model, messages/prompt, max_tokens, max_completion_tokens, temperature, top_p, stop, n, seed, stream, stream_options, "
    "presence_penalty, frequency_penalty, logit_bias, logprobs, top_logprobs, echo, response_format, user, and the "
    "OpenAI fields accepted at their defaults; vLLM's repetition_penalty, top_k, min_p, ignore_eos"
)


class APIError(Exception):
    """An error answered as OpenAI-style JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(
    status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    # ensure_ascii: a message may quote user text that is not valid UTF-8 (a lone surrogate in a field name)
    return Response(json.dumps(body, ensure_ascii=True), status_code=status, media_type="application/json")


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line for pydantic errors, e.g. `messages.0.role: Input should be 'system', ...`."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "extra_forbidden":
        field = ".".join(str(p) for p in loc)
        return f"{field}: unknown field (kollm serves {_SERVED_FIELDS})", field
    if first.get("type") in ("json_invalid", "json_type"):
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if first.get("type") == "missing" and not loc:
        return "the request body is missing: send a JSON object", None

    # union members add type tags to the location (messages.0.content.str); keep field names and indexes only
    def clean(loc) -> str:
        kept = [
            p
            for p in loc
            if p != "body" and (isinstance(p, int) or (_FIELD.fullmatch(str(p)) and str(p) not in _TYPE_TAGS))
        ]
        return ".".join(str(p) for p in kept)

    path = clean(first.get("loc", ())) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    others = {clean(e.get("loc", ())) for e in errors} - {
        path or ""
    }  # a union reports each member: count fields, not members
    more = f" (and {len(others)} more field{'s' if len(others) > 1 else ''})" if others else ""
    return (f"{path}: {msg}{more}" if path else f"{msg}{more}"), path


@dataclass
class _Timing:
    start: float
    first_token: float | None = None

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()


class _BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(
            413, f"the request body is larger than this server's limit of {limit} bytes ({limit // (1024 * 1024)} MiB)"
        )


class _HTTPMiddleware:
    """Request ids, the model-version header, API-key auth for /v1, the body-size limit, request metrics and the API log."""

    def __init__(self, app, *, version: str, api_key: str | None, api_log: JsonLog | None, max_body_bytes: int):
        self.app = app
        self.version = version
        self.api_key = api_key.encode() if api_key else None
        self.api_log = api_log
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        rid = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        is_api = path.startswith("/v1/")
        status = 500
        started = False
        extra = [(VERSION_HEADER.encode(), self.version.encode()), (REQUEST_ID_HEADER.encode(), rid.encode())]

        async def send_with_headers(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        if is_api:
            metrics.IN_FLIGHT.labels(self.version).inc()
        try:
            if is_api and self.api_key is not None and not self._authorized(headers):
                await error_response(
                    401,
                    "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                    code="invalid_api_key",
                )(scope, receive, send_with_headers)
            elif self._declared_length(headers) > self.max_body_bytes:
                too_large = _BodyTooLarge(self.max_body_bytes)
                await error_response(413, too_large.detail, code="request_too_large")(scope, receive, send_with_headers)
            else:
                await self.app(scope, self._limited(receive), send_with_headers)
        except _BodyTooLarge as e:  # a chunked body that grew past the limit outside a FastAPI route
            if not started:
                await error_response(413, e.detail, code="request_too_large")(scope, receive, send_with_headers)
        except Exception as e:
            if isinstance(e, InjectedFault):  # asked for with --inject-faults: one line, not a traceback each
                log.warning("%s", e)
            else:
                log.exception("unhandled error for %s %s (request %s)", scope.get("method"), clip(path), rid)
            if not started:
                await error_response(
                    500, f"internal server error (request id {rid})", type="server_error", code="internal_error"
                )(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - start
            if is_api:
                metrics.IN_FLIGHT.labels(self.version).dec()
            metrics.REQUESTS.labels(self.version, endpoint, str(status)).inc()
            metrics.LATENCY.labels(self.version, endpoint).observe(elapsed)
            if self.api_log is not None:
                client = scope.get("client")
                self.api_log.log(
                    "http_request",
                    "ERROR" if status >= 500 else "INFO",
                    request_id=rid,
                    method=clip(scope.get("method")),
                    path=clip(path),
                    status=status,
                    latency_ms=round(elapsed * 1000, 2),
                    model_version=self.version,
                    client=f"{client[0]}:{client[1]}" if client else None,
                )

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        key = self.api_key
        return key is not None and scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)

    @staticmethod
    def _declared_length(headers: dict[bytes, bytes]) -> int:
        try:
            return int(headers.get(b"content-length", b"0"))
        except ValueError:
            return 0

    def _limited(self, receive):
        """`receive` that raises a 413 once more than max_body_bytes arrived (bodies without a content-length)."""
        size = 0

        async def limited():
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.max_body_bytes:
                    raise _BodyTooLarge(self.max_body_bytes)
            return message

        return limited


# --- what the handlers serve ------------------------------------------------------------------------------


@dataclass
class Served:
    """One app's model: set as `app.state.served` by create_app and read by the handlers."""

    engine: Engine
    model_name: str
    version: str
    inference_log: JsonLog | None = None
    embedder: Embedder | None = None  # logs each prompt's embedding (kollm.monitor.embeddings) for drift
    created: int = field(default_factory=lambda: int(time.time()))
    adapters: tuple[str, ...] = ()  # LoRA adapters served on the base, each under its own model name
    # the adapter `model_name` itself runs with (None: the base alone): an arm of an adapter canary
    # (kollm.rollout.serving) serves one adapter of a shared engine under the registered model's name
    base_adapter: str | None = None

    def adapter_of(self, name: str) -> str | None:
        """The adapter a request's `model` names (None: the base)."""
        if name == self.model_name:
            return self.base_adapter
        return name if name in self.adapters else None

    def card(self) -> ModelCard:
        version = None if self.version == "unversioned" else self.version
        return ModelCard(
            id=self.model_name, created=self.created, version=version, max_model_len=self.engine.context_length
        )

    def cards(self) -> list[ModelCard]:
        base = self.card()
        return [base] + [base.model_copy(update={"id": a}) for a in self.adapters]

    def check_model(self, name: str) -> None:
        if name != self.model_name and name not in self.adapters:
            served = ", ".join(repr(n) for n in (self.model_name, *self.adapters))
            raise APIError(
                404,
                f"model {name!r} is not served here; this server serves {served}",
                param="model",
                code="model_not_found",
            )

    def budget(self, prompt_ids: list[int], max_tokens: int | None, param: str) -> int:
        """max_tokens, checked against the context (default: the rest of the context)."""
        ctx = self.engine.context_length
        if len(prompt_ids) >= ctx:
            raise APIError(
                400,
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {ctx} tokens, so shorten the prompt",
                param=param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return ctx - len(prompt_ids)
        if len(prompt_ids) + max_tokens > ctx:
            raise APIError(
                400,
                f"max_tokens={max_tokens} plus the prompt's {len(prompt_ids)} tokens exceeds this model's context of {ctx} tokens; "
                f"ask for at most {ctx - len(prompt_ids)}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return max_tokens


def _served(request: Request) -> Served:
    return request.app.state.served


def _logit_bias(body: ChatCompletionRequest | CompletionRequest) -> tuple[tuple[int, float], ...]:
    out = []
    for key, bias in (body.logit_bias or {}).items():
        if not key.isdigit():
            raise APIError(
                400,
                f'logit_bias: keys are token ids written as strings (e.g. "50256"), got {clip(key, 32)!r}',
                param="logit_bias",
                code="invalid_request",
            )
        out.append((int(key), bias))
    return tuple(out)


def _response_format(body: ChatCompletionRequest | CompletionRequest) -> tuple[Any, str | None]:
    rf = getattr(body, "response_format", None)
    if rf is None or rf.type == "text":
        return None, None
    if rf.type == "json_object":
        return "json_object", None
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise APIError(
            400,
            'response_format: type json_schema needs "json_schema": {"name": ..., "schema": {...}}',
            param="response_format",
            code="invalid_request",
        )
    return "json_schema", json.dumps(rf.json_schema.schema_)


def _params(
    body: ChatCompletionRequest | CompletionRequest,
    max_tokens: int,
    choice: int,
    logprobs: int | None,
    adapter: str | None = None,
) -> SamplingParams:
    response_format, schema = _response_format(body)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=body.stop_list(),
        seed=None if body.seed is None else body.seed + choice,
        ignore_eos=bool(body.ignore_eos),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        logit_bias=_logit_bias(body),
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p or 0.0,
        logprobs=logprobs,
        response_format=response_format,
        json_schema=schema,
        final_only=not body.stream,
        adapter=adapter,
    )


@dataclass
class _Job:
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class _Result:
    text: str
    tokens: int
    finish: str | None
    logprobs: list[TokenLogprob]
    nll: float | None = None  # the engine's output_nll (see TokenChunk)
    prompt_logprobs: PromptLogprobs | None = None


async def _tokenize(fn, *args) -> Any:
    """Tokenize in a worker thread (a long prompt must not stall the event loop); RequestError is a 400."""
    try:
        return await asyncio.to_thread(fn, *args)
    except RequestError as e:
        raise APIError(400, str(e), param=e.param, code=e.code) from None


async def _start(
    engine: Engine, jobs: list[_Job], rid: str, timing: _Timing
) -> tuple[list[AsyncGenerator[TokenChunk, None]], list[TokenChunk]]:
    """Submit every job and wait for each one's first chunk, so that errors come back before any byte is sent."""
    gens = [engine.generate(j.prompt_ids, j.params, f"{rid}-{i}") for i, j in enumerate(jobs)]
    try:
        firsts = await asyncio.gather(*(anext(g) for g in gens))
    except BaseException as e:
        await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
        if isinstance(e, RequestError):
            raise APIError(400, str(e), param=e.param, code=e.code) from None
        if isinstance(e, EngineOverloaded):
            raise APIError(503, f"the server is overloaded: {e}", type="server_error", code="overloaded") from None
        if isinstance(e, EngineClosed):
            raise APIError(503, f"{e}; retry on another replica", type="server_error", code="unavailable") from None
        if isinstance(e, EngineError):
            raise APIError(500, str(e), type="server_error", code="engine_error") from None
        raise
    timing.token()
    return gens, firsts


async def _collect(gen: AsyncGenerator[TokenChunk, None], first: TokenChunk) -> _Result:
    parts, last, logprobs = [first.text], first, list(first.logprobs)
    try:
        if first.finish_reason is None:
            async for chunk in gen:
                parts.append(chunk.text)
                logprobs.extend(chunk.logprobs)
                last = chunk
    except EngineError as e:
        raise APIError(500, str(e), type="server_error", code="engine_error") from None
    finally:
        await gen.aclose()
    return _Result(
        "".join(parts), last.completion_tokens, last.finish_reason, logprobs, last.output_nll, first.prompt_logprobs
    )


async def _collect_all(
    gens: list[AsyncGenerator[TokenChunk, None]], firsts: list[TokenChunk], request: Request
) -> list[_Result]:
    """Every choice collected (a non-streamed response); every generator closed, also on failure, and as soon as
    the client disconnects (its sequences stop decoding; the answer, 499, goes nowhere)."""
    work: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(_collect(g, f) for g, f in zip(gens, firsts))))
    left: asyncio.Future[Any] = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return list(work.result())
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise APIError(499, "the client closed the connection", code="client_closed_request")
    finally:
        left.cancel()
        await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the request body was read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _merged(
    gens: list[AsyncGenerator[TokenChunk, None]], firsts: list[TokenChunk]
) -> AsyncIterator[tuple[int, TokenChunk]]:
    """Chunks of all choices as they come, tagged with the choice index; closes every generator on exit."""
    queue: asyncio.Queue[tuple[int, TokenChunk | Exception | None]] = asyncio.Queue()

    async def pump(i: int, gen: AsyncGenerator[TokenChunk, None], first: TokenChunk) -> None:
        try:
            await queue.put((i, first))
            if first.finish_reason is None:
                async for chunk in gen:
                    await queue.put((i, chunk))
        except Exception as e:  # an engine failure: handed to the consumer, which ends the stream
            await queue.put((i, e))
        finally:
            await gen.aclose()
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, g, f)) for i, (g, f) in enumerate(zip(gens, firsts))]
    try:
        done = 0
        while done < len(tasks):
            i, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sse(obj: Any) -> str:
    return f"data: {obj.model_dump_json(exclude_none=False)}\n\n"


def _sse_error(e: BaseException) -> str:
    code = "engine_error" if isinstance(e, EngineError) else "unavailable"
    return (
        f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': code}})}\n\n"
    )


def _chat_logprobs(items: list[TokenLogprob]) -> ChatLogprobs:
    def entry(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

    return ChatLogprobs(
        content=[
            TokenLogprobEntry(
                **entry(t.token, t.logprob).model_dump(), top_logprobs=[entry(tok, lp) for tok, lp in t.top]
            )
            for t in items
        ]
    )


def _completion_logprobs(
    items: list[TokenLogprob], offset: int, prompt: PromptLogprobs | None = None
) -> CompletionLogprobs:
    """Legacy completions logprobs; with `prompt` (echo), the prompt's tokens come first, the first one with a
    null logprob and null top_logprobs (nothing precedes it), as OpenAI and vLLM answer."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    if prompt is not None:
        tokens.append(prompt.first)
        token_logprobs.append(None)
        top_logprobs.append(None)
        items = [*prompt.rest, *items]
    for t in items:
        tokens.append(t.token)
        token_logprobs.append(t.logprob)
        top_logprobs.append(dict(reversed(t.top)))  # two tokens may read alike (byte fragments): the likelier stays
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs, text_offset=offsets
    )


def _encode_prompts(engine: Engine, prompts: list[str | list[int]], echo: bool) -> tuple[list[list[int]], list[str]]:
    """Each prompt's token ids (a prompt given as ids is taken as it is) and, with echo, its text."""
    ids = [engine.encode_prompt(p) if isinstance(p, str) else list(p) for p in prompts]
    if not echo:
        return ids, [""] * len(prompts)
    return ids, [p if isinstance(p, str) else engine.decode(p) for p in prompts]


def _check_prompt_logprobs(ids: list[int]) -> None:
    if len(ids) > MAX_PROMPT_LOGPROBS_TOKENS:
        raise APIError(
            400,
            f"echo with logprobs returns the prompt's logprobs, served for prompts of at most "
            f"{MAX_PROMPT_LOGPROBS_TOKENS} tokens; this prompt has {len(ids)}: shorten it, or drop echo or logprobs",
            param="prompt",
            code="prompt_too_long_for_logprobs",
        )


def _finish_metrics(
    served: Served,
    endpoint: str,
    rid: str,
    timing: _Timing,
    prompt_tokens: int,
    completion_tokens: int,
    finishes: list[str | None],
    body: Any,
    stream: bool,
    nlls: list[float | None],
) -> None:
    end = time.perf_counter()
    version = served.version
    metrics.PROMPT_TOKENS.labels(version).inc(prompt_tokens)
    metrics.OUTPUT_TOKENS.labels(version).inc(completion_tokens)
    adapter = served.adapter_of(getattr(body, "model", ""))
    if adapter is not None:
        metrics.ADAPTER_REQUESTS.labels(version, adapter).inc()
        metrics.ADAPTER_OUTPUT_TOKENS.labels(version, adapter).inc(completion_tokens)
    ttft = None
    if timing.first_token is not None:
        ttft = timing.first_token - timing.start
        metrics.TTFT.labels(version, endpoint).observe(ttft)
        if end > timing.start and completion_tokens:
            metrics.TOKENS_PER_SECOND.labels(version).observe(completion_tokens / (end - timing.start))
    nll = None if None in nlls or not nlls else sum(n for n in nlls if n is not None)
    features = request_features(body, prompt_tokens, completion_tokens, nll)
    if "output_perplexity" in features:
        metrics.OUTPUT_PERPLEXITY.labels(version).observe(features["output_perplexity"])
    if served.inference_log is not None:
        record = dict(
            request_id=rid,
            endpoint=endpoint,
            model_version=version,
            stream=stream,
            n=len(finishes),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reasons=finishes,
            ttft_s=None if ttft is None else round(ttft, 4),
            latency_s=round(end - timing.start, 4),
            user=clip(body.user),
            features=features,  # for `kollm monitor drift`; output perplexity over every choice's tokens where the engine measured it
        )
        if adapter is not None:  # served with --adapters: which adapter answered
            record["adapter"] = adapter
        if served.embedder is None:
            served.inference_log.log("generation", **record)
        else:  # the prompt's embedding for drift, in a worker thread: the response does not wait for it
            asyncio.get_running_loop().run_in_executor(None, _log_with_embedding, served, record, prompt_text(body))


def _log_with_embedding(served: Served, record: dict[str, Any], text: str) -> None:
    assert served.embedder is not None and served.inference_log is not None
    try:
        vector = served.embedder.embed([text])[0]
        record["embedding"] = {"model": served.embedder.name, "vector": [round(float(v), 5) for v in vector]}
    except Exception:  # a failed embedding never loses the log line
        log.exception("embedding the prompt of request %s failed", record["request_id"])
    served.inference_log.log("generation", **record)


# --- routes ------------------------------------------------------------------------------------------------

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
}


@router.get(
    "/health", summary="Liveness: the process and its engine can serve", responses={503: {"model": ErrorResponse}}
)
async def health(request: Request) -> Response:
    engine = _served(request).engine
    if engine.alive():
        return JSONResponse({"status": "ok", "serving_path": engine.serving_path})
    return error_response(
        503, "the inference engine is dead; restart the server", type="server_error", code="engine_dead"
    )


@router.get("/ready", summary="Readiness: the model is loaded and warm", responses={503: {"model": ErrorResponse}})
async def ready(request: Request) -> Response:
    served = _served(request)
    if served.engine.ready():
        return JSONResponse({"status": "ready", "model": served.model_name, "version": served.version})
    return error_response(503, "the model is loading or the server is draining", type="server_error", code="not_ready")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=_served(request).cards())


@router.get("/v1/models/{model_id}", response_model=ModelCard, responses=_ERRORS)
async def get_model(model_id: str, request: Request) -> ModelCard:
    served = _served(request)
    served.check_model(model_id)
    return next(c for c in served.cards() if c.id == model_id)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    timing = _Timing(time.perf_counter())
    served, rid = _served(request), request.state.request_id
    served.check_model(body.model)
    if (
        body.max_tokens is not None
        and body.max_completion_tokens is not None
        and body.max_tokens != body.max_completion_tokens
    ):
        raise APIError(400, "give max_tokens or max_completion_tokens, not two different values", param="max_tokens")
    turns = _chat_turns(body)
    tool_mode = _tool_mode(body)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    prompt_ids = await _tokenize(served.engine.encode_chat, turns, tools)
    max_tokens = served.budget(prompt_ids, body.max_completion_tokens or body.max_tokens, "messages")
    logprobs = body.top_logprobs_count()
    jobs = [
        _Job(
            prompt_ids,
            _tool_params(_params(body, max_tokens, i, logprobs, served.adapter_of(body.model)), tool_mode, tools, body),
        )
        for i in range(body.choices())
    ]
    gens, firsts = await _start_tools(served.engine, jobs, rid, timing, tool_mode)
    cid = f"chatcmpl-{rid}"
    with_logprobs = logprobs is not None
    if tool_mode is not None:
        assert tools is not None
        results = await _collect_all(gens, firsts, request)
        completion = sum(r.tokens for r in results)
        _finish_metrics(
            served,
            "/v1/chat/completions",
            rid,
            timing,
            len(prompt_ids),
            completion,
            [r.finish for r in results],
            body,
            bool(body.stream),
            [r.nll for r in results],
        )
        answers = [_tool_answer(served.engine, r, tool_mode, tools, rid, i) for i, r in enumerate(results)]
        usage = Usage(
            prompt_tokens=len(prompt_ids), completion_tokens=completion, total_tokens=len(prompt_ids) + completion
        )
        if not body.stream:
            return JSONResponse(
                ChatCompletionResponse(
                    id=cid,
                    model=body.model,
                    system_fingerprint=served.version,
                    choices=[
                        ChatChoice(
                            index=i,
                            message=message,
                            finish_reason=finish,
                            logprobs=_chat_logprobs(r.logprobs) if with_logprobs else None,
                        )
                        for i, ((message, finish), r) in enumerate(zip(answers, results))
                    ],
                    usage=usage,
                ).model_dump()
            )
        chunks = _tool_chunks(cid, served, answers, usage if body.include_usage() else None)
        return StreamingResponse(iter(chunks), media_type="text/event-stream", headers={"cache-control": "no-cache"})
    if not body.stream:
        results = await _collect_all(gens, firsts, request)
        completion = sum(r.tokens for r in results)
        _finish_metrics(
            served,
            "/v1/chat/completions",
            rid,
            timing,
            len(prompt_ids),
            completion,
            [r.finish for r in results],
            body,
            False,
            [r.nll for r in results],
        )
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=r.text),
                finish_reason=r.finish,
                logprobs=_chat_logprobs(r.logprobs) if with_logprobs else None,
            )
            for i, r in enumerate(results)
        ]
        return JSONResponse(
            ChatCompletionResponse(
                id=cid,
                model=body.model,
                system_fingerprint=served.version,
                choices=choices,
                usage=Usage(
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=completion,
                    total_tokens=len(prompt_ids) + completion,
                ),
            ).model_dump()
        )
    include_usage = body.include_usage()

    async def events() -> AsyncIterator[str]:
        now = int(time.time())
        tokens = [0] * len(jobs)
        finishes: list[str | None] = [None] * len(jobs)
        nlls: list[float | None] = [None] * len(jobs)

        def chunk(i: int, delta: DeltaMessage, finish: str | None = None, lps: tuple[TokenLogprob, ...] = ()) -> str:
            choice = ChatChunkChoice(
                index=i,
                delta=delta,
                finish_reason=finish,
                logprobs=_chat_logprobs(list(lps)) if with_logprobs and lps else None,
            )
            return _sse(
                ChatCompletionChunk(
                    id=cid, created=now, model=body.model, system_fingerprint=served.version, choices=[choice]
                )
            )

        try:
            for i in range(len(jobs)):
                yield chunk(i, DeltaMessage(role="assistant", content=""))
            async for i, c in _merged(gens, firsts):
                tokens[i] = c.completion_tokens
                if c.text or (with_logprobs and c.logprobs):
                    yield chunk(i, DeltaMessage(content=c.text), lps=c.logprobs)
                if c.finish_reason is not None:
                    finishes[i], nlls[i] = c.finish_reason, c.output_nll
                    yield chunk(i, DeltaMessage(), c.finish_reason)
            if include_usage:
                usage = Usage(
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=sum(tokens),
                    total_tokens=len(prompt_ids) + sum(tokens),
                )
                yield _sse(
                    ChatCompletionChunk(
                        id=cid,
                        created=now,
                        model=body.model,
                        system_fingerprint=served.version,
                        choices=[],
                        usage=usage,
                    )
                )
            yield "data: [DONE]\n\n"
        except (EngineClosed, EngineOverloaded, EngineError) as e:
            yield _sse_error(e)
        finally:
            _finish_metrics(
                served, "/v1/chat/completions", rid, timing, len(prompt_ids), sum(tokens), finishes, body, True, nlls
            )

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Response:
    timing = _Timing(time.perf_counter())
    served, rid = _served(request), request.state.request_id
    served.check_model(body.model)
    prompts = body.prompts()
    n = body.choices()
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(
            400, f"{len(prompts)} prompts x n={n} is more than {MAX_CHOICES} choices in one request", param="n"
        )
    encoded, echoes = await _tokenize(_encode_prompts, served.engine, prompts, bool(body.echo))
    prompt_logprobs = body.logprobs if body.echo else None
    jobs: list[_Job] = []
    echo: list[str] = []
    prompt_tokens = 0
    for ids, echoed in zip(encoded, echoes):
        if not ids:
            raise APIError(400, "the prompt is empty and this model has no beginning-of-text token", param="prompt")
        if prompt_logprobs is not None:
            _check_prompt_logprobs(ids)
        max_tokens = served.budget(ids, body.max_tokens, "prompt")
        prompt_tokens += len(ids)
        jobs.extend(
            _Job(
                ids,
                replace(
                    _params(body, max_tokens, j, body.logprobs, served.adapter_of(body.model)),
                    prompt_logprobs=prompt_logprobs,
                ),
            )
            for j in range(n)
        )
        echo.extend([echoed] * n)
    gens, firsts = await _start(served.engine, jobs, rid, timing)
    cid = f"cmpl-{rid}"
    with_logprobs = body.logprobs is not None
    if not body.stream:
        results = await _collect_all(gens, firsts, request)
        completion = sum(r.tokens for r in results)
        _finish_metrics(
            served,
            "/v1/completions",
            rid,
            timing,
            prompt_tokens,
            completion,
            [r.finish for r in results],
            body,
            False,
            [r.nll for r in results],
        )
        choices = [
            CompletionChoice(
                index=i,
                text=echo[i] + r.text,
                finish_reason=r.finish,
                logprobs=_completion_logprobs(r.logprobs, 0, r.prompt_logprobs) if with_logprobs else None,
            )
            for i, r in enumerate(results)
        ]
        return JSONResponse(
            CompletionResponse(
                id=cid,
                model=body.model,
                system_fingerprint=served.version,
                choices=choices,
                usage=Usage(
                    prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
                ),
            ).model_dump()
        )
    include_usage = body.include_usage()

    async def events() -> AsyncIterator[str]:
        now = int(time.time())
        tokens = [0] * len(jobs)
        offsets = [0] * len(jobs)
        finishes: list[str | None] = [None] * len(jobs)
        nlls: list[float | None] = [None] * len(jobs)
        try:
            async for i, c in _merged(gens, firsts):
                tokens[i] = c.completion_tokens
                if c.finish_reason is not None:
                    finishes[i], nlls[i] = c.finish_reason, c.output_nll
                text = c.text
                if echo[i]:
                    text, echo[i] = echo[i] + text, ""
                if text or c.finish_reason is not None or (with_logprobs and c.logprobs):
                    lps = (
                        _completion_logprobs(list(c.logprobs), offsets[i], c.prompt_logprobs) if with_logprobs else None
                    )
                    if lps is not None and lps.text_offset:
                        offsets[i] = lps.text_offset[-1] + len(lps.tokens[-1])
                    choice = CompletionChoice(index=i, text=text, finish_reason=c.finish_reason, logprobs=lps)
                    yield _sse(
                        CompletionResponse(
                            id=cid,
                            created=now,
                            model=body.model,
                            system_fingerprint=served.version,
                            choices=[choice],
                        )
                    )
            if include_usage:
                usage = Usage(
                    prompt_tokens=prompt_tokens, completion_tokens=sum(tokens), total_tokens=prompt_tokens + sum(tokens)
                )
                yield _sse(
                    CompletionResponse(
                        id=cid,
                        created=now,
                        model=body.model,
                        system_fingerprint=served.version,
                        choices=[],
                        usage=usage,
                    )
                )
            yield "data: [DONE]\n\n"
        except (EngineClosed, EngineOverloaded, EngineError) as e:
            yield _sse_error(e)
        finally:
            _finish_metrics(
                served, "/v1/completions", rid, timing, prompt_tokens, sum(tokens), finishes, body, True, nlls
            )

    return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})


# --- tool calls -------------------------------------------------------------------------------------------
# The model sees the tools through its chat template; what it writes is parsed in its family's call format
# (engine.parse_tool_calls), or, for tool_choice required or a named function, generated under a JSON schema
# (kollm.serve.tools). The answer is sent once complete: streamed, it comes as OpenAI streams calls (a delta with
# the call's id, type, name and empty arguments, then argument fragments, then finish_reason tool_calls).

ToolMode = str  # "auto", "required", or the name of the one function to call


def _chat_turns(body: ChatCompletionRequest) -> list[ChatTurn]:
    turns = []
    for i, m in enumerate(body.messages):
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise APIError(
                400, f"messages.{i}.content: a {m.role} message needs content", param=f"messages.{i}.content"
            )
        if m.role == "tool" and m.tool_call_id is None:
            raise APIError(
                400,
                f"messages.{i}.tool_call_id: a tool message names the call it answers",
                param=f"messages.{i}.tool_call_id",
                code="invalid_request",
            )
        calls = m.tool_calls or []
        turns.append(
            ChatTurn(
                "system" if m.role == "developer" else m.role,
                m.text(),
                tool_calls=tuple(ParsedCall(c.function.name, c.function.arguments) for c in calls),
                tool_call_ids=tuple(c.id for c in calls),
                tool_call_id=m.tool_call_id,
            )
        )
    return turns


def _tool_mode(body: ChatCompletionRequest) -> ToolMode | None:
    """None: no tool calls are looked for (no tools, or tool_choice none)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise APIError(
                400,
                "tool_choice needs tools: send the functions the model may call",
                param="tool_choice",
                code="invalid_request",
            )
        return None
    if choice == "none":
        return None
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    names = [t.function.name for t in body.tools]
    if choice.function.name not in names:
        raise APIError(
            400,
            f"tool_choice names the function {choice.function.name!r}, which is not among the tools ({', '.join(names)})",
            param="tool_choice",
            code="invalid_request",
        )
    return choice.function.name


def _tool_params(
    params: SamplingParams, mode: ToolMode | None, tools: list[dict[str, Any]] | None, body: ChatCompletionRequest
) -> SamplingParams:
    """tool_choice required or a named function: the output is generated under that call's JSON schema."""
    if mode is None or mode == "auto":
        return params
    assert tools is not None
    if params.response_format is not None:
        raise APIError(
            400, "tool_choice required or a named function cannot be combined with response_format", param="tool_choice"
        )
    schema = (
        required_schema(tools, body.parallel_tool_calls is not False)
        if mode == "required"
        else named_schema(tools, mode)
    )
    return replace(params, response_format="json_schema", json_schema=schema)


async def _start_tools(
    engine: Engine, jobs: list[_Job], rid: str, timing: _Timing, mode: ToolMode | None
) -> tuple[list[AsyncGenerator[TokenChunk, None]], list[TokenChunk]]:
    """_start; a tool schema the grammar cannot use is a 400 naming `tools`."""
    try:
        return await _start(engine, jobs, rid, timing)
    except APIError as e:
        if mode not in (None, "auto") and e.param == "response_format":
            raise APIError(400, e.message.replace("response_format", "tools"), param="tools", code=e.code) from None
        raise


def _tool_answer(
    engine: Engine, r: _Result, mode: ToolMode, tools: list[dict[str, Any]], rid: str, index: int
) -> tuple[AssistantMessage | ToolCallsMessage, str | None]:
    if mode == "auto":
        content, calls = engine.parse_tool_calls(r.text, tools)
    else:
        content, calls = None, calls_from_json(r.text, None if mode == "required" else mode)
    if not calls:  # no call (an answer in prose, or JSON cut at max_tokens): the text is the content
        return AssistantMessage(content=r.text), r.finish
    tool_calls = [
        ToolCall(id=f"call_{rid[:16]}_{index}_{k}", function=ToolCallFunction(name=c.name, arguments=c.arguments))
        for k, c in enumerate(calls)
    ]
    return ToolCallsMessage(content=content, tool_calls=tool_calls), "tool_calls"


def _tool_chunks(
    cid: str, served: Served, answers: list[tuple[AssistantMessage | ToolCallsMessage, str | None]], usage: Usage | None
) -> list[str]:
    now = int(time.time())

    def chunk(i: int, delta: dict[str, Any], finish: str | None = None) -> str:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": now,
            "model": served.model_name,
            "system_fingerprint": served.version,
            "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    out = []
    for i, (message, finish) in enumerate(answers):
        out.append(chunk(i, {"role": "assistant", "content": message.content}))
        for k, call in enumerate(message.tool_calls if isinstance(message, ToolCallsMessage) else []):
            head = {
                "index": k,
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": ""},
            }
            out.append(chunk(i, {"tool_calls": [head]}))
            args = call.function.arguments
            for start in range(0, len(args), 16):  # argument fragments, as OpenAI streams them
                out.append(
                    chunk(i, {"tool_calls": [{"index": k, "function": {"arguments": args[start : start + 16]}}]})
                )
        out.append(chunk(i, {}, finish))
    if usage is not None:
        body = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": now,
            "model": served.model_name,
            "system_fingerprint": served.version,
            "choices": [],
            "usage": usage.model_dump(),
        }
        out.append(f"data: {json.dumps(body, ensure_ascii=False)}\n\n")
    out.append("data: [DONE]\n\n")
    return out


# --- the app ----------------------------------------------------------------------------------------------


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)


async def _invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, param = _validation_message(list(exc.errors()))
    return error_response(400, message, param=param, code="invalid_request")


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:
        message = "the request body could not be read: send UTF-8 encoded JSON"
    elif exc.status_code == 404:
        message = f"no route {clip(request.url.path)}; see /docs for the API"
    else:
        message = str(exc.detail)
    code = "request_too_large" if exc.status_code == 413 else str(exc.status_code)
    return error_response(exc.status_code, message, code=code)


def create_app(
    engine: Engine,
    *,
    model_name: str,
    model_version: str | None = None,
    api_key: str | None = None,
    log_dir: Path | None = None,
    shutdown_engine: bool = True,
    max_body_bytes: int = MAX_BODY_BYTES,
    embedder: Embedder | None = None,
    adapters: tuple[str, ...] = (),
    base_adapter: str | None = None,
) -> FastAPI:
    """The OpenAI-compatible app serving `engine` as `model_name` (see the module docstring); with `embedder` (and a
    log_dir), each request's prompt embedding goes into the inference log for `kollm monitor drift --embedding-model`.
    `adapters` are served beside the base under their own names; `base_adapter` is the engine adapter that requests
    for `model_name` run with (None: the base alone)."""
    version = model_version or "unversioned"
    api_log = JsonLog(Path(log_dir) / "api" / "api.jsonl", "serve", model=model_name) if log_dir else None
    inference_log = (
        JsonLog(Path(log_dir) / "inference" / "inference.jsonl", "serve", model=model_name) if log_dir else None
    )
    metrics.track_engine(version, engine.queue_depth, engine.running)
    if isinstance(engine, TransformersEngine):
        metrics.track_prefix_cache(version, engine.prefix_cache_hit_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if shutdown_engine:
            await engine.shutdown()

    app = FastAPI(title="kollm OpenAI-compatible server", version=version, lifespan=lifespan)
    app.state.served = Served(
        engine, model_name, version, inference_log, embedder, adapters=tuple(adapters), base_adapter=base_adapter
    )
    app.state.engine, app.state.model_name, app.state.model_version = engine, model_name, version
    app.add_middleware(
        _HTTPMiddleware, version=version, api_key=api_key, api_log=api_log, max_body_bytes=max_body_bytes
    )
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(router)
    return app
