"""Fault injection for testing alerts and canary analysis: an Engine wrapper that fails or slows requests.

A TESTING AID, never for production traffic:

    kollm serve MODEL --inject-faults error_rate=0.3,latency_ms=200

makes about 30% of generation requests answer HTTP 500 (the engine raises `InjectedFault`, which the HTTP layer
turns into an internal server error) and delays every generation request by 200 ms before its first token.
Requests the router rejects before reaching the engine (400s, 401s, 404s) and /health, /ready, /metrics are
untouched, so a faulty server still looks alive to probes: exactly what a broken model version looks like.

Public API:
    FaultSpec(error_rate, latency_ms, seed)   what to inject
    parse_faults("error_rate=0.3,latency_ms=200") -> FaultSpec   (ConfigError naming the bad part)
    FaultyEngine(engine, spec)                the wrapping Engine
    InjectedFault                             the exception an injected failure raises
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kollm.errors import ConfigError

if TYPE_CHECKING:  # parsing --inject-faults must not import torch
    from kollm.serve.engine import ChatTurn, Engine, SamplingParams, TokenChunk
    from kollm.serve.tools import ParsedCall

log = logging.getLogger("kollm.serve")

FAULT_KEYS = {
    "error_rate": "share of generation requests that fail with HTTP 500, 0..1",
    "latency_ms": "milliseconds added before each generation request's first token, >= 0",
    "seed": "seed of the random draws (default: unseeded)",
}


class InjectedFault(RuntimeError):
    """A failure injected by --inject-faults (the HTTP layer answers 500)."""


@dataclass(frozen=True)
class FaultSpec:
    error_rate: float = 0.0
    latency_ms: float = 0.0
    seed: int | None = None

    def __str__(self) -> str:
        return f"error_rate={self.error_rate:g},latency_ms={self.latency_ms:g}"


def parse_faults(text: str) -> FaultSpec:
    """Parse `key=value,...` (keys: error_rate, latency_ms, seed). Raises ConfigError naming what to fix."""
    values: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, raw = (s.strip() for s in part.partition("="))
        if not sep or key not in FAULT_KEYS:
            raise ConfigError(
                f"--inject-faults {text!r}: {part!r} is not KEY=VALUE with KEY one of {', '.join(FAULT_KEYS)} "
                "(e.g. --inject-faults error_rate=0.3,latency_ms=200)"
            )
        try:
            values[key] = float(raw)
        except ValueError:
            raise ConfigError(f"--inject-faults: {key}={raw!r} is not a number ({FAULT_KEYS[key]})") from None
    if not values:
        raise ConfigError("--inject-faults: nothing to inject; give e.g. --inject-faults error_rate=0.3,latency_ms=200")
    spec = FaultSpec(
        values.get("error_rate", 0.0), values.get("latency_ms", 0.0), int(values["seed"]) if "seed" in values else None
    )
    if not 0.0 <= spec.error_rate <= 1.0:
        raise ConfigError(f"--inject-faults: error_rate={spec.error_rate:g} must be between 0 and 1")
    if spec.latency_ms < 0:
        raise ConfigError(f"--inject-faults: latency_ms={spec.latency_ms:g} must be >= 0")
    return spec


class FaultyEngine:
    """An Engine that delegates to `engine` but delays and fails generation requests as `spec` says."""

    def __init__(self, engine: Engine, spec: FaultSpec):
        self.engine = engine
        self.spec = spec
        self.context_length = engine.context_length
        self.serving_path = engine.serving_path
        self._random = random.Random(spec.seed)
        self.injected = 0  # failures injected so far
        log.warning("fault injection ON (%s): a testing aid, not for production traffic", spec)

    def encode_prompt(self, text: str) -> list[int]:
        return self.engine.encode_prompt(text)

    def decode(self, ids: list[int]) -> str:
        return self.engine.decode(ids)

    def encode_chat(self, messages: Sequence[ChatTurn], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        return self.engine.encode_chat(messages, tools)

    def parse_tool_calls(self, text: str, tools: Sequence[dict[str, Any]]) -> tuple[str | None, list[ParsedCall]]:
        return self.engine.parse_tool_calls(text, tools)

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncGenerator[TokenChunk, None]:
        if self.spec.latency_ms > 0:
            await asyncio.sleep(self.spec.latency_ms / 1000)
        if self._random.random() < self.spec.error_rate:
            self.injected += 1
            raise InjectedFault(f"injected fault for request {request_id} (--inject-faults {self.spec})")
        async for chunk in self.engine.generate(prompt_ids, params, request_id):
            yield chunk

    def ready(self) -> bool:
        return self.engine.ready()

    def alive(self) -> bool:
        return self.engine.alive()

    def queue_depth(self) -> int:
        return self.engine.queue_depth()

    def running(self) -> int:
        return self.engine.running()

    async def shutdown(self) -> None:
        await self.engine.shutdown()
