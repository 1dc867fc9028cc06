"""Base models and tokenizers: a hub name or local folder, or `scratch` (a byte-level BPE tokenizer trained on
the prepared corpus and a small Llama-shaped model), plus LoRA / QLoRA wrapping.

The scratch model is the embedded default that lets the quickstart run on a laptop CPU in minutes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kollm.errors import ConfigError, StepFailed
from kollm.train.config import PRESETS
from kollm.train.kernels import causal_lm

log = logging.getLogger("kollm.train")

# Korean-friendly ChatML template. The default system prompt is Korean; a system message replaces it.
DEFAULT_SYSTEM_PROMPT = "당신은 정확하고 친절한 한국어 AI 어시스턴트입니다."
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set system = '" + DEFAULT_SYSTEM_PROMPT + "' -%}{%- set rest = messages -%}{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}"
    "{%- for m in rest -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
BOS_EOS = "<|endoftext|>"
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [BOS_EOS, IM_START, IM_END, PAD]


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (NFC-normalized, so Hangul is always composed) with kollm's chat template."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    # The template's own words get merges too, so a chat turn header is a few tokens, not one per byte.
    header = ["system\n", "user\n", "assistant\n", DEFAULT_SYSTEM_PROMPT] * 8
    tok.train_from_iterator(_chain(header, texts), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_EOS,
        eos_token=BOS_EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )


def _chain(*parts: Iterable[str]) -> Iterable[str]:
    for part in parts:
        yield from part


def scratch_model(
    preset: str, tokenizer: Any, *, seed: int, attn_implementation: str, architecture: str | None = None
) -> torch.nn.Module:
    """A freshly initialised causal LM sized by `preset`, matching `tokenizer`'s vocabulary: a LlamaForCausalLM, or
    with `architecture` one of kollm.train.architectures."""
    from transformers import LlamaConfig, LlamaForCausalLM

    p = PRESETS[preset]
    if architecture is not None:
        from kollm.train.architectures import build_model

        return build_model(
            architecture,
            tokenizer,
            seed=seed,
            attn_implementation=attn_implementation,
            hidden=p.hidden,
            layers=p.layers,
            heads=p.heads,
            kv_heads=p.kv_heads,
            intermediate=p.intermediate,
            max_positions=p.max_positions,
            tied=p.tied,
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden,
        intermediate_size=p.intermediate,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        max_position_embeddings=p.max_positions,
        tie_word_embeddings=p.tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def load_pretrained(
    source: str, *, attn_implementation: str, quantize: str | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, Any]:
    """A causal LM and its tokenizer from a hub name or a local folder (a previous step's Model artifact)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    if quantize:
        kwargs["quantization_config"] = _bnb_config(quantize)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
        kwargs["dtype"] = torch.bfloat16
    elif dtype is not None:
        kwargs["dtype"] = dtype
    from kollm.adapter import is_adapter, load_causal_lm

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if is_adapter(Path(source)):  # a previous LoRA step's adapter: merged into its base at load
            if quantize:
                raise ConfigError(
                    f"lora.quantize: the base {source} is a LoRA adapter; QLoRA needs a plain model folder "
                    "(train the previous step with lora.merge: true)"
                )
            model = load_causal_lm(Path(source), **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise ConfigError(
            f"base_model: cannot load '{source}': {str(e).splitlines()[0]}",
        ) from None
    return model, tokenizer


def _bnb_config(quantize: str) -> Any:
    if not torch.cuda.is_available():
        raise ConfigError(
            f"lora.quantize: {quantize} (QLoRA) needs a CUDA GPU (bitsandbytes); this machine has none. "
            "Remove lora.quantize to train plain LoRA on CPU, or run the step with resources.gpus >= 1 on a GPU host."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"lora.quantize: {quantize} needs the bitsandbytes package; run `pip install bitsandbytes`"
        ) from None
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def ensure_chat_template(model: torch.nn.Module, tokenizer: Any, chat_template: str | None) -> None:
    """Give the tokenizer a chat template: the configured one, else its own, else kollm's ChatML template.

    kollm's template needs <|im_start|> and <|im_end|>; they are added (and the embeddings resized) when missing.
    """
    if chat_template:
        path = Path(chat_template)
        tokenizer.chat_template = (
            path.read_text(encoding="utf-8") if path.suffix == ".jinja" and path.exists() else chat_template
        )
    elif not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    if IM_START in (tokenizer.chat_template or ""):
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IM_START, IM_END) if t not in vocab]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing})
            causal_lm(model).resize_token_embeddings(len(tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant reply: eos, and the end-of-turn marker the chat template uses (<|im_end|>,
    Llama 3's <|eot_id|>, Gemma's <end_of_turn>, EXAONE's [|endofturn|]) when the vocabulary has it."""
    from kollm.train.architectures import END_OF_TURN_MARKERS

    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN_MARKERS:
        if marker in vocab and marker in (tokenizer.chat_template or "") and vocab[marker] not in ids:
            ids.append(vocab[marker])
    return ids


def apply_lora(
    model: torch.nn.Module, *, r: int, alpha: int, dropout: float, target_modules: list[str] | str, quantized: bool
) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM", bias="none"
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules: {e}") from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise StepFailed(f"unknown scratch preset '{preset}'; use one of {', '.join(PRESETS)}")
