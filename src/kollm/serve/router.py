"""The HTTP layer: an OpenAI-compatible FastAPI app around any `Engine`.

Public API:
    create_app(engine, *, model_name, model_version=None, api_key=None, log_dir=None, shutdown_engine=True) -> FastAPI

Routes: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions (JSON or, with
`"stream": true`, server-sent events ending in `data: [DONE]`), GET /health (liveness), GET /ready (200 once the
model is loaded and warm, 503 while loading or draining), GET /metrics (Prometheus, see kollm.serve.metrics).

Every response carries `x-kollm-model-version` (the version that served it, "unversioned" when none was given)
and `x-request-id` (the client's, when it sent a well-formed one, else a new one). Errors are OpenAI-style JSON
`{"error": {"message", "type", "param", "code"}}`: 400 for anything wrong with the request (bad JSON, invalid
UTF-8, wrong types, unknown fields, empty messages, max_tokens <= 0 or past the context, a prompt longer than the
context), 401 for a missing/wrong API key (when `api_key` is set; /health, /ready and /metrics stay open), 404 for
an unknown model or route, 503 when the engine is overloaded or shutting down. A bad request never gets a 5xx.

Logs (when `log_dir` is given, normally `<project>/.kollm/logs`): one JSON line per HTTP request in
`api/api.jsonl`, one per generation in `inference/inference.jsonl`, both with the request id.

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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from kollm.monitor.features import request_features
from kollm.monitor.logging import JsonLinesLogger
from kollm.serve import metrics
from kollm.serve.engine import ChatTurn, Engine, EngineClosed, EngineOverloaded, PromptError, SamplingParams, TokenChunk
from kollm.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorResponse,
    ModelCard,
    ModelList,
    Usage,
)

log = logging.getLogger("kollm.serve")

VERSION_HEADER = "x-kollm-model-version"
REQUEST_ID_HEADER = "x-request-id"
ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/ready", "/metrics"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class APIError(Exception):
    """An error answered as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> Response:
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
        path = ".".join(str(p) for p in loc)
        msg = f"{path}: unknown field (kollm serves the OpenAI fields model, messages/prompt, max_tokens, temperature, top_p, stop, n, seed, stream, stream_options, user)"
        return msg, path
    if first.get("type") in ("json_invalid", "json_type"):
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if first.get("type") == "missing" and not loc:
        return "the request body is missing: send a JSON object", None
    # union members add type tags to the location (messages.0.content.str); keep field names and indexes only
    def clean(loc) -> str:
        kept = [p for p in loc if p != "body" and (isinstance(p, int) or (_FIELD.fullmatch(str(p)) and str(p) not in _TYPE_TAGS))]
        return ".".join(str(p) for p in kept)

    path = clean(first.get("loc", ())) or None
    msg = first.get("msg", "invalid value")
    others = {clean(e.get("loc", ())) for e in errors} - {path or ""}  # a union reports each member: count fields, not members
    more = f" (and {len(others)} more field{'s' if len(others) > 1 else ''})" if others else ""
    return (f"{path}: {msg}{more}" if path else f"{msg}{more}"), path


@dataclass
class _Timing:
    start: float
    first_token: float | None = None

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()


class _HTTPMiddleware:
    """Request ids, the model-version header, API-key auth for /v1, request metrics and the API log."""

    def __init__(self, app, *, version: str, api_key: str | None, api_log: JsonLinesLogger | None):
        self.app = app
        self.version = version
        self.api_key = api_key.encode() if api_key else None
        self.api_log = api_log

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
                await error_response(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`", code="invalid_api_key")(
                    scope, receive, send_with_headers
                )
            else:
                await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled error for %s %s (request %s)", scope.get("method"), path, rid)
            if not started:
                await error_response(500, f"internal server error (request id {rid})", type="server_error", code="internal_error")(
                    scope, receive, send_with_headers
                )
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
                    request_id=rid,
                    method=scope.get("method"),
                    path=path,
                    status=status,
                    latency_ms=round(elapsed * 1000, 2),
                    model_version=self.version,
                    client=f"{client[0]}:{client[1]}" if client else None,
                )

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        value = headers.get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)


def create_app(
    engine: Engine,
    *,
    model_name: str,
    model_version: str | None = None,
    api_key: str | None = None,
    log_dir: Path | None = None,
    shutdown_engine: bool = True,
) -> FastAPI:
    """The OpenAI-compatible app serving `engine` as `model_name` (see the module docstring)."""
    version = model_version or "unversioned"
    api_log = JsonLinesLogger(Path(log_dir) / "api" / "api.jsonl") if log_dir else None
    inference_log = JsonLinesLogger(Path(log_dir) / "inference" / "inference.jsonl") if log_dir else None
    created = int(time.time())
    metrics.track_engine(version, engine.queue_depth, engine.running)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if shutdown_engine:
            await engine.shutdown()

    app = FastAPI(title="kollm OpenAI-compatible server", version=version, lifespan=lifespan)
    app.state.engine, app.state.model_name, app.state.model_version = engine, model_name, version
    app.add_middleware(_HTTPMiddleware, version=version, api_key=api_key, api_log=api_log)
    bad_request = {400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(list(exc.errors()))
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400:
            message = "the request body could not be read: send UTF-8 encoded JSON"
        elif exc.status_code == 404:
            message = f"no route {request.url.path}; see /docs for the API"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, code=str(exc.status_code))

    def card() -> ModelCard:
        return ModelCard(id=model_name, created=created, version=model_version, max_model_len=engine.context_length)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} is not served here; this server serves {model_name!r}", param="model", code="model_not_found")

    def budget(prompt_ids: list[int], max_tokens: int | None, param: str) -> int:
        ctx = engine.context_length
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

    def params_for(body: ChatCompletionRequest | CompletionRequest, max_tokens: int, choice: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_list(),
            seed=None if body.seed is None else body.seed + choice,
            ignore_eos=body.ignore_eos,
        )

    @dataclass
    class _Job:
        prompt_ids: list[int]
        params: SamplingParams

    async def start(jobs: list[_Job], rid: str, timing: _Timing) -> tuple[list[AsyncIterator[TokenChunk]], list[TokenChunk]]:
        """Submit every job and wait for each one's first chunk, so that errors come back before any byte is sent."""
        gens = [engine.generate(j.prompt_ids, j.params, f"{rid}-{i}") for i, j in enumerate(jobs)]
        try:
            firsts = await asyncio.gather(*(anext(g) for g in gens))
        except EngineOverloaded as e:
            await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
            raise APIError(503, f"the server is overloaded: {e}", type="server_error", code="overloaded") from None
        except EngineClosed as e:
            await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
            raise APIError(503, f"{e}; retry on another replica", type="server_error", code="unavailable") from None
        except BaseException:
            await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
            raise
        timing.token()
        return gens, firsts

    def finish_metrics(endpoint: str, rid: str, timing: _Timing, prompt_tokens: int, completion_tokens: int, finishes: list[str | None], body, stream: bool) -> None:
        end = time.perf_counter()
        metrics.PROMPT_TOKENS.labels(version).inc(prompt_tokens)
        metrics.OUTPUT_TOKENS.labels(version).inc(completion_tokens)
        ttft = None
        if timing.first_token is not None:
            ttft = timing.first_token - timing.start
            metrics.TTFT.labels(version, endpoint).observe(ttft)
            if end > timing.start and completion_tokens:
                metrics.TOKENS_PER_SECOND.labels(version).observe(completion_tokens / (end - timing.start))
        if inference_log is not None:
            inference_log.log(
                "generation",
                request_id=rid,
                endpoint=endpoint,
                model=model_name,
                model_version=version,
                stream=stream,
                n=len(finishes),
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                finish_reasons=finishes,
                ttft_s=None if ttft is None else round(ttft, 4),
                latency_s=round(end - timing.start, 4),
                user=body.user,
                features=request_features(body, prompt_tokens, completion_tokens),  # for `kollm monitor drift`
            )

    async def collect(gen: AsyncIterator[TokenChunk], first: TokenChunk) -> tuple[str, int, str | None]:
        parts, last = [first.text], first
        if first.finish_reason is None:
            async for chunk in gen:
                parts.append(chunk.text)
                last = chunk
        return "".join(parts), last.completion_tokens, last.finish_reason

    def sse(obj: Any) -> str:
        return f"data: {obj.model_dump_json(exclude_none=False)}\n\n"

    async def merged(gens: list[AsyncIterator[TokenChunk]], firsts: list[TokenChunk]) -> AsyncIterator[tuple[int, TokenChunk]]:
        """Chunks of all choices as they come, tagged with the choice index; closes every generator on exit."""
        queue: asyncio.Queue[tuple[int, TokenChunk | None]] = asyncio.Queue()

        async def pump(i: int, gen: AsyncIterator[TokenChunk], first: TokenChunk) -> None:
            try:
                await queue.put((i, first))
                if first.finish_reason is None:
                    async for chunk in gen:
                        await queue.put((i, chunk))
            finally:
                await gen.aclose()
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, g, f)) for i, (g, f) in enumerate(zip(gens, firsts))]
        try:
            done = 0
            while done < len(tasks):
                i, chunk = await queue.get()
                if chunk is None:
                    done += 1
                    continue
                yield i, chunk
            for t in tasks:
                t.result()  # re-raise an engine failure
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the model is loaded and warm", responses={503: {"model": ErrorResponse}})
    async def ready() -> Response:
        if engine.ready():
            return JSONResponse({"status": "ready", "model": model_name, "version": version})
        return error_response(503, "the model is loading or the server is draining", type="server_error", code="not_ready")

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses=bad_request)
    async def get_model(model_id: str) -> ModelCard:
        check_model(model_id)
        return card()

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=bad_request)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        timing = _Timing(time.perf_counter())
        rid = request.state.request_id
        check_model(body.model)
        if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
            raise APIError(400, "give max_tokens or max_completion_tokens, not two different values", param="max_tokens")
        turns = [ChatTurn("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
        try:
            prompt_ids = engine.encode_chat(turns)
        except PromptError as e:
            raise APIError(400, str(e), param="messages", code="invalid_prompt") from None
        max_tokens = budget(prompt_ids, body.max_completion_tokens or body.max_tokens, "messages")
        jobs = [_Job(prompt_ids, params_for(body, max_tokens, i)) for i in range(body.n)]
        gens, firsts = await start(jobs, rid, timing)
        cid = f"chatcmpl-{rid}"
        if not body.stream:
            results = await asyncio.gather(*(collect(g, f) for g, f in zip(gens, firsts)))
            completion = sum(r[1] for r in results)
            finish_metrics("/v1/chat/completions", rid, timing, len(prompt_ids), completion, [r[2] for r in results], body, False)
            return JSONResponse(
                ChatCompletionResponse(
                    id=cid,
                    model=model_name,
                    system_fingerprint=version,
                    choices=[ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=f) for i, (t, _, f) in enumerate(results)],
                    usage=Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion, total_tokens=len(prompt_ids) + completion),
                ).model_dump()
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            now = int(time.time())
            tokens = [0] * len(jobs)
            finishes: list[str | None] = [None] * len(jobs)

            def chunk(i: int, delta: DeltaMessage, finish: str | None = None) -> str:
                return sse(ChatCompletionChunk(id=cid, created=now, model=model_name, system_fingerprint=version,
                                               choices=[ChatChunkChoice(index=i, delta=delta, finish_reason=finish)]))

            try:
                for i in range(len(jobs)):
                    yield chunk(i, DeltaMessage(role="assistant", content=""))
                async for i, c in merged(gens, firsts):
                    tokens[i] = c.completion_tokens
                    if c.text:
                        yield chunk(i, DeltaMessage(content=c.text))
                    if c.finish_reason is not None:
                        finishes[i] = c.finish_reason
                        yield chunk(i, DeltaMessage(), c.finish_reason)
                if include_usage:
                    usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=sum(tokens), total_tokens=len(prompt_ids) + sum(tokens))
                    yield sse(ChatCompletionChunk(id=cid, created=now, model=model_name, system_fingerprint=version, choices=[], usage=usage))
                yield "data: [DONE]\n\n"
            except (EngineClosed, EngineOverloaded) as e:
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': 'unavailable'}})}\n\n"
            finally:
                finish_metrics("/v1/chat/completions", rid, timing, len(prompt_ids), sum(tokens), finishes, body, True)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    @app.post("/v1/completions", response_model=CompletionResponse, responses=bad_request)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        timing = _Timing(time.perf_counter())
        rid = request.state.request_id
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if len(prompts) * body.n > 64:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} is more than 64 choices in one request", param="n")
        jobs: list[_Job] = []
        prompt_tokens = 0
        for p in prompts:
            ids = engine.encode_prompt(p)
            if not ids:
                raise APIError(400, "the prompt is empty and this model has no beginning-of-text token", param="prompt")
            max_tokens = budget(ids, body.max_tokens, "prompt")
            prompt_tokens += len(ids)
            jobs.extend(_Job(ids, params_for(body, max_tokens, j)) for j in range(body.n))
        gens, firsts = await start(jobs, rid, timing)
        cid = f"cmpl-{rid}"
        if not body.stream:
            results = await asyncio.gather(*(collect(g, f) for g, f in zip(gens, firsts)))
            completion = sum(r[1] for r in results)
            finish_metrics("/v1/completions", rid, timing, prompt_tokens, completion, [r[2] for r in results], body, False)
            return JSONResponse(
                CompletionResponse(
                    id=cid,
                    model=model_name,
                    system_fingerprint=version,
                    choices=[CompletionChoice(index=i, text=t, finish_reason=f) for i, (t, _, f) in enumerate(results)],
                    usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion),
                ).model_dump()
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            now = int(time.time())
            tokens = [0] * len(jobs)
            finishes: list[str | None] = [None] * len(jobs)
            try:
                async for i, c in merged(gens, firsts):
                    tokens[i] = c.completion_tokens
                    if c.finish_reason is not None:
                        finishes[i] = c.finish_reason
                    if c.text or c.finish_reason is not None:
                        yield sse(CompletionResponse(id=cid, created=now, model=model_name, system_fingerprint=version,
                                                     choices=[CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason)]))
                if include_usage:
                    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(tokens), total_tokens=prompt_tokens + sum(tokens))
                    yield sse(CompletionResponse(id=cid, created=now, model=model_name, system_fingerprint=version, choices=[], usage=usage))
                yield "data: [DONE]\n\n"
            except (EngineClosed, EngineOverloaded) as e:
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': 'unavailable'}})}\n\n"
            finally:
                finish_metrics("/v1/completions", rid, timing, prompt_tokens, sum(tokens), finishes, body, True)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    return app
