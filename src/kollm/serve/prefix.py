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

A batch that hits the cache is prefilled by `Extender`: with CUDA graphs (StaticKV.cuda_graphs), its tails are
padded to a (rows, tail tokens) bucket (rows 1, 2, 4, ... up to the slots; tails 16, 32, ... up to
EXTEND_TAIL_TOKENS, at most EXTEND_GRAPH_TOKENS rows x tokens), every per-call value (token ids, start positions,
counts, slots) is written into static buffers and the queries attend over the whole cache length (masked), so each
bucket is one CUDA graph, captured at warm-up and replayed; a tail longer than the largest bucket runs as several
replays, chunk after chunk (and where rows x cache length would pass EXTEND_GRAPH_KEYS, rows run in groups).
Without CUDA graphs (CPU) the same padded code runs eagerly where StaticKV is asked to run in its graph shapes,
else extend_forward runs in the batch's exact shapes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from kollm.serve.kv import MIN_PROMPT_BUCKET, StaticKV, _buckets, capture_graph, layer_windows

log = logging.getLogger("kollm.serve")

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
EXTEND_TAIL_TOKENS = 256  # prefix-hit prefill graphs: tails padded to 16, 32, ... this many positions
EXTEND_GRAPH_TOKENS = 2048  # and at most this many padded positions (rows x tail) per graph
EXTEND_GRAPH_KEYS = 1 << 16  # and at most this many key positions (rows x cache length): more rows run in groups


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


class Extender:
    """Prefills prompt tails after cached prefixes in fixed shapes (see the module docstring): (rows, tail tokens)
    buckets whose every input is a buffer on the device, attending over the whole cache length, so on CUDA each
    bucket is a CUDA graph (in a pool of its own) captured by `warm_up`. Rows past the batch's are padding: no
    tokens, writes into the spare slot."""

    def __init__(self, kv: StaticKV):
        self.kv = kv
        tail = min(EXTEND_TAIL_TOKENS, kv.length)
        tails = _buckets(tail, min(MIN_PROMPT_BUCKET, tail))
        rows = min(kv.slots, max(1, EXTEND_GRAPH_KEYS // kv.length))  # each row gathers its slot's whole cache
        self.buckets = [(n, t) for n in _buckets(rows, 1) for t in tails if n * t <= max(EXTEND_GRAPH_TOKENS, tails[0])]
        dev = kv.device
        self.ids = torch.zeros((kv.slots, tail), dtype=torch.long, device=dev)
        self.start = torch.zeros(kv.slots, dtype=torch.long, device=dev)
        self.count = torch.zeros(kv.slots, dtype=torch.long, device=dev)  # tokens fed per row (0: a padding row)
        self.slot = torch.full((kv.slots,), kv.slots, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture = kv.cuda_graphs and dev.type == "cuda"  # else the padded shapes run eagerly
        self.late = 0  # graphs captured after warm-up (on a request's path)
        self._warm = False
        self._pool: Any = None

    def forward(self, n: int, t: int) -> torch.Tensor:
        """Rows [0, n) of the buffers, tokens [0, t): row i feeds count[i] tokens ids[i] at positions start[i], ...
        of slot slot[i], attending to that slot's positions 0..each query's own over the whole cache length; writes
        their keys and values (padding positions into the spare slot) and returns each row's last-token logits
        [n, vocab] (garbage for rows without tokens)."""
        kv = self.kv
        start, count, slot = self.start[:n], self.count[:n], self.slot[:n]
        offs = kv.positions[:t]
        qpos = start[:, None] + offs[None, :]  # [n, t]
        valid = offs[None, :] < count[:, None]
        qpos_c = qpos.clamp(max=kv.length - 1)
        rows = torch.where(valid, slot[:, None], kv.slots).reshape(-1)
        cols = torch.where(valid, qpos_c, 0).reshape(-1)
        # each query sees its slot's past (position 0 at least: a padding query never sees nothing)
        mask = (kv.positions[None, None, :] <= qpos[:, :, None])[:, None]  # [n, 1, t, L]
        ropes = kv._indexed(lambda table: table[qpos_c][:, :, None])  # [n, t, 1, D] per layer

        def attend(i: int, q: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
            cache = kv.kv[i]
            cache[rows, :, :, cols] = new.flatten(0, 1)
            k, v = cache[slot, 0], cache[slot, 1]  # [n, kv_heads, L, D]
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k, v, attn_mask=mask, scale=kv.spec.scale, enable_gqa=kv.groups > 1
            )
            return o.transpose(1, 2).reshape(n, t, -1)

        x = kv._layers(kv.inner.embed_tokens(self.ids[:n, :t]), ropes, attend, kv.spec, slot)  # slot: its adapter
        return kv._head(x[kv.rows[:n], (count - 1).clamp(min=0)])

    def _run(self, n: int, t: int) -> torch.Tensor:
        if not self.capture:
            return self.forward(n, t)
        entry = self.graphs.get((n, t))
        if entry is None:
            try:  # the warm-up run makes the same writes as the graph's
                run = partial(self.forward, n, t)
                self._pool, graph, out = capture_graph(run, run, self.kv.device, self._pool)
            except Exception as e:  # noqa: BLE001 - a capture that fails: run the padded shapes eagerly from now on
                log.warning(
                    "capturing the prefix-cache prefill failed (%s: %s); running it eagerly", type(e).__name__, e
                )
                self.capture = False
                self.graphs.clear()
                return self.forward(n, t)
            entry = self.graphs[(n, t)] = (graph, out)
            self.late += self._warm
        entry[0].replay()
        return entry[1]

    def warm_up(self) -> None:
        """Capture every bucket's graph now (nothing is written but the spare slot), before a request needs one."""
        if not self.capture:
            return
        started = time.perf_counter()
        self.count.zero_()
        self.slot.fill_(self.kv.slots)
        for n, t in self.buckets:
            self._run(n, t)
        self._warm = True
        log.info("captured %d prefix-cache prefill graphs in %.1fs", len(self.graphs), time.perf_counter() - started)

    def extend(self, slots: Sequence[int], chunks: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
        """As extend_forward(kv, slots, chunks, starts, every=False), in the buckets' shapes: each row's last-token
        logits [len(chunks), vocab]. A tail longer than the bucket runs in several passes, chunk after chunk; more
        rows than the largest bucket holds run in groups."""
        most = self.buckets[-1][0]
        if len(chunks) <= most:
            return self._extend(slots, chunks, starts)
        groups = [
            self._extend(slots[i : i + most], chunks[i : i + most], starts[i : i + most]).clone()
            for i in range(0, len(chunks), most)
        ]
        return torch.cat(groups)

    def _extend(self, slots: Sequence[int], chunks: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
        kv, m = self.kv, len(chunks)
        n = next(b for b, _ in self.buckets if b >= m)
        tails = [t for b, t in self.buckets if b == n]
        left = [list(c) for c in chunks]
        at = list(starts)
        out: torch.Tensor | None = None
        while True:
            longest = max(len(c) for c in left)
            t = next((t for t in tails if t >= longest), tails[-1])
            ids = torch.zeros((n, self.ids.shape[1]), dtype=torch.long)
            for i, c in enumerate(left):
                ids[i, : min(len(c), t)] = torch.tensor(c[:t], dtype=torch.long)
            fed = [min(len(c), t) for c in left]
            self.ids[:n] = kv._on_device(ids)
            self.start[:n] = kv._on_device(at + [0] * (n - m))
            self.count[:n] = kv._on_device(fed + [0] * (n - m))
            self.slot[:n] = kv._on_device(list(slots) + [kv.slots] * (n - m))
            logits = self._run(n, t)[:m]
            if self.capture and out is None and longest > t:
                logits = logits.clone()  # the next replay overwrites the graph's output
            # a row's logits come from the pass that fed its last token
            done = torch.tensor([f > 0 and f == len(c) for f, c in zip(fed, left)])
            out = logits if out is None else torch.where(kv._on_device(done.long())[:, None] > 0, logits, out)
            left = [c[t:] for c in left]
            at = [s + f for s, f in zip(at, fed)]
            if not any(left):
                return out


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
        self.extender: Extender | None = None  # the prefill of prompts that hit the cache, in CUDA graphs' shapes
        if kv.cuda_graphs:
            self.extender = Extender(kv)

    def warm_up(self) -> None:
        """Capture the graphs of prefilling prompt tails after cached prefixes (on CUDA; see Extender)."""
        if self.extender is not None:
            self.extender.warm_up()

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
            tails = [p[s:] for p, s in zip(prompts, starts)]
            if kv.cuda_graphs:
                if self.extender is None or self.extender.kv is not kv:
                    self.extender = Extender(kv)
                logits = self.extender.extend(slots, tails, starts)
            else:
                logits = extend_forward(kv, slots, tails, starts, every=False)
            handle = (slots, [len(p) for p in prompts])
            self.hit_tokens += sum(starts)
        self.store_all(kv, handle[0], prompts, adapters)
        return handle, logits
