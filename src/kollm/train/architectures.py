"""The architectures of the released Korean base models, as configs kollm builds itself: for `base_model: scratch`
with `architecture:`, and for tests and experiments that need a small random model of one (`build_folder`).

Public API:
    ARCHITECTURES                    llama (Kanana, Midm), qwen2, qwen3 (A.X), mistral, gemma3 (text), exaone4
    model_config(architecture, ...)  a transformers config of that architecture (its own config class)
    family_tokens(architecture)      its chat format: special tokens, eos, pad and Jinja chat template
    train_tokenizer(texts, vocab_size, architecture)   a byte-level BPE tokenizer with that family's chat format
    build_folder(path, architecture, texts, ...)       a random model and its tokenizer saved as a Hugging Face folder

Chat formats (shortened from the released models' templates, same markers): Qwen's ChatML with Hermes-style tools
(`<|im_start|>`, `<tool_call>`), Llama 3's headers (`<|start_header_id|>`, `<|eot_id|>`), Gemma's turns
(`<start_of_turn>model`, the system prompt folded into the first user turn), EXAONE's `[|system|]` / `[|user|]` /
`[|assistant|]` ending in `[|endofturn|]`, Mistral's `[INST]` with `[SYSTEM_PROMPT]`. Every template renders earlier
turns unchanged when turns are added (what kollm needs to find assistant tokens; Mistral's older templates move the
system prompt to the last user turn, this one keeps it first, as Mistral's newer ones).

Nothing is downloaded: the tokenizer is trained on `texts` with the `tokenizers` library.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Architecture = Literal["llama", "qwen2", "qwen3", "mistral", "gemma3", "exaone4"]
ARCHITECTURES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "exaone4")


@dataclass(frozen=True)
class Family:
    special: tuple[str, ...]  # added as special tokens, in this order (ids 0, 1, ...)
    bos: str | None
    eos: str
    pad: str
    template: str


_QWEN = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' and loop.first %}"
    "{%- elif m['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' + (m['content'] or '') }}"
    "{%- for tc in m['tool_calls'] or [] %}{%- if m['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' + tc.function.name + \'", "arguments": \' + (tc.function.arguments | tojson)'
    " + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + m['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_LLAMA3 = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
_GEMMA = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first = messages[0]['content'] + '\n\n' -%}{%- set rest = messages[1:] -%}"
    "{%- else -%}{%- set first = '' -%}{%- set rest = messages -%}{%- endif -%}"
    "{%- for m in rest -%}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{- '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' }}{%- endif -%}"
)
_EXAONE = (
    "{%- for m in messages -%}{{- '[|' + m['role'] + '|]\n' + m['content'] + '[|endofturn|]\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '[|assistant|]\n' }}{%- endif -%}"
)
_MISTRAL = (
    "{{- bos_token }}{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- '[SYSTEM_PROMPT]' + m['content'] + '[/SYSTEM_PROMPT]' }}"
    "{%- elif m['role'] == 'user' -%}{{- '[INST]' + m['content'] + '[/INST]' }}"
    "{%- else -%}{{- m['content'] + eos_token }}{%- endif -%}{%- endfor -%}"
)

FAMILIES: dict[str, Family] = {
    "qwen": Family(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|endoftext|>", _QWEN),
    "llama": Family(
        (
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ),
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
        _LLAMA3,
    ),
    "gemma": Family(
        ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<end_of_turn>", "<pad>", _GEMMA
    ),
    "exaone": Family(
        ("[PAD]", "[BOS]", "[|endofturn|]", "[|system|]", "[|user|]", "[|assistant|]"),
        "[BOS]",
        "[|endofturn|]",
        "[PAD]",
        _EXAONE,
    ),
    "mistral": Family(
        ("<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
        "<s>",
        "</s>",
        "<pad>",
        _MISTRAL,
    ),
}
_FAMILY_OF = {
    "llama": "llama",
    "qwen2": "qwen",
    "qwen3": "qwen",
    "mistral": "mistral",
    "gemma3": "gemma",
    "exaone4": "exaone",
}
# end-of-turn markers of the families' templates (kollm.train.modeling.end_of_turn_ids stops generation at them)
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "[|endofturn|]")


def family_tokens(architecture: str) -> Family:
    return FAMILIES[_FAMILY_OF[_check(architecture)]]


def _check(architecture: str) -> str:
    if architecture not in ARCHITECTURES:
        from kollm.errors import ConfigError

        raise ConfigError(f"architecture: '{architecture}' is not one of {', '.join(ARCHITECTURES)}")
    return architecture


def model_config(
    architecture: str,
    *,
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    max_positions: int,
    tied: bool,
    bos_token_id: int | None,
    eos_token_id: int | None,
    pad_token_id: int | None,
    sliding_window: int | None = None,
    initializer_range: float = 0.02,
) -> Any:
    """A transformers config of `architecture`, built from its own config class. Layers alternate sliding-window
    and full attention in gemma3 and exaone4 (the last layer full, as in the released models' patterns: every 6th in
    Gemma 3, every 4th in EXAONE 4, here every 2nd so that a 2-layer model has both); `sliding_window` defaults to
    a quarter of max_positions there, and to none for mistral (Mistral's newer models have none)."""
    import transformers as tf

    _check(architecture)
    head_dim = hidden // heads
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        initializer_range=initializer_range,
    )
    alternating = [("sliding_attention" if i % 2 == 0 and i < layers - 1 else "full_attention") for i in range(layers)]
    window = sliding_window or max(1, max_positions // 4)
    if architecture == "llama":
        return tf.LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if architecture == "qwen2":
        return tf.Qwen2Config(**common)
    if architecture == "qwen3":
        return tf.Qwen3Config(**common, head_dim=head_dim)
    if architecture == "mistral":
        return tf.MistralConfig(**common, head_dim=head_dim, sliding_window=sliding_window)
    if architecture == "gemma3":
        return tf.Gemma3TextConfig(
            **common,
            head_dim=head_dim,
            query_pre_attn_scalar=head_dim,
            sliding_window=window,
            layer_types=alternating,
        )
    # Exaone4Config has no head_dim: its attention takes hidden / heads
    return tf.Exaone4Config(**common, sliding_window=window, layer_types=alternating)


def train_tokenizer(texts: Iterable[str], vocab_size: int, architecture: str) -> Any:
    """A byte-level BPE tokenizer (NFC-normalized) trained on `texts` with the special tokens, eos, pad and chat
    template of `architecture`'s family."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    family = family_tokens(architecture)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 256 + len(family.special) + 1),
        special_tokens=list(family.special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    header = ["system\n", "user\n", "assistant\n", "model\n"] * 8
    tok.train_from_iterator([*header, *texts], trainer)
    named = {family.bos, family.eos, family.pad}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        additional_special_tokens=[t for t in family.special if t not in named],
        chat_template=family.template,
        model_max_length=1_000_000,
    )


def build_model(architecture: str, tokenizer: Any, *, seed: int = 0, attn_implementation: str = "sdpa", **sizes: Any):
    """A randomly initialised causal LM of `architecture` matching `tokenizer` (sizes: model_config's)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(
        architecture,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_positions=256, tied=True)


def build_folder(
    path: Path,
    architecture: str,
    texts: Iterable[str],
    *,
    vocab_size: int = 400,
    seed: int = 0,
    initializer_range: float = 0.02,
    **sizes: Any,
) -> Path:
    """A random `architecture` model (TINY sizes unless given) and its family's tokenizer trained on `texts`,
    saved at `path` as a Hugging Face folder (config.json, safetensors, tokenizer with its chat template,
    generation config stopping at the end of a turn): what `base_model:` or `kollm serve` takes, like a downloaded
    checkpoint of that architecture."""
    from transformers import GenerationConfig

    tokenizer = train_tokenizer(texts, vocab_size, architecture)
    model = build_model(
        architecture, tokenizer, seed=seed, **{**TINY, **sizes, "initializer_range": initializer_range}
    ).eval()
    from kollm.train.modeling import end_of_turn_ids

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=end_of_turn_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
