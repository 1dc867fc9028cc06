"""A tiny Llama-shaped model and byte-level BPE tokenizer with a chat template, built in a second (no hub).

Shared by the evaluation, registry, serving and rollout tests.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "안녕하세요. 오늘 날씨가 좋습니다.",
    "한국어 언어 모델을 학습하고 서빙합니다.",
    "서울은 대한민국의 수도입니다.",
    "The quick brown fox jumps over the lazy dog.",
    "kollm serves models with an OpenAI compatible API.",
    "0123456789 ,.!?;:-_()[]{}\"'",
] * 20


def tiny_tokenizer(context: int = 256):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=context
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(tokenizer, *, seed: int = 0, context: int = 256, init_range: float = 0.02):
    """init_range 0.02 gives a near-uniform untrained model; 0.5 gives varied, context-dependent greedy outputs."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        initializer_range=init_range,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id
    )
    return model.eval()


def save_tiny(path: Path, *, seed: int = 0, context: int = 256, init_range: float = 0.02) -> Path:
    """The tiny model and tokenizer saved as a plain Hugging Face folder."""
    tok = tiny_tokenizer(context)
    model = tiny_model(tok, seed=seed, context=context, init_range=init_range)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# Qwen2.5's Hermes-style tool template, shortened (tools in the system turn, calls as <tool_call> JSON, results as
# <tool_response> in a user turn): serves the tool-calling tests (kollm.serve.tools reads the format from it)
TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful assistant.{% endif %}"
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' and loop.first %}"
    "{%- elif m['role'] == 'assistant' %}<|im_start|>assistant\n{{ m['content'] or '' }}"
    "{%- for tc in m['tool_calls'] or [] %}{% if m['content'] or not loop.first %}\n{% endif %}"
    '<tool_call>\n{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m['content'] }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_with_tools(path: Path, **kwargs) -> Path:
    """save_tiny, with TOOL_CHAT_TEMPLATE as its chat template."""
    from transformers import AutoTokenizer

    save_tiny(path, **kwargs)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TOOL_CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path
