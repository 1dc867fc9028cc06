"""A scripted Engine for unit tests of the HTTP layer: one token per character of a fixed reply."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence

from kollm.serve.engine import ChatTurn, PromptError, RequestError, SamplingParams, StopFilter, TokenChunk, TokenLogprob


class FakeEngine:
    def __init__(self, reply: str = "안녕하세요, kollm입니다.", *, context_length: int = 64, delay: float = 0.0):
        self.reply = reply
        self.context_length = context_length
        self.delay = delay
        self.calls: list[tuple[list[int], SamplingParams, str]] = []
        self.cancelled: list[str] = []
        self.fail_with: BaseException | None = None
        self.is_ready = True
        self.is_alive = True
        self.shut_down = False
        self.last_chat: list[ChatTurn] = []

    def encode_prompt(self, text: str) -> list[int]:
        return [ord(c) % 50_000 for c in text]

    def encode_chat(self, messages: Sequence[ChatTurn]) -> list[int]:
        self.last_chat = list(messages)
        if any(m.content == "REJECT" for m in messages):
            raise PromptError("the chat template rejected the messages")
        return self.encode_prompt("".join(f"<{m.role}>{m.content}" for m in messages) + "<assistant>")

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncGenerator[TokenChunk, None]:
        self.calls.append((list(prompt_ids), params, request_id))
        if self.fail_with is not None:
            raise self.fail_with
        if params.response_format is not None:
            raise RequestError("response_format is not served by this engine", param="response_format")
        stops = StopFilter(params.stop)
        finished = False
        try:
            for n, ch in enumerate(self.reply, start=1):
                if self.delay:
                    await asyncio.sleep(self.delay)
                text, hit = stops.push(ch)
                finish = "stop" if hit else ("length" if n >= params.max_tokens else ("stop" if n == len(self.reply) else None))
                if finish is not None and not hit:
                    text += stops.flush()
                finished = finish is not None
                lp = () if params.logprobs is None else (TokenLogprob(ch, -0.5, tuple((ch * (k + 1), -1.0 - k) for k in range(params.logprobs))),)
                yield TokenChunk(text=text, completion_tokens=n, finish_reason=finish, logprobs=lp)
                if finished:
                    return
        finally:
            if not finished:
                self.cancelled.append(request_id)

    def ready(self) -> bool:
        return self.is_ready

    def alive(self) -> bool:
        return self.is_alive

    def queue_depth(self) -> int:
        return 0

    def running(self) -> int:
        return 0

    async def shutdown(self) -> None:
        self.shut_down = True
