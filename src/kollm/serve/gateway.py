"""The canary gateway: one ASGI app in front of two serving apps, `stable` (the champion) and `canary` (the challenger).

Each request goes to one arm:
  1. header `x-kollm-canary: always|never` forces the canary or the stable arm;
  2. else, with an OpenAI `user` field in the JSON body, a hash of the user picks a bucket 0..100 and the
     request goes to the canary when bucket < canary weight (sticky: a user stays on one arm while the weight
     holds, and a user on the canary stays there as the weight grows);
  3. else a random draw against the weight.
The body is read once (to find `user`) and replayed to the chosen app; a body over MAX_BODY_BYTES is not
buffered further: what was read is replayed, the rest streams through, and the request is routed by a random
draw (its `user` unread). While a rollout with a canary judge runs, the bodies of the canary's chat requests
are offered to a bounded uniform sample (kollm.serve.window) that the judge answers again at the window's end.
The gateway itself never rejects a request for its size, at any weight. `send` is wrapped to add the
`x-kollm-model-version` and `x-kollm-arm` headers and to record, per arm, the status and latency (arrival to
the last byte) that the rollout analysis judges.

Changing the weight, promoting the canary, rolling it back or replacing an arm (a server following a registry
alias, kollm.serve.follow) only replace references: a request keeps the arm
it was dispatched to until its last byte, and a retired arm's lifespan is shut down only once its in-flight
requests have drained. No request fails because of a swap.

`/admin/...` goes to the rollout admin app (kollm.rollout.api) and `/metrics` serves the gateway's Prometheus
metrics followed by the process-wide ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal, MutableMapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from kollm.serve.window import PromptSample, Sample

log = logging.getLogger("kollm.gateway")

Scope = MutableMapping[str, Any]  # as the ASGI spec and Starlette type them
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CANARY_HEADER = "x-kollm-canary"
VERSION_HEADER = "x-kollm-model-version"
ARM_HEADER = "x-kollm-arm"
MAX_BODY_BYTES = 16 * 1024 * 1024

ArmName = Literal["stable", "canary"]


def user_bucket(user: str) -> float:
    """A stable bucket in [0, 100) for an OpenAI `user` value (the same in every process and on every restart)."""
    h = int.from_bytes(hashlib.sha256(user.encode("utf-8")).digest()[:8], "big")
    return (h % 10_000) / 100.0


class _Lifespan:
    """Drives the ASGI lifespan protocol of one sub-app (startup now, shutdown later)."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._from_app: asyncio.Queue[Message] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.supported = True

    async def startup(self) -> None:
        async def receive() -> Message:
            return await self._to_app.get()

        async def send(message: Message) -> None:
            await self._from_app.put(message)

        async def main() -> None:
            try:
                await self.app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
            except Exception:  # an app without lifespan support may raise on the scope: that is allowed by the spec
                if self.supported:
                    self.supported = False
                    await self._from_app.put({"type": "lifespan.unsupported"})

        self._task = asyncio.create_task(main())
        await self._to_app.put({"type": "lifespan.startup"})
        msg = await self._from_app.get()
        if msg["type"] == "lifespan.startup.failed":
            raise RuntimeError(f"serving app failed to start: {msg.get('message', '')}")

    async def shutdown(self) -> None:
        if self._task is None or not self.supported or self._task.done():
            return
        await self._to_app.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self._from_app.get(), timeout=30)
        except asyncio.TimeoutError:
            log.warning("serving app did not finish its shutdown within 30 s")
        self._task = None


@dataclass(eq=False)
class Arm:
    """One serving app behind the gateway: the app, the model version it serves, and its request window."""

    app: ASGIApp
    version: str
    model_name: str = ""
    _window: list[Sample] | None = field(default=None, repr=False)  # None: no analysis window open, nothing kept
    _prompts: PromptSample | None = field(default=None, repr=False)  # chat bodies for the canary judge (None: off)
    _started: dict[int, float] = field(default_factory=dict, repr=False)  # in-flight request -> start time
    _lifespan: _Lifespan | None = field(default=None, repr=False)
    _drained: asyncio.Event | None = field(default=None, repr=False)

    @property
    def inflight(self) -> int:
        return len(self._started)

    def record(self, ok: bool, latency_ms: float) -> None:
        """Keep a completed request's outcome for the analysis, only while a window is open (the stable arm,
        and a canary between rollouts, keep nothing: their traffic is unbounded)."""
        if self._window is not None:
            self._window.append(Sample(ok, latency_ms))

    @property
    def keeps_prompts(self) -> bool:
        return self._window is not None and self._prompts is not None and self._prompts.capacity > 0

    def sample_prompts(self, capacity: int) -> None:
        """While a window is open, also keep a uniform sample of at most `capacity` chat request bodies (the
        canary judge's); 0 stops."""
        self._prompts = PromptSample(capacity) if capacity > 0 else None

    def record_prompt(self, body: bytes) -> None:
        if self.keeps_prompts:
            assert self._prompts is not None
            self._prompts.offer(body)

    def take_prompts(self) -> tuple[list[bytes], int]:
        """The chat bodies kept since the last call and how many were seen; starts a new, empty sample."""
        if self._prompts is None:
            return [], 0
        kept, seen = self._prompts.bodies, self._prompts.seen
        self._prompts = PromptSample(self._prompts.capacity)
        return kept, seen

    def take_window(self) -> tuple[list[Sample], list[float]]:
        """The requests completed since the last call (none unless a window was open), and the elapsed
        milliseconds of those still in flight (the analysis counts a still-running request once it is already
        slower than a latency limit, so a canary that hangs is judged slow rather than having no samples).
        Opens a new, empty window."""
        now = time.perf_counter()
        out, self._window = self._window or [], []
        return out, [(now - t) * 1000 for t in self._started.values()]

    def close_window(self) -> None:
        """Stop keeping samples (the rollout is paused or over) and drop those kept so far."""
        self._window = None
        if self._prompts is not None:
            self._prompts = PromptSample(self._prompts.capacity)


class Gateway:
    """ASGI app routing between a stable and an optional canary arm. Mutated only on the event loop."""

    def __init__(self, stable: Arm, canary: Arm | None = None, *, registry: CollectorRegistry | None = None):
        self.stable = stable
        self.canary = canary
        self.weight = 0.0  # percent of traffic for the canary
        self.admin_app: ASGIApp | None = None
        self.on_startup: list[Callable[[], Awaitable[None]]] = []
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []
        self._retiring: set[asyncio.Task] = set()
        self.metrics = registry or CollectorRegistry()
        self._requests = Counter(
            "kollm_gateway_requests",
            "Requests the gateway dispatched, by arm, model version and outcome (error = status >= 500 or an exception).",
            ["arm", "version", "outcome"],
            registry=self.metrics,
        )
        self._latency = Histogram(
            "kollm_gateway_request_duration_seconds",
            "Time from a request's arrival at the gateway to its last response byte, by arm and model version.",
            ["arm", "version"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=self.metrics,
        )

    # ---- changes made by the rollout controller -------------------------------------------------------

    def set_weight(self, percent: float) -> None:
        if not 0 <= percent <= 100:
            raise ValueError(f"canary weight must be between 0 and 100, got {percent}")
        self.weight = float(percent)

    def promote_canary(self) -> None:
        """The canary becomes the stable arm and takes all traffic; the old stable arm retires once drained."""
        if self.canary is None:
            raise RuntimeError("there is no canary to promote")
        old, self.stable, self.canary, self.weight = self.stable, self.canary, None, 0.0
        self._retire(old)

    async def replace_stable(self, arm: Arm) -> None:
        """Serve `arm` in place of the stable arm (alias following): its lifespan is started first, then new
        requests go to it, and the old arm retires once its in-flight requests have finished."""
        if arm._lifespan is None:
            arm._lifespan = _Lifespan(arm.app)
            await arm._lifespan.startup()
        old, self.stable = self.stable, arm
        self._retire(old)

    async def replace_canary(self, arm: Arm) -> None:
        """Serve `arm` as the canary (a newly registered challenger), at weight 0 until a rollout moves it; the
        previous canary, if any, retires once drained. The rollout controller calls this only between rollouts."""
        if arm._lifespan is None:
            arm._lifespan = _Lifespan(arm.app)
            await arm._lifespan.startup()
        old, self.canary, self.weight = self.canary, arm, 0.0
        if old is not None:
            self._retire(old)

    def _retire(self, arm: Arm) -> None:
        async def retire() -> None:
            if arm.inflight:
                arm._drained = asyncio.Event()
                await arm._drained.wait()
            if arm._lifespan is not None:
                await arm._lifespan.shutdown()
            log.info("retired model version %s", arm.version)

        task = asyncio.get_running_loop().create_task(retire())
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # ---- routing ----------------------------------------------------------------------------------------

    def choose(self, override: str | None, user: str | None) -> tuple[ArmName, Arm]:
        canary = self.canary
        if canary is None:
            return "stable", self.stable
        if override == "always":
            return "canary", canary
        if override == "never":
            return "stable", self.stable
        if self.weight <= 0:
            return "stable", self.stable
        if self.weight >= 100:
            return "canary", canary
        bucket = user_bucket(user) if user else random.random() * 100
        return ("canary", canary) if bucket < self.weight else ("stable", self.stable)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        path: str = scope.get("path", "")
        if path.startswith("/admin/") and self.admin_app is not None:
            await self.admin_app(scope, receive, send)
            return
        if scope["type"] == "http" and path == "/metrics":
            await self._serve_metrics(send)
            return
        if scope["type"] != "http":  # websockets: no canary logic, the stable arm serves them
            await self.stable.app(scope, receive, send)
            return

        start = time.perf_counter()
        override = _header(scope, CANARY_HEADER)
        if override is not None and override not in ("always", "never"):
            await _plain(send, 400, f'header {CANARY_HEADER} must be "always" or "never", got "{override}"')
            return
        user, body = None, None
        canary = self.canary
        by_user = canary is not None and override is None and 0 < self.weight < 100
        for_judge = canary is not None and canary.keeps_prompts and path.endswith("/chat/completions")
        if (by_user or for_judge) and scope.get("method") == "POST":
            received, complete = await _read_body(receive)
            if received is None:  # the client left
                return
            if complete:
                body = b"".join(m.get("body", b"") for m in received)
                user = _user_of(body) if by_user else None
            receive = _replay(received, receive)
        arm_name, arm = self.choose(override, user)
        if body is not None and arm_name == "canary" and path.endswith("/chat/completions"):
            arm.record_prompt(body)  # a sample of the canary's real requests, for the canary judge
        await self._dispatch(arm_name, arm, scope, receive, send, start)

    async def _dispatch(
        self, arm_name: ArmName, arm: Arm, scope: Scope, receive: Receive, send: Send, start: float
    ) -> None:
        status = 500
        ours = [(VERSION_HEADER.encode(), arm.version.encode()), (ARM_HEADER.encode(), arm_name.encode())]
        replaced = {k for k, _ in ours}

        async def wrapped_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in replaced]
                message = {**message, "headers": [*kept, *ours]}
            await send(message)

        token = id(scope)
        arm._started[token] = start
        ok = False
        try:
            await arm.app(scope, receive, wrapped_send)
            ok = status < 500
        finally:
            del arm._started[token]
            elapsed = time.perf_counter() - start
            arm.record(ok, elapsed * 1000)
            self._requests.labels(arm_name, arm.version, "success" if ok else "error").inc()
            self._latency.labels(arm_name, arm.version).observe(elapsed)
            if arm.inflight == 0 and arm._drained is not None:
                arm._drained.set()

    async def _serve_metrics(self, send: Send) -> None:
        body = generate_latest(self.metrics) + generate_latest(REGISTRY)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())]}
        )
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    for arm in (self.stable, self.canary):
                        if arm is not None and arm._lifespan is None:
                            arm._lifespan = _Lifespan(arm.app)
                            await arm._lifespan.startup()
                    for hook in self.on_startup:
                        await hook()
                except Exception as e:
                    log.exception("gateway startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for hook in self.on_shutdown:
                    await hook()
                if self._retiring:
                    await asyncio.gather(*self._retiring, return_exceptions=True)
                for arm in (self.stable, self.canary):
                    if arm is not None and arm._lifespan is not None:
                        await arm._lifespan.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _header(scope: Scope, name: str) -> str | None:
    key = name.encode()
    for k, v in scope.get("headers", []):
        if k.lower() == key:
            return v.decode("latin-1").strip().lower()
    return None


async def _read_body(receive: Receive) -> tuple[list[Message] | None, bool]:
    """The request's body messages as received, up to the whole body or until more than MAX_BODY_BYTES were
    read, and whether that is the whole body. (None, False) when the client disconnected."""
    received: list[Message] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None, False
        received.append(message)
        if not message.get("more_body", False):
            return received, True
        size += len(message.get("body", b""))
        if size > MAX_BODY_BYTES:
            return received, False


def _replay(received: list[Message], receive: Receive) -> Receive:
    """A receive that hands the buffered body messages to the app in order, then passes through (the rest of
    an oversized body, disconnects)."""
    pending = list(reversed(received))

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay


def _user_of(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    user = data.get("user") if isinstance(data, dict) else None
    return user if isinstance(user, str) and user else None


async def _plain(send: Send, status: int, text: str) -> None:
    body = json.dumps({"error": {"message": text, "type": "invalid_request_error"}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
