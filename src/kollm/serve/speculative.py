"""Speculative decoding with prompt-lookup (n-gram) drafts for the native engine's static KV cache.

Public API:
    NgramIndex           where each recent n-gram of a sequence (prompt + output) last occurred, kept incrementally
    Speculator           per-sequence drafting state and the policy that turns drafting off for a sequence
    verify(kv, chunks)   one forward pass over each row's last token + its draft; the greedy token at every position

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
whose drafts are wholly rejected MAX_REJECTED times in a row stops drafting for good.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kollm.serve.kv import StaticKV, greedy, step_outputs
from kollm.serve.prefix import extend_forward

NGRAM_MAX = 3
NGRAM_MIN = 1
DRAFT_TOKENS = 5
MAX_WAIT = 16  # steps between lookups of a sequence whose lookups keep failing
MAX_REJECTED = 4  # wholly rejected drafts in a row after which a sequence stops drafting


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

    def draft(self, seq: object, tokens: Sequence[int], limit: int) -> list[int]:
        """The draft for a sequence whose tokens so far (prompt + output) are `tokens`: at most `limit` tokens."""
        s = self.state(seq)
        if s.wait > 0:
            s.wait -= 1
        if s.off or s.wait > 0 or limit <= 0:
            return []
        s.index.extend(tokens[len(s.index.tokens) :])
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


def verify(kv: StaticKV, drafts: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[list[float]]]:
    """One step for every running row of `kv` (row order) with its draft (possibly empty): each row's next input
    token followed by its draft, at the row's positions. Returns, per row, the tokens it emits (the accepted draft
    tokens and the model's token after them: at least one) and their -log p; the rows' slots move on past them."""
    n = len(kv.active)
    assert len(drafts) == n
    last = kv.tokens[torch.tensor(kv.active, device=kv.device)].tolist()
    chunks = [[tok, *d] for tok, d in zip(last, drafts)]
    starts = list(kv._lengths)
    logits = extend_forward(kv, kv.active, chunks, starts, every=True)  # [n, t, V]
    t = logits.shape[1]
    picks = greedy(logits.flatten(0, 1))
    rows = step_outputs(logits.flatten(0, 1), picks).view(n, t, 2).tolist()
    emitted: list[list[int]] = []
    nlls: list[list[float]] = []
    for d, row in zip(drafts, rows):
        model = [int(tok) for tok, _ in row]
        m = 0
        while m < len(d) and d[m] == model[m]:
            m += 1
        emitted.append(model[: m + 1])  # d[:m] == model[:m], then the model's own token
        nlls.append([nll for _, nll in row[: m + 1]])
    index = torch.tensor(kv.active, device=kv.device)
    kv.tokens[index] = torch.tensor([e[-1] for e in emitted], device=kv.device)
    new_lengths = [start + len(e) for start, e in zip(starts, emitted)]
    kv.pos[index] = torch.tensor(new_lengths, device=kv.device)
    kv._lengths = new_lengths
    return emitted, nlls
