"""Prefix caching for the native engine's static KV cache: prompts that share a prefix share its keys and values.

Public API:
    PrefixCache          blocks of BLOCK_TOKENS prompt positions' keys and values, keyed by a chained hash of their
                         tokens, reused across requests and evicted least-recently-used under a token cap
    extend_forward(kv, slots, chunks, starts, every)   run token chunks that continue each slot's cached positions

How: StaticKV keeps one cache slot per running row. When a prompt is prefilled, each of its full blocks (tokens
[j*B, (j+1)*B)) is copied from the row's slot into a preallocated pool (one tensor per layer), keyed by
hash((key of block j-1, adapter, the block's tokens)): a block's key covers every token before it and the LoRA
adapter that computed it (None: the base model), so two prompts share block j only when they agree on everything
up to its end. A new prompt looks up its longest chain of cached blocks (at most up to its second-to-last token,
so at least one token is prefilled and gives the first logits), copies them into its slot and prefills only the
rest (`extend_forward`: queries at positions start.. attending to the slot's positions 0..their own). A hash
collision cannot mix prompts up: each block keeps its tokens and its parent's key, and both are compared.
A batch in which no prompt hits the cache is prefilled by StaticKV's own prefill (its CUDA graphs), unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kollm.serve.kv import StaticKV, layer_windows

BLOCK_TOKENS = 16  # positions per cached block
# the model types whose attention extend_forward (and speculative.Verifier) compute exactly: full causal attention,
# no sliding window or logit soft-capping (a family StaticKV gains later needs its own masks here first)
EXTEND_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def extend_unsupported(config: Any) -> str | None:
    """Why extend_forward (and speculative.Verifier) cannot compute this model's attention exactly, or None."""
    model_type = getattr(config, "model_type", None)
    if model_type not in EXTEND_MODEL_TYPES:
        return f"model type {model_type!r} (they serve {', '.join(EXTEND_MODEL_TYPES)})"
    if any(w is not None for w in layer_windows(config)):
        return f"sliding-window attention ({model_type} with sliding_window set)"
    return None


DEFAULT_CACHE_TOKENS = 16384  # the pool's size when none is given (a 6.6B GQA model: ~2 GiB in bf16)


def extend_forward(
    kv: StaticKV, slots: Sequence[int], chunks: Sequence[Sequence[int]], starts: Sequence[int], every: bool
) -> torch.Tensor:
    """Run chunk i's tokens at positions starts[i], starts[i]+1, ... of slot slots[i], whose positions before
    starts[i] already hold valid keys and values: writes the chunk's keys and values there and returns the logits
    of each chunk's last token [n, vocab], or with `every` of every position [n, max chunk length, vocab] (padding
    positions past a chunk's end are garbage). Padding writes go to the spare slot. Runs eagerly (no CUDA graph)."""
    n, t = len(chunks), max(len(c) for c in chunks)
    dev = kv.device
    ids = torch.zeros((n, t), dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
    ids = kv._on_device(ids)  # small copies that do not wait for a decode step launched ahead
    start = kv._on_device(list(starts))
    count = kv._on_device([len(c) for c in chunks])
    slot = kv._on_device(list(slots))
    offs = torch.arange(t, device=dev)
    qpos = start[:, None] + offs[None, :]  # [n, t]
    valid = offs[None, :] < count[:, None]
    qpos_c = qpos.clamp(max=kv.length - 1)
    rows = torch.where(valid, slot[:, None], kv.slots).reshape(-1)
    cols = torch.where(valid, qpos_c, 0).reshape(-1)
    lk = max(s + len(c) for s, c in zip(starts, chunks))
    kpos = kv.positions[:lk]
    mask = (kpos[None, None, :] <= qpos[:, :, None])[:, None]  # [n, 1, t, lk]: each query sees its past
    ropes = kv._indexed(lambda table: table[qpos_c][:, :, None])  # [n, t, 1, D] per layer

    def attend(i: int, q: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        cache = kv.kv[i]
        cache[rows, :, :, cols] = new.flatten(0, 1)
        k, v = cache[slot, 0, :, :lk], cache[slot, 1, :, :lk]  # [n, kv_heads, lk, D]
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask, scale=kv.spec.scale, enable_gqa=kv.groups > 1
        )
        return o.transpose(1, 2).reshape(n, t, -1)

    x = kv._layers(kv.inner.embed_tokens(ids), ropes, attend, kv.spec, slot)
    if every:
        return kv._head(x)
    return kv._head(x[torch.arange(n, device=dev), count - 1])


@dataclass
class _Block:
    index: int  # its row in the pool
    parent: int | None  # the key of the block before it (None: the first block)
    tokens: tuple[int, ...]


class PrefixCache:
    """A pool of `tokens // block` blocks beside a StaticKV (see the module docstring). Used by the engine's
    worker thread only. `hit_tokens` counts the prompt tokens whose keys and values came from the cache."""

    def __init__(self, kv: StaticKV, *, tokens: int = DEFAULT_CACHE_TOKENS, block: int = BLOCK_TOKENS):
        if tokens < block:
            raise ValueError(f"prefix cache of {tokens} tokens: give at least one block ({block} tokens)")
        self.block = block
        self.capacity = tokens // block
        shape = (self.capacity, 2, kv.kv_heads, block, kv.head_dim)
        self.pool = [torch.zeros(shape, dtype=kv.dtype, device=kv.device) for _ in kv.layers]
        self.blocks: OrderedDict[int, _Block] = OrderedDict()  # least recently used first
        self.free = list(range(self.capacity))
        self.hit_tokens = 0
        self.evicted = 0

    def _key(self, parent: int | None, adapter: str | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, adapter, tokens))

    def lookup(self, prompt: Sequence[int], adapter: str | None = None) -> list[int]:
        """The pool rows of the longest chain of cached blocks starting the prompt and ending before its last
        token (marked as just used)."""
        out: list[int] = []
        parent: int | None = None
        for j in range((len(prompt) - 1) // self.block):
            tokens = tuple(prompt[j * self.block : (j + 1) * self.block])
            key = self._key(parent, adapter, tokens)
            entry = self.blocks.get(key)
            if entry is None or entry.parent != parent or entry.tokens != tokens:
                break
            self.blocks.move_to_end(key)
            out.append(entry.index)
            parent = key
        return out

    def cached(self, prompt: Sequence[int], adapter: str | None = None) -> int:
        """How many of the prompt's tokens a prefill now would take from the cache (the LRU order is untouched)."""
        parent: int | None = None
        n = 0
        for j in range((len(prompt) - 1) // self.block):
            tokens = tuple(prompt[j * self.block : (j + 1) * self.block])
            key = self._key(parent, adapter, tokens)
            entry = self.blocks.get(key)
            if entry is None or entry.parent != parent or entry.tokens != tokens:
                break
            n += self.block
            parent = key
        return n

    def _take(self) -> int:
        if not self.free:
            _, old = self.blocks.popitem(last=False)
            self.free.append(old.index)
            self.evicted += 1
        return self.free.pop()

    def store(self, kv: StaticKV, slot: int, prompt: Sequence[int], adapter: str | None = None) -> None:
        """Copy the prompt's full blocks that are not cached yet from the slot into the pool."""
        self.store_all(kv, [slot], [prompt], [adapter])

    def store_all(
        self, kv: StaticKV, slots: Sequence[int], prompts: Sequence[Sequence[int]], adapters: Sequence[str | None]
    ) -> None:
        """Copy the prompts' full blocks that are not cached yet from their slots into the pool: one gather and
        one scatter per layer for them all, at most the pool's capacity of new blocks (so none evicts another)."""
        new: list[tuple[int, int, int]] = []  # (slot, block number, pool row)
        for slot, prompt, adapter in zip(slots, prompts, adapters):
            parent: int | None = None
            for j in range(len(prompt) // self.block):
                tokens = tuple(prompt[j * self.block : (j + 1) * self.block])
                key = self._key(parent, adapter, tokens)
                entry = self.blocks.get(key)
                if entry is None or entry.parent != parent or entry.tokens != tokens:
                    if len(new) == self.capacity:
                        break
                    entry = _Block(self._take(), parent, tokens)
                    self.blocks[key] = entry
                    new.append((slot, j, entry.index))
                self.blocks.move_to_end(key)
                parent = key
        if not new:
            return
        source = kv._on_device([slot for slot, _, _ in new])[:, None]
        pos = kv._on_device(torch.tensor([[j * self.block + i for i in range(self.block)] for _, j, _ in new]))
        rows = kv._on_device([r for _, _, r in new])
        for cache, pool in zip(kv.kv, self.pool):
            pool[rows] = cache[source, :, :, pos].permute(0, 2, 3, 1, 4)  # [nb, B, 2, kvh, D] -> [nb, 2, kvh, B, D]

    def load(self, kv: StaticKV, slot: int, rows: list[int]) -> None:
        """Copy cached blocks (pool rows, in prompt order) into positions 0.. of the slot."""
        index = kv._on_device(rows)
        n = len(rows) * self.block
        for cache, pool in zip(kv.kv, self.pool):
            cache[slot, :, :, :n] = pool[index].permute(1, 2, 0, 3, 4).reshape(2, kv.kv_heads, n, kv.head_dim)

    def prefill(
        self, kv: StaticKV, prompts: list[list[int]], adapters: Sequence[str | None] | None = None
    ) -> tuple[Any, torch.Tensor]:
        """StaticKV.prefill with the cached blocks reused: the same (handle, last-token logits)."""
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        hits = [self.lookup(p, a) for p, a in zip(prompts, adapters)]
        if not any(hits):
            handle, logits = kv.prefill(prompts)
        else:
            if max(len(p) for p in prompts) > kv.length:
                raise ValueError(f"a prompt is longer than the cache ({kv.length} positions)")
            slots = kv._free(len(prompts))
            kv.bind_adapters(slots)
            starts = [len(h) * self.block for h in hits]
            for slot, rows in zip(slots, hits):
                if rows:
                    self.load(kv, slot, rows)
            logits = extend_forward(kv, slots, [p[s:] for p, s in zip(prompts, starts)], starts, every=False)
            handle = (slots, [len(p) for p in prompts])
            self.hit_tokens += sum(starts)
        self.store_all(kv, handle[0], prompts, adapters)
        return handle, logits
