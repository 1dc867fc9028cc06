"""The one scripted Engine (kollm.serve.engine.Engine) of the tests: the HTTP layer, the gateway, rollouts and
monitoring run the real app around it. tests/serve/test_protocol_conformance.py checks it against the protocol.

    FakeEngine("안녕")                    answers "안녕", one token per character
    FakeEngine(["v2", " 답변"])           answers those tokens (a canary arm: `versioned("2")`)
    fail_with = EngineOverloaded(...)    every request raises it (set or clear it at any time)
    fail_ratio = 0.3                     3 requests in 10 raise RuntimeError (requests 1-3, 11-13, ...: a 500)
    delay / request_delay                seconds before each token / before a request's first token
    calls, cancelled, last_chat          what it was asked (prompt ids, params, request id), what was cut short
    is_ready, is_alive, shutdown()       the probes; after shutdown() it is not ready and refuses requests
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Literal

from kollm.serve.engine import (
    ChatTurn,
    EngineClosed,
    PromptError,
    RequestError,
    SamplingParams,
    StopFilter,
    TokenChunk,
    TokenLogprob,
)
from kollm.serve.tools import ParsedCall, parse_calls


class FakeEngine:
    def __init__(
        self,
        reply: str | Sequence[str] = "안녕하세요, kollm입니다.",
        *,
        context_length: int = 64,
        delay: float = 0.0,
        request_delay: float = 0.0,
        fail_ratio: float = 0.0,
    ):
        self.tokens = list(reply)  # a string: one token per character
        self.reply = "".join(self.tokens)
        self.context_length = context_length
        self.serving_path = "fake engine (tests)"
        self.delay = delay
        self.request_delay = request_delay
        self.fail_ratio = fail_ratio
        self.calls: list[tuple[list[int], SamplingParams, str]] = []
        self.cancelled: list[str] = []
        self.fail_with: BaseException | None = None
        self.is_ready = True
        self.is_alive = True
        self.shut_down = False
        self.last_chat: list[ChatTurn] = []
        self._running = 0

    def encode_prompt(self, text: str) -> list[int]:
        return [ord(c) % 50_000 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)

    def encode_chat(self, messages: Sequence[ChatTurn], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        self.last_chat = list(messages)
        if any(m.content == "REJECT" for m in messages):
            raise PromptError("the chat template rejected the messages")
        return self.encode_prompt("".join(f"<{m.role}>{m.content}" for m in messages) + "<assistant>")

    def parse_tool_calls(self, text: str, tools: Sequence[dict[str, Any]]) -> tuple[str | None, list[ParsedCall]]:
        return parse_calls("hermes", text)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncGenerator[TokenChunk, None]:
        if self.shut_down:
            raise EngineClosed("the engine is shut down")
        self.calls.append((list(prompt_ids), params, request_id))
        n = len(self.calls)
        if self.fail_with is not None:
            raise self.fail_with
        if params.response_format is not None:
            raise RequestError("response_format is not served by this engine", param="response_format")
        self._running += 1
        stops = StopFilter(params.stop)
        finished = False
        try:
            if self.request_delay:
                await asyncio.sleep(self.request_delay)
            if self.fail_ratio and (n % 10) < self.fail_ratio * 10:
                raise RuntimeError(f"the engine failed on request {n}")
            for n, token in enumerate(self.tokens, start=1):
                if self.delay:
                    await asyncio.sleep(self.delay)
                text, hit = stops.push(token)
                last = n == len(self.tokens)
                finish: Literal["stop", "length"] | None = (
                    "stop" if hit else ("length" if n >= params.max_tokens else ("stop" if last else None))
                )
                if finish is not None and not hit:
                    text += stops.flush()
                finished = finish is not None
                lp: tuple[TokenLogprob, ...] = ()
                if params.logprobs is not None:
                    top = tuple((token * (k + 1), -1.0 - k) for k in range(params.logprobs))
                    lp = (TokenLogprob(token, -0.5, top),)
                yield TokenChunk(text=text, completion_tokens=n, finish_reason=finish, logprobs=lp)
                if finished:
                    return
        finally:
            self._running -= 1
            if not finished:
                self.cancelled.append(request_id)

    def ready(self) -> bool:
        return self.is_ready and not self.shut_down

    def alive(self) -> bool:
        return self.is_alive

    def queue_depth(self) -> int:
        return 0

    def running(self) -> int:
        return self._running

    async def shutdown(self) -> None:
        self.shut_down = True


def versioned(version: str, **kwargs) -> FakeEngine:
    """A model version's engine for gateway and rollout tests: answers "v<version> 답변" in two tokens."""
    return FakeEngine([f"v{version}", " 답변"], **{"context_length": 512, **kwargs})
