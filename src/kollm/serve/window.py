"""What the gateway keeps of an arm's requests while an analysis window is open (kollm.serve.gateway.Arm), and
what the rollout analysis (kollm.rollout.analysis) reads: one `Sample` per completed request, and a bounded
uniform sample of the chat requests' bodies for the canary judge. Serving defines it; the rollout reads it, so
kollm.serve never imports kollm.rollout."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

MAX_PROMPT_BYTES = 64 * 1024  # a chat request body longer than this is not kept for the judge


@dataclass(frozen=True)
class Sample:
    """One request the canary served."""

    ok: bool
    latency_ms: float


@dataclass
class PromptSample:
    """A reservoir sample of at most `capacity` chat request bodies out of all those seen in the window (each
    request equally likely to be kept, whatever the traffic; memory bounded by capacity x MAX_PROMPT_BYTES)."""

    capacity: int
    seen: int = 0
    bodies: list[bytes] = field(default_factory=list)

    def offer(self, body: bytes) -> None:
        if self.capacity <= 0 or len(body) > MAX_PROMPT_BYTES:
            return
        self.seen += 1
        if len(self.bodies) < self.capacity:
            self.bodies.append(body)
            return
        j = random.randrange(self.seen)
        if j < self.capacity:
            self.bodies[j] = body
