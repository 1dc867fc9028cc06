"""The native engine's static KV cache (kollm.serve.kv.StaticKV) against decoding without any cache, for each
model family it serves; on CUDA (where each decode step is a replayed CUDA graph) the same checks run there."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from kollm.errors import ConfigError
from kollm.serve import decode_attention
from kollm.serve.engine import SamplingParams, TransformersEngine
from kollm.serve.kv import StaticKV, static_kv_unsupported
from tests.tiny import tiny_tokenizer

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# "interpreted": the CUDA path's logic on CPU, the Triton kernels run by Triton's interpreter and every step in the
# shape its CUDA graph has, run eagerly (CONTRIBUTING.md, "GPU kernels without a GPU"; minutes, not in CI)
INTERPRETED = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" or decode_attention.triton is None,
    reason="needs Triton's interpreter: TRITON_INTERPRET=1 and triton importable (see CONTRIBUTING.md)",
)
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA), pytest.param("interpreted", marks=INTERPRETED)]
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


def eager_graph_shapes(monkeypatch) -> None:
    """StaticKV runs each step in the shape of its CUDA graph, eagerly (the capture itself needs CUDA)."""
    monkeypatch.setattr(
        StaticKV,
        "_replay",
        lambda self, n, t, picks: self._prefill_forward(n, t) if picks is None else self._decode_forward(n, t, picks),
    )


def on(device: str, monkeypatch) -> str:
    """The torch device of a DEVICES entry; for "interpreted", StaticKV as on CUDA (Triton attention, graph
    shapes) but on CPU."""
    if device != "interpreted":
        return device
    eager_graph_shapes(monkeypatch)
    init = StaticKV.__init__

    def cuda_like(self, model, **kw):
        init(self, model, **kw, fused_attention=True, cuda_graphs=True)

    monkeypatch.setattr(StaticKV, "__init__", cuda_like)
    return "cpu"


def greedy_without_cache(model, ids: list[int], n: int) -> list[int]:
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq], device=model.device)).logits[0, -1].argmax()))
    return seq[len(ids) :]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_static_cache_decodes_exactly_what_decoding_without_a_cache_gives(model_type, device, monkeypatch):
    """Six requests of different lengths and budgets through 4 slots: rows join, leave and reuse slots, the
    batch and length buckets change (a new CUDA graph each time on CUDA); every request must get the greedy
    tokens of recomputing its whole sequence at every step."""
    tok = tiny_tokenizer()
    model = tiny(model_type, tok).to(on(device, monkeypatch))
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
def test_a_step_launched_ahead_gives_way_to_requests_that_need_every_token(device, monkeypatch):
    """With the static cache the engine launches step t+1 before reading step t's tokens, except while a running
    request has penalties (its next logits depend on the last token) or wants logprobs. Requests of both kinds
    joining and leaving a running batch must get exactly what the dynamic cache gives them."""
    tok = tiny_tokenizer()
    model = tiny("llama", tok).to(on(device, monkeypatch))
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


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA), pytest.param("cpu", marks=INTERPRETED)])
@pytest.mark.parametrize("rotate", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(16, 8, 64), (8, 8, 128), (12, 4, 64), (4, 2, 8)])
def test_fused_decode_attention_writes_the_cache_and_equals_attention_over_it(
    heads, kv_heads, dim, dtype, rotate, device
):
    """The Triton kernels (cache write and attention) against writing the cache with indexing and PyTorch's
    attention over each row's positions 0..pos, for grouped-query layouts (including 3 query heads per kv head,
    a group size that is not a power of two) and head sizes 8 to 128; with `rotate` the kernels apply the rotary
    embedding to q and the new k themselves (as kollm's _rotary does at each row's position)."""
    from kollm.serve.kv import _rotary

    assert decode_attention.available(dim)
    torch.manual_seed(0)
    slots, length, b = 6, 300, 5
    pos = torch.tensor([0, 1, 63, 64, 299, 7], device=device)  # 299: the cache's last position
    cache = torch.randn(slots, 2, kv_heads, length, dim, device=device, dtype=dtype)
    q = torch.randn(b, heads, dim, device=device, dtype=dtype)
    kv = torch.randn(b, 2, kv_heads, dim, device=device, dtype=dtype)
    freqs = torch.outer(torch.arange(length, device=device).float(), 1e-2 * torch.arange(dim // 2, device=device))
    cos, sin = torch.cat([freqs.cos(), freqs.cos()], -1).to(dtype), torch.cat([freqs.sin(), freqs.sin()], -1).to(dtype)
    q_ref, kv_ref = q.float(), kv.clone()
    if rotate:
        c, s_ = cos[pos[:b]][:, None].float(), sin[pos[:b]][:, None].float()
        q_ref = _rotary(q.float(), c, s_)
        kv_ref[:, 0] = _rotary(kv[:, 0].float(), c, s_).to(dtype)
    expected_cache = cache.clone()
    expected_cache[torch.arange(b, device=device), :, :, pos[:b]] = kv_ref
    out = decode_attention.decode_attention(q, kv, cache, pos, dim**-0.5, (cos, sin) if rotate else None)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    # the new key and value at pos (the rotated key within rounding), nothing else touched (slot 5 neither)
    torch.testing.assert_close(cache.float(), expected_cache.float(), atol=tol, rtol=tol)
    changed = (cache != expected_cache).any(-1)
    assert not changed[:, 1].any() and bool(changed[:, 0].sum() <= b * kv_heads)  # values exact; keys at pos only
    for r in range(b):
        n = int(pos[r]) + 1
        k = expected_cache[r, 0, :, :n].float().repeat_interleave(heads // kv_heads, dim=0)  # [heads, n, D]
        v = expected_cache[r, 1, :, :n].float().repeat_interleave(heads // kv_heads, dim=0)
        ref = torch.softmax(q_ref[r][:, None, :] @ k.transpose(1, 2) * dim**-0.5, dim=-1) @ v
        torch.testing.assert_close(out[r].float(), ref[:, 0], atol=tol, rtol=tol)


def test_graph_shapes_padded_prompts_and_rows_decode_exactly(monkeypatch):
    """What CUDA graphs run, run eagerly here: prompts padded to a prefill bucket (3 prompts as 4 rows, the
    padding row writing into the spare slot; 5 to 22 tokens as 16 or 32 positions), decode steps over at least
    MIN_DECODE_ROWS rows with greedy picks fed back on the device, rows joining a running batch. Each row must
    get the greedy tokens of recomputing its whole sequence at every step."""
    from kollm.serve.kv import MIN_DECODE_ROWS

    eager_graph_shapes(monkeypatch)
    tok = tiny_tokenizer()
    model = tiny("llama", tok)
    prompts = [tok.encode(p) for p in PROMPTS[:5]]
    with torch.inference_mode():
        kv = StaticKV(model, slots=MIN_DECODE_ROWS + 2, context_length=256, cuda_graphs=True)
        assert kv.batch_buckets[0] == MIN_DECODE_ROWS and min(map(len, prompts)) < 16 < max(map(len, prompts))
        out: dict[int, list[int]] = {}
        order: list[int] = []  # prompt index of each row

        def add(indices: list[int]) -> None:
            handle, logits = kv.prefill([prompts[i] for i in indices])
            first = logits.argmax(-1)
            kv.join(handle, first)
            for i, token in zip(indices, first.tolist()):
                out[i] = [token]
            order.extend(indices)

        add([0, 1, 2])
        for step in range(12):
            if step == 4:
                add([3, 4])
            outputs, slots = kv.decode_greedy()
            rows = outputs.tolist()
            for i, slot in zip(order, slots):
                out[i].append(int(rows[slot][0]))
    assert kv.prompt_slots[3] == kv.slots  # the padding row of the first prefill wrote into the spare slot
    for i, tokens in out.items():
        assert tokens == greedy_without_cache(model, prompts[i], len(tokens)), i
