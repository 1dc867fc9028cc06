"""Speculative decoding with prompt-lookup (n-gram) drafts for the native engine's static KV cache.

Public API:
    NgramIndex           where each recent n-gram of a sequence (prompt + output) last occurred, kept incrementally
    Speculator           per-sequence drafting state and the policy that turns drafting off for a sequence
    DraftModel           drafts from a small model of the same tokenizer (its own StaticKV, kept in step lazily)
    Verifier             the step that feeds every row its next token and its draft and takes the greedy token at
                         each position (a CUDA graph per batch and length bucket on CUDA)

How (as prompt lookup decoding / vLLM's `ngram` method): the last n tokens (n = NGRAM_MAX down to NGRAM_MIN) of a
sequence are looked up in its prompt and output; where they occurred before, the DRAFT_TOKENS tokens that followed
are the draft. One step feeds every row its last token and its draft (StaticKV positions L, L+1, ...), and takes
the model's greedy token at each position: draft token j is accepted while it equals the model's token at the
position before it, and the model's token after the last accepted one comes for free. The slot's length is then
set past the accepted tokens only: rejected positions hold stale keys and values that later steps overwrite before
they attend to them. Greedy outputs are therefore those of decoding one token at a time (up to floating-point
effects of the different shapes). Drafting applies to greedy requests without penalties, bias, grammar or logprobs;
while any running request samples (or has those), the batch decodes one token per step.

Turning itself off: a sequence whose lookup finds nothing waits 1, 3, 7, ... up to MAX_WAIT steps before looking again
(a lookup needs the previous step's tokens on the host, which stops the one-step-ahead launch for that step); one
whose drafts are wholly rejected MAX_REJECTED times in a row stops drafting for good. And for the whole batch, by
time: the engine reports each plain decode step's wall time and each verify step's (lookup, verification and
handing out the tokens) with the tokens it emitted per row; every JUDGE_STEPS verify steps, when verifying took
longer per emitted token than a plain decode step (a moving average), nothing drafts for a cool-down of COOL_DOWN
plain decode steps (doubled after each judgement that verifying still does not pay, up to MAX_COOL_DOWN), then
drafting is probed again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from kollm.serve.kv import (
    MIN_LENGTH_BUCKET,
    StaticKV,
    _bucket,
    _buckets,
    capture_graph,
    greedy,
    step_outputs,
)
from kollm.serve.prefix import extend_forward

log = logging.getLogger("kollm.serve")

NGRAM_MAX = 3
NGRAM_MIN = 1
DRAFT_TOKENS = 5
MAX_WAIT = 16  # steps between lookups of a sequence whose lookups keep failing
MAX_REJECTED = 4  # wholly rejected drafts in a row after which a sequence stops drafting
JUDGE_STEPS = 4  # verify steps timed per judgement of whether verifying pays
DECODE_SAMPLES = 4  # plain decode steps timed first when a judgement finds none timed yet
COOL_DOWN = 128  # plain decode steps without drafting after verifying did not pay (doubled while it keeps not paying)
MAX_COOL_DOWN = 4096


class NgramIndex:
    """For n in [NGRAM_MIN, NGRAM_MAX]: each n-gram of `tokens` (except one ending at the last token) -> the
    position right after its latest occurrence. `extend` adds tokens; `draft(k)` proposes up to k tokens."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.after: dict[tuple[int, ...], int] = {}

    def extend(self, new: Sequence[int]) -> None:
        for token in new:
            end = len(self.tokens)  # n-grams ending at the current last token now have a continuation: `token`
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end >= n:
                    self.after[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def draft(self, k: int) -> list[int]:
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if len(self.tokens) < n:
                continue
            at = self.after.get(tuple(self.tokens[-n:]))
            if at is not None:
                return self.tokens[at : at + k]
        return []


@dataclass
class _State:
    index: NgramIndex = field(default_factory=NgramIndex)
    wait: int = 0  # steps before the next lookup
    misses: int = 0  # lookups in a row that found nothing
    rejected: int = 0  # drafts in a row wholly rejected
    off: bool = False
    proposed: int = 0
    accepted: int = 0


class Speculator:
    """Per-sequence drafting state, keyed by the engine's sequence objects (see the module docstring)."""

    def __init__(self, draft_tokens: int = DRAFT_TOKENS):
        self.draft_tokens = draft_tokens
        self.states: dict[object, _State] = {}
        self.proposed = 0  # draft tokens proposed, all sequences
        self.accepted = 0  # of them accepted
        self.steps = 0  # steps that verified drafts
        # the policy by time (see the module docstring)
        self.decode_time: float | None = None  # moving average of a plain decode step, seconds
        self.window = [0, 0.0, 0.0]  # since the last judgement: verify steps, their seconds, tokens emitted per row
        self.cool_down = 0  # plain decode steps left without drafting
        self.next_cool_down = COOL_DOWN
        self.pauses = 0  # cool-downs started

    def drafting(self) -> bool:
        """False during a cool-down (verifying did not pay)."""
        return self.cool_down == 0

    def observe_decode(self, seconds: float) -> None:
        """A plain decode step (one token per row) took `seconds`."""
        self.decode_time = seconds if self.decode_time is None else 0.8 * self.decode_time + 0.2 * seconds
        self.cool_down = max(self.cool_down - 1, 0)

    def observe_verify(self, seconds: float, emitted: float) -> None:
        """A verify step took `seconds` and emitted `emitted` tokens per row (on average); every JUDGE_STEPS such
        steps, start a cool-down when they cost more per emitted token than a plain decode step."""
        w = self.window
        w[0], w[1], w[2] = w[0] + 1, w[1] + seconds, w[2] + emitted
        if w[0] < JUDGE_STEPS:
            return
        self.window = [0, 0.0, 0.0]
        if self.decode_time is None:  # nothing to compare with: time a few plain steps first
            self.cool_down = DECODE_SAMPLES
            return
        per_token = w[1] / max(w[2], 1e-9)
        if per_token > self.decode_time:
            log.info(
                "speculation: %.2f ms per emitted token verifying vs %.2f ms decoding; not drafting for %d steps",
                1e3 * per_token,
                1e3 * self.decode_time,
                self.next_cool_down,
            )
            self.cool_down = self.next_cool_down
            self.next_cool_down = min(2 * self.next_cool_down, MAX_COOL_DOWN)
            self.pauses += 1
        else:
            self.next_cool_down = COOL_DOWN

    def state(self, seq: object) -> _State:
        s = self.states.get(seq)
        if s is None:
            s = self.states[seq] = _State()
        return s

    def due(self, seq: object) -> bool:
        s = self.state(seq)
        return not s.off and s.wait <= 1

    def tick(self, seqs: Sequence[object]) -> None:
        """One step decoded without a lookup."""
        for seq in seqs:
            s = self.state(seq)
            s.wait = max(s.wait - 1, 0)

    def draft(self, seq: object, prompt: Sequence[int], output: Sequence[int], limit: int) -> list[int]:
        """The draft for a sequence of these prompt and output tokens so far: at most `limit` tokens."""
        s = self.state(seq)
        if s.wait > 0:
            s.wait -= 1
        if s.off or s.wait > 0 or limit <= 0:
            return []
        seen = len(s.index.tokens)  # the index has the first `seen` tokens of prompt + output already
        if seen < len(prompt):
            s.index.extend(prompt[seen:])
            seen = len(prompt)
        s.index.extend(output[seen - len(prompt) :])
        out = s.index.draft(min(self.draft_tokens, limit))
        if not out:
            s.misses += 1
            s.wait = min(2**s.misses, MAX_WAIT)
        else:
            s.misses = 0
        return out

    def record(self, seq: object, proposed: int, accepted: int) -> None:
        if not proposed:
            return
        s = self.state(seq)
        s.proposed += proposed
        s.accepted += accepted
        self.proposed += proposed
        self.accepted += accepted
        s.rejected = s.rejected + 1 if accepted == 0 else 0
        if s.rejected >= MAX_REJECTED:
            s.off = True

    def forget(self, keep: Sequence[object]) -> None:
        kept = set(map(id, keep))
        self.states = {seq: s for seq, s in self.states.items() if id(seq) in kept}


class Verifier:
    """The step that verifies drafts: every row of the batch bucket (slots [0, n)) feeds its next token and up to
    `tokens - 1` draft tokens (from `draft` / `count`, buffers on the device) at its positions pos, pos+1, ...
    Every shape depends only on (n, n_len), every value is read from buffers, so on CUDA each (batch bucket,
    length bucket) is captured once as a CUDA graph (in a pool of its own) and replayed; where capturing fails it
    runs eagerly. On CPU it runs eagerly."""

    def __init__(self, kv: StaticKV, tokens: int = DRAFT_TOKENS + 1):
        self.kv, self.t = kv, tokens
        self.draft = torch.zeros((kv.slots, tokens - 1), dtype=torch.long, device=kv.device)
        self.count = torch.ones(kv.slots, dtype=torch.long, device=kv.device)  # tokens fed per slot (1: no draft)
        self.length_buckets = _buckets(kv.length, min(MIN_LENGTH_BUCKET, kv.length))
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.eager = not kv.cuda_graphs or kv.device.type != "cuda"
        self.late = 0  # graphs captured after warm-up (on a request's path)
        self._warm = False
        self._pool: Any = None

    def warm_up(self) -> None:
        """Capture every (batch bucket, length bucket) graph now, before a request needs one (on CUDA; with no row
        live, every write goes to the spare slot)."""
        if self.eager:
            return
        started = time.perf_counter()
        self.count.fill_(1)
        for n in self.kv.batch_buckets:
            for n_len in self.length_buckets:
                self._run(n, n_len)
        self._warm = True
        log.info("captured %d draft verification graphs in %.1fs", len(self.graphs), time.perf_counter() - started)

    def forward(self, n: int, n_len: int) -> torch.Tensor:
        """`step_outputs` of the greedy token at every fed position: [n, tokens, 2] (garbage past a row's count
        and for free slots, whose writes go to the spare slot)."""
        kv, t = self.kv, self.t
        offs = kv.positions[:t]
        qpos = kv.pos[:n, None] + offs[None, :]  # [n, t]
        valid = (offs[None, :] < self.count[:n, None]) & (kv.live[:n, None] > 0)
        qpos_c = qpos.clamp(max=kv.length - 1)
        rows = torch.where(valid, kv.rows[:n, None], kv.slots).reshape(-1)
        cols = torch.where(valid, qpos_c, 0).reshape(-1)
        mask = (kv.positions[:n_len][None, None, :] <= qpos[:, :, None])[:, None]  # [n, 1, t, n_len]
        ropes = kv._indexed(lambda table: table[qpos_c][:, :, None])  # [n, t, 1, D] per layer

        def attend(i: int, q: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            cache = kv.kv[i]
            cache[rows, :, :, cols] = new.flatten(0, 1)
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                cache[:n, 0, :, :n_len],
                cache[:n, 1, :, :n_len],
                attn_mask=mask,
                scale=kv.spec.scale,
                enable_gqa=kv.groups > 1,
            )
            return o.transpose(1, 2).reshape(n, t, -1)

        ids = torch.cat([kv.tokens[:n, None], self.draft[:n]], dim=1)
        x = kv._layers(kv.inner.embed_tokens(ids), ropes, attend, kv.spec)
        logits = kv._head(x).flatten(0, 1)
        return step_outputs(logits, greedy(logits)).view(n, t, 2)

    def _run(self, n: int, n_len: int) -> torch.Tensor:
        if self.eager:
            return self.forward(n, n_len)
        entry = self.graphs.get((n, n_len))
        if entry is None:
            try:  # the warm-up run makes the same writes as the graph's
                run = partial(self.forward, n, n_len)
                self._pool, graph, out = capture_graph(run, run, self.kv.device, self._pool)
                entry = self.graphs[(n, n_len)] = (graph, out)
                self.late += self._warm
            except Exception as e:  # noqa: BLE001 - a capture that fails: verify eagerly from now on
                log.warning(
                    "capturing the draft verification step failed (%s: %s); running it eagerly", type(e).__name__, e
                )
                self.eager = True
                return self.forward(n, n_len)
        entry[0].replay()
        return entry[1]

    def step(self, drafts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[list[float]]]:
        """One step for every running row (row order) with its draft (possibly empty, at most tokens - 1 long).
        Returns, per row, the tokens it emits (the accepted draft tokens and the model's token after them: at
        least one) and their -log p; each row's slot moves on past them (rejected positions are left stale)."""
        kv = self.kv
        assert len(drafts) == len(kv.active)
        n = _bucket(kv.batch_buckets, max(kv.active) + 1)
        longest = max(length + len(d) + 1 for length, d in zip(kv._lengths, drafts))
        n_len = _bucket(self.length_buckets, longest)
        host = torch.zeros((len(drafts), self.t - 1), dtype=torch.long)
        for i, d in enumerate(drafts):
            host[i, : len(d)] = torch.tensor(list(d), dtype=torch.long)
        index = kv._on_device(kv.active)
        self.count.fill_(1)
        self.draft[index] = kv._on_device(host)
        self.count[index] = kv._on_device([len(d) + 1 for d in drafts])
        outputs = self._run(n, n_len).tolist()
        emitted: list[list[int]] = []
        nlls: list[list[float]] = []
        for slot, d in zip(kv.active, drafts):
            row = outputs[slot]
            model = [int(tok) for tok, _ in row]
            m = 0
            while m < len(d) and d[m] == model[m]:
                m += 1
            emitted.append(model[: m + 1])  # d[:m] == model[:m], then the model's own token
            nlls.append([nll for _, nll in row[: m + 1]])
        kv.tokens[index] = kv._on_device([e[-1] for e in emitted])
        kv._lengths = [length + len(e) for length, e in zip(kv._lengths, emitted)]
        kv.pos[index] = kv._on_device(kv._lengths)
        return emitted, nlls


class DraftModel:
    """Drafts from a small model of the same tokenizer (`--speculative draft --draft-model PATH`): its own StaticKV
    (one slot per engine slot, run eagerly and uncompiled), kept in step with each sequence lazily. At each drafting step every
    row feeds the tokens its draft cache lacks (at a sequence's first step, its whole prompt), then `tokens - 1`
    more greedy steps give the draft. After verification, the draft cache stays valid up to the accepted tokens."""

    def __init__(self, model: Any, *, slots: int, context_length: int, tokens: int = DRAFT_TOKENS):
        # uncompiled: its shapes change from call to call, and nothing may compile on a request's path
        self.kv = StaticKV(model, slots=slots, context_length=context_length, cuda_graphs=False, compile_pieces=False)
        self.k = tokens
        self.owner: list[object | None] = [None] * slots  # the sequence each slot's draft cache belongs to
        self.synced = [0] * slots  # its valid positions

    def drafts(
        self, slots: Sequence[int], seqs: Sequence[object], tokens: Sequence[Sequence[int]], limits: Sequence[int]
    ) -> list[list[int]]:
        """Up to min(k, limit) draft tokens per row (slot, sequence, its tokens so far: prompt + output)."""
        for slot, seq in zip(slots, seqs):
            if self.owner[slot] is not seq:
                self.owner[slot], self.synced[slot] = seq, 0
        want = [min(self.k, limit) for limit in limits]
        out: list[list[int]] = [[] for _ in slots]
        rows = [i for i, w in enumerate(want) if w > 0]
        if not rows:
            return out
        chunks = [list(tokens[i][self.synced[slots[i]] :]) for i in rows]
        starts = [self.synced[slots[i]] for i in rows]
        where = [slots[i] for i in rows]
        for step in range(max(want[i] for i in rows)):
            logits = extend_forward(self.kv, where, chunks, starts, every=False)
            picks = greedy(logits).tolist()
            for j, i in enumerate(rows):
                if step < want[i]:
                    out[i].append(int(picks[j]))
            starts = [s + len(c) for s, c in zip(starts, chunks)]
            chunks = [[int(p)] for p in picks]
        for i in rows:  # what the draft cache holds: the tokens so far, and the draft tokens fed back
            self.synced[slots[i]] = len(tokens[i]) + len(out[i]) - 1
        return out

    def accepted(self, slot: int, known: int, drafted: int, accepted: int) -> None:
        """After verification: the slot's draft cache is valid for the `known` tokens it had before the draft
        and the accepted draft tokens it was fed (the last draft token never was)."""
        self.synced[slot] = min(self.synced[slot], known + min(accepted, max(drafted - 1, 0)))
