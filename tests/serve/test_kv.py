"""The native engine's static KV cache (kollm.serve.kv.StaticKV) against decoding without any cache, for each
model family it serves; on CUDA (where each decode step is a replayed CUDA graph) the same checks run there."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kollm.errors import ConfigError
from kollm.serve.engine import SamplingParams, TransformersEngine
from kollm.serve.kv import static_kv_unsupported
from tests.tiny import tiny_tokenizer

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")),
]
PROMPTS = [
    "안녕하세요",
    "The quick brown fox jumps over the lazy dog.",
    "서울",
    "kollm serves models. 한국어 언어 모델을 서빙합니다.",
    "0",
    "오늘 날씨",
]
BUDGETS = [12, 70, 7, 25, 16, 3]  # 70: crosses the first length bucket (64 positions) while others come and go


def tiny(model_type: str, tok):
    """A tiny model of the family with large random weights (varied greedy outputs), 4 query heads over 2 kv heads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"attention_bias": True} if model_type == "qwen2" else {}
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        initializer_range=0.5,
        **extra,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def greedy_without_cache(model, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq], device=model.device)).logits[0, -1].argmax()))
    return seq[len(ids) :]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_static_cache_decodes_exactly_what_decoding_without_a_cache_gives(model_type, device):
    """Six requests of different lengths and budgets through 4 slots: rows join, leave and reuse slots, the
    batch and length buckets change (a new CUDA graph each time on CUDA); every request must get the greedy
    tokens of recomputing its whole sequence at every step."""
    tok = tiny_tokenizer()
    model = tiny(model_type, tok).to(device)
    assert static_kv_unsupported(model) is None
    engine = TransformersEngine(model, tok, max_batch_size=4, kv_cache="static")

    async def one(i: int, prompt: str, budget: int) -> list[int]:
        await asyncio.sleep(0.003 * i)
        params = SamplingParams(max_tokens=budget, temperature=0, ignore_eos=True)
        chunks = [c async for c in engine.generate(engine.encode_prompt(prompt), params, f"r{i}")]
        assert chunks[-1].completion_tokens == budget and chunks[-1].finish_reason == "length"
        return "".join(c.text for c in chunks)

    async def main():
        out = await asyncio.gather(*(one(i, p, b) for i, (p, b) in enumerate(zip(PROMPTS, BUDGETS))))
        await engine.shutdown()
        return out

    texts = asyncio.run(main())
    for prompt, budget, text in zip(PROMPTS, BUDGETS, texts):
        expected = greedy_without_cache(model, engine.encode_prompt(prompt), budget)
        assert text == tok.decode(expected, skip_special_tokens=True), prompt
    assert len(set(texts)) == len(PROMPTS)  # the outputs differ: the comparison means something
    if device == "cuda":
        assert engine._kv is not None and len(engine._kv.graphs) >= 3  # batch and length buckets were captured


def test_models_the_static_cache_cannot_serve_fall_back_or_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64)).eval()
    assert "gpt2" in static_kv_unsupported(model)
    engines = [TransformersEngine(model, tok, kv_cache="auto")]
    with pytest.raises(ConfigError, match="static cannot serve this model"):
        TransformersEngine(model, tok, kv_cache="static")
    engines.append(TransformersEngine(tiny("llama", tok), tok, kv_cache="auto"))
    assert [e.kv_cache for e in engines] == ["dynamic", "dynamic"]  # a llama on CPU too: see TransformersEngine
    for engine in engines:
        asyncio.run(engine.shutdown())


@pytest.mark.parametrize("device", DEVICES)
def test_a_step_launched_ahead_gives_way_to_requests_that_need_every_token(device):
    """With the static cache the engine launches step t+1 before reading step t's tokens, except while a running
    request has penalties (its next logits depend on the last token) or wants logprobs. Requests of both kinds
    joining and leaving a running batch must get exactly what the dynamic cache gives them."""
    tok = tiny_tokenizer()
    model = tiny("llama", tok).to(device)
    params = [
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, frequency_penalty=1.5, presence_penalty=0.5),
        SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, logprobs=2),
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, repetition_penalty=1.3),
        SamplingParams(max_tokens=25, temperature=0, ignore_eos=True),
    ]

    def outputs(kind: str):
        engine = TransformersEngine(model, tok, max_batch_size=4, kv_cache=kind)

        async def one(i: int, p: SamplingParams):
            await asyncio.sleep(0.004 * i)
            chunks = [c async for c in engine.generate(engine.encode_prompt(PROMPTS[i]), p, f"r{i}")]
            return "".join(c.text for c in chunks), [lp.logprob for c in chunks for lp in c.logprobs]

        async def main():
            out = await asyncio.gather(*(one(i, p) for i, p in enumerate(params)))
            await engine.shutdown()
            return out

        return asyncio.run(main())

    static, dynamic = outputs("static"), outputs("dynamic")
    assert [text for text, _ in static] == [text for text, _ in dynamic]
    assert static[3][1] == pytest.approx(dynamic[3][1], abs=1e-4) and len(static[3][1]) == 9  # one per token
    assert len({text for text, _ in static}) == len(params)
