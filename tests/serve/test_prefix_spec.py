"""The native engine's prefix cache (kollm.serve.prefix) and prompt-lookup speculative decoding
(kollm.serve.speculative) over the static KV cache: outputs must equal decoding without them."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from kollm.errors import ConfigError
from kollm.serve.engine import SamplingParams, TransformersEngine
from kollm.serve import prefix, speculative
from kollm.serve.kv import StaticKV
from kollm.serve.prefix import BLOCK_TOKENS, EXTEND_TAIL_TOKENS, Extender, PrefixCache, extend_forward
from kollm.serve.speculative import COOL_DOWN, JUDGE_STEPS, MAX_REJECTED, NgramIndex, Speculator, Verifier
from tests.serve.conftest import start_server
from tests.serve.test_kv import CUDA, eager_graph_shapes, greedy_without_cache, tiny
from tests.tiny import tiny_model, tiny_tokenizer

SHARED = "kollm serves models. 한국어 언어 모델을 서빙합니다. 서울은 대한민국의 수도입니다. "  # 67 tokens
OTHER = "The quick brown fox jumps over the lazy dog. 0123456789 오늘 날씨가 좋습니다. 안녕하세요"  # 67 too


@pytest.fixture(autouse=True)
def no_policy_by_time(monkeypatch):
    """Speculation's policy by time (verify vs decode step times) stays out of the tests that check what drafting
    computes: on a shared CPU its judgement is noise. test_speculation_stops_drafting_when_verifying_costs_more turns
    it back on."""
    monkeypatch.setattr(speculative, "JUDGE_STEPS", 10**9)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny("llama", tok)


def run(engine: TransformersEngine, batches: list[list[tuple[list[int], SamplingParams]]]) -> list[str]:
    """Each batch's requests concurrently, the batches one after another; each request's generated text."""

    async def one(ids: list[int], params: SamplingParams, rid: str) -> str:
        chunks = [c async for c in engine.generate(ids, params, rid)]
        assert chunks[-1].finish_reason is not None
        return "".join(c.text for c in chunks)

    async def main():
        out: list[str] = []
        for b, batch in enumerate(batches):
            out += await asyncio.gather(*(one(ids, p, f"r{b}.{i}") for i, (ids, p) in enumerate(batch)))
        await engine.shutdown()
        return out

    return asyncio.run(main())


def as_on_cuda(monkeypatch) -> None:
    """StaticKV in the shapes of its CUDA graphs (padded prefill buckets, decode over at least MIN_DECODE_ROWS rows,
    greedy picks fed back on the device), run eagerly here."""
    eager_graph_shapes(monkeypatch)
    init = StaticKV.__init__
    monkeypatch.setattr(StaticKV, "__init__", lambda self, model, **kw: init(self, model, **kw, cuda_graphs=True))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def check_greedy(tok, model, batches, outputs) -> None:
    flat = [r for batch in batches for r in batch]
    for (ids, p), out in zip(flat, outputs):
        expected = greedy_without_cache(model, ids, p.max_tokens)
        assert out == tok.decode(expected, skip_special_tokens=True), ids
    assert len(set(outputs)) == len(flat)  # the outputs differ: the comparison means something


@pytest.mark.parametrize("graph_shapes", [False, True])
def test_prompts_sharing_a_prefix_get_the_outputs_of_prefilling_them_whole(tok, model, graph_shapes, monkeypatch):
    """A shared prefix of 67 tokens (4 full blocks) is cached by the first request and reused by the next two
    (together in one prefill, with different suffixes), and by a prompt that is exactly a cached prefix (3 of its
    4 blocks reused, the last block prefilled). Greedy outputs equal recomputing the whole sequence; also in the
    shapes the CUDA graphs run."""
    if graph_shapes:
        as_on_cuda(monkeypatch)
    shared = tok.encode(SHARED)
    blocks = len(shared) // BLOCK_TOKENS
    exact = shared[: blocks * BLOCK_TOKENS]
    batches = [
        [(shared + tok.encode("안녕하세요"), greedy(10))],
        [(shared + tok.encode("오늘 날씨"), greedy(12)), (shared + tok.encode("0"), greedy(8))],
        [(exact, greedy(9))],
    ]
    engine = TransformersEngine(model, tok, max_batch_size=4, kv_cache="static")
    outputs = run(engine, batches)
    check_greedy(tok, model, batches, outputs)
    assert engine.prefix_cache_hit_tokens() == (blocks + blocks + blocks - 1) * BLOCK_TOKENS


def test_a_prompt_hitting_the_cache_joins_a_batch_decoding_ahead(tok, model, monkeypatch):
    """In the CUDA graphs' shapes (a decode step launched one ahead of reading it back), prompts that hit the cache
    join while another request decodes, and speculation drafts for them: each gets its greedy tokens."""
    as_on_cuda(monkeypatch)
    shared = tok.encode(SHARED)
    engine = TransformersEngine(model, tok, max_batch_size=4, kv_cache="static", speculative="ngram")
    requests = [(shared, 2), (shared + tok.encode("안녕하세요"), 80), (shared + tok.encode("0"), 12)]
    running: list[int] = []

    async def one(i: int, ids: list[int], n: int) -> str:
        await asyncio.sleep((0, 0.5, 0.52)[i])  # the first caches the prefix; the third joins the second
        chunks = []
        async for c in engine.generate(ids, greedy(n), f"r{i}"):
            if i == 2 and not chunks:
                running.append(engine.running())
            chunks.append(c)
        return "".join(c.text for c in chunks)

    async def main():
        out = await asyncio.gather(*(one(i, ids, n) for i, (ids, n) in enumerate(requests)))
        await engine.shutdown()
        return out

    outputs = asyncio.run(main())
    for (ids, n), out in zip(requests, outputs):
        assert out == tok.decode(greedy_without_cache(model, ids, n), skip_special_tokens=True)
    assert engine.prefix_cache_hit_tokens() == 2 * (len(shared) // BLOCK_TOKENS) * BLOCK_TOKENS
    assert running == [2]  # the third request's first token came while the second was still decoding


def test_after_eviction_the_pool_rows_hold_the_new_blocks(tok, model):
    """A pool of 4 blocks: a second long prompt evicts the first's blocks and takes their rows; a prompt sharing
    the second's prefix reuses them (the rows' new contents), and the first prompt again gets no hit."""
    first, second = tok.encode(SHARED), tok.encode(OTHER)
    batches = [
        [(first, greedy(8))],
        [(second, greedy(8))],
        [(second + tok.encode("서울"), greedy(9))],
        [(first + tok.encode("0"), greedy(7))],
    ]
    engine = TransformersEngine(model, tok, max_batch_size=2, kv_cache="static", prefix_cache_tokens=4 * BLOCK_TOKENS)
    outputs = run(engine, batches)
    check_greedy(tok, model, batches, outputs)
    assert engine._prefix is not None and engine._prefix.evicted >= 4
    assert engine.prefix_cache_hit_tokens() == (len(second) // BLOCK_TOKENS) * BLOCK_TOKENS


def test_sampling_with_the_prefix_cache_is_what_it_is_without(tok, model):
    """A seeded sampling request after the same prompt was cached samples the same tokens as without a cache."""
    ids = tok.encode(SHARED + "안녕")
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    with_cache = TransformersEngine(model, tok, max_batch_size=2, kv_cache="static")
    without = TransformersEngine(model, tok, max_batch_size=2, kv_cache="static", prefix_cache=False)
    cached = run(with_cache, [[(ids, greedy(1))], [(ids, params)]])[1]
    assert with_cache.prefix_cache_hit_tokens() > 0 and without._prefix is None
    assert cached == run(without, [[(ids, params)]])[0]


def test_the_key_covers_the_adapter_and_every_earlier_token(tok, model):
    """Blocks computed under one LoRA adapter are not reused for another (or the base); a block is reused only
    after the same tokens before it."""
    with torch.inference_mode():
        kv = StaticKV(model, slots=2, context_length=128)
        cache = PrefixCache(kv, tokens=8 * BLOCK_TOKENS)
        prompt = list(range(3, 3 + 3 * BLOCK_TOKENS + 1))
        kv.prefill([prompt])
        cache.store(kv, 0, prompt, "adapter-a")
        assert len(cache.lookup(prompt, "adapter-a")) == 3
        assert cache.lookup(prompt, "adapter-b") == [] and cache.lookup(prompt, None) == []
        changed = [prompt[0] + 1, *prompt[1:]]  # same later blocks, different first token
        assert cache.lookup(changed, "adapter-a") == []
        assert len(cache.lookup(prompt[: 2 * BLOCK_TOKENS], "adapter-a")) == 1  # the last token is prefilled


def test_a_prompt_hitting_the_cache_is_not_prefilled_whole(tok, model):
    """Only the uncached tail goes through the model: the whole-prompt prefill is not run as well."""
    engine = TransformersEngine(model, tok, max_batch_size=2, kv_cache="static")
    whole: list[int] = []

    async def main():
        async def ask(text: str) -> None:
            async for _ in engine.generate(tok.encode(SHARED + text), greedy(2), text):
                pass

        await ask("안녕")
        assert engine._kv is not None
        prefill = engine._kv.prefill
        engine._kv.prefill = lambda prompts, **kw: (whole.append(len(prompts)), prefill(prompts, **kw))[1]
        await ask("하세요")
        await engine.shutdown()

    asyncio.run(main())
    assert engine.prefix_cache_hit_tokens() >= BLOCK_TOKENS
    assert whole == []


def test_prefix_cache_hits_are_counted_in_metrics(tok, model):
    from kollm.serve.router import create_app

    engine = TransformersEngine(model, tok, max_batch_size=2, kv_cache="static")
    server = start_server(create_app(engine, model_name="tiny", model_version="prefix-1"))
    try:
        prompt = SHARED + "안녕"
        for _ in range(2):
            r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
            assert r.status_code == 200, r.text
        text = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
    hits = engine.prefix_cache_hit_tokens()
    assert hits >= 2 * BLOCK_TOKENS
    assert f'kollm_prefix_cache_hit_tokens_total{{model_version="prefix-1"}} {float(hits)}' in text


def test_ngram_index_proposes_what_followed_the_last_ngram():
    index = NgramIndex()
    index.extend([1, 2, 3, 4, 5, 9, 2, 3])
    assert index.draft(3) == [4, 5, 9]  # "2 3" was followed by 4 5 9
    index.extend([7])
    assert index.draft(3) == []  # "3 7", "7": never seen before
    index.extend([1, 2])
    assert index.draft(2) == [3, 4]  # "7 1 2" unseen; "1 2" was followed by 3 4
    index.extend([3, 4, 5, 9, 2])
    assert index.draft(1) == [3]  # "5 9 2": its latest occurrence (both were followed by 3)


def test_a_sequence_whose_drafts_keep_being_rejected_stops_drafting():
    spec = Speculator()
    seq = object()
    tokens = [1, 2, 3, 1, 2]
    for _ in range(MAX_REJECTED):
        assert spec.draft(seq, tokens[:2], tokens[2:], 10) == [3, 1, 2]
        spec.record(seq, 3, 0)
    assert spec.draft(seq, tokens, [], 10) == [] and spec.state(seq).off
    other = object()  # a lookup that finds nothing waits before looking again
    assert spec.draft(other, [1, 2, 3], [], 10) == []
    assert not spec.due(other)


@pytest.mark.parametrize(("init_range", "graph_shapes"), [(0.1, False), (0.5, False), (0.1, True)])
def test_speculative_greedy_outputs_equal_decoding_one_token_at_a_time(tok, init_range, graph_shapes, monkeypatch):
    """Two requests, then two more with a sampling request joining (no drafts while it runs), on a model whose
    greedy text repeats itself (init 0.1: drafts accepted, several tokens per step) and on one whose text rarely
    does (0.5: drafts mostly rejected, the slots rolled back): greedy outputs equal recomputing the whole sequence;
    also in the shapes the CUDA graphs run (steps launched one ahead between the drafting steps)."""
    if graph_shapes:
        as_on_cuda(monkeypatch)
    model = tiny_model(tok, init_range=init_range).eval() if init_range != 0.5 else tiny("llama", tok)
    copy = tok.encode("서울은 대한민국의 수도입니다. " * 4)
    requests = [
        [(copy, greedy(40)), (tok.encode("The quick brown fox"), greedy(30))],
        [(copy[:20], greedy(25)), (tok.encode("안녕하세요"), SamplingParams(max_tokens=6, temperature=1.0, seed=3))],
        [(tok.encode("The quick"), greedy(33))],
    ]
    engine = TransformersEngine(model, tok, max_batch_size=4, kv_cache="static", speculative="ngram")
    outputs = run(engine, requests)
    generated = 0
    for (ids, p), out in zip([r for b in requests for r in b], outputs):
        if p.temperature == 0:
            assert out == tok.decode(greedy_without_cache(model, ids, p.max_tokens), skip_special_tokens=True), ids
            generated += p.max_tokens
    spec = engine._speculator
    assert spec is not None and spec.proposed > spec.accepted
    if init_range == 0.1:
        assert spec.accepted > generated // 3 and spec.steps > 0


def test_speculation_needs_the_static_cache(tok, model):
    with pytest.raises(ConfigError, match="static KV cache"):
        TransformersEngine(model, tok, kv_cache="dynamic", speculative="ngram")


def test_sliding_window_models_get_no_prefix_cache_and_no_speculation(tok, model):
    """extend_forward and the verify step attend to every earlier position: a sliding window is refused by name."""
    import copy

    from kollm.serve.prefix import extend_unsupported

    assert extend_unsupported(model.config) is None
    windowed = copy.deepcopy(model)
    windowed.config.model_type, windowed.config.sliding_window = "mistral", 8  # a llama-shaped mistral with a window
    assert "sliding-window" in extend_unsupported(windowed.config)
    assert TransformersEngine(windowed, tok, kv_cache="static").prefix_cache is False
    with pytest.raises(ConfigError, match="sliding-window"):
        TransformersEngine(windowed, tok, kv_cache="static", speculative="ngram")


@pytest.mark.parametrize("on", [True, False])
def test_load_engine_turns_the_prefix_cache_on_or_off(tiny_model_dir, on):
    """`kollm serve --prefix-cache` (the default) / `--no-prefix-cache`: the engine load_engine builds."""
    from kollm.serve.engine import load_engine

    engine = load_engine(tiny_model_dir, device="cpu", kv_cache="static", max_batch_size=2, prefix_cache=on)
    assert isinstance(engine, TransformersEngine)
    ids = engine.encode_prompt(SHARED)
    run(engine, [[(ids, greedy(2))], [(ids, greedy(2))]])
    assert (engine.prefix_cache_hit_tokens() > 0) is on


def test_serve_refuses_an_unknown_speculative_method(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from tests.serve.conftest import free_port

    cmd = [sys.executable, "-m", "kollm.cli", "serve", str(tiny_model_dir), "--device", "cpu", "--port"]
    r = subprocess.run(
        [*cmd, str(free_port()), "--speculative", "medusa"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "--speculative: expected ngram" in r.stderr


@pytest.mark.parametrize("same", [True, False])
def test_draft_model_greedy_outputs_equal_decoding_one_token_at_a_time(tok, model, same):
    """`--speculative draft`: a draft model of the same tokenizer proposes tokens that the served model verifies.
    With the served model as its own draft every draft token is accepted; with another model most are rejected.
    Either way the greedy outputs equal recomputing the whole sequence."""
    target = tiny_model(tok, init_range=0.1).eval()
    draft = tiny_model(tok, init_range=0.1).eval() if same else model
    requests = [
        [(tok.encode("서울은 대한민국의 수도입니다."), greedy(30)), (tok.encode("The quick brown fox"), greedy(21))],
        [(tok.encode("안녕하세요"), greedy(17))],
    ]
    engine = TransformersEngine(
        target, tok, max_batch_size=4, kv_cache="static", speculative="draft", draft_model=draft
    )
    outputs = run(engine, requests)
    for (ids, p), out in zip([r for b in requests for r in b], outputs):
        assert out == tok.decode(greedy_without_cache(target, ids, p.max_tokens), skip_special_tokens=True), ids
    spec = engine._speculator
    assert spec is not None and spec.proposed > 0 and spec.steps > 0
    if same:
        assert spec.accepted == spec.proposed
    else:
        assert spec.accepted < spec.proposed


def test_a_draft_model_must_share_the_vocabulary(tok, model):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok) + 7,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    )
    with pytest.raises(ConfigError, match="vocabulary"):
        TransformersEngine(model, tok, kv_cache="static", speculative="draft", draft_model=other)
    with pytest.raises(ConfigError, match="go together"):
        TransformersEngine(model, tok, kv_cache="static", speculative="ngram", draft_model=model)


def test_load_engine_loads_a_draft_model_folder(tiny_model_dir):
    """`kollm serve --speculative draft --draft-model PATH`: the folder is loaded beside the served model and drafts."""
    from kollm.serve.engine import load_engine

    with pytest.raises(ConfigError, match="go together"):
        load_engine(tiny_model_dir, device="cpu", kv_cache="static", speculative="draft")
    engine = load_engine(
        tiny_model_dir,
        device="cpu",
        kv_cache="static",
        max_batch_size=2,
        speculative="draft",
        draft_model=tiny_model_dir,
    )
    assert isinstance(engine, TransformersEngine)
    run(engine, [[(engine.encode_prompt(SHARED), greedy(6))]])
    assert engine._draft is not None and engine._speculator is not None
    assert engine._speculator.accepted == engine._speculator.proposed > 0  # its own draft: every token accepted


@pytest.mark.parametrize("grouped", [False, True])
def test_prefix_hit_prefill_in_graph_shapes_equals_extending_in_exact_shapes(tok, model, grouped, monkeypatch):
    """Extender (the prefix-hit prefill of the CUDA graphs: rows and tails padded to a bucket, attention over the
    whole cache length, a tail longer than the largest bucket run chunk after chunk, rows past the largest bucket in
    groups) gives the logits and writes the keys and values that extend_forward does in the batch's exact shapes."""
    vocab = model.config.vocab_size
    length = EXTEND_TAIL_TOKENS + 96
    if grouped:
        monkeypatch.setattr(prefix, "EXTEND_GRAPH_KEYS", 2 * length)  # 2 rows per graph: rows 0-1, then row 2
    with torch.inference_mode():
        kv = StaticKV(model, slots=4, context_length=length)
        ext = Extender(kv)
        assert not ext.capture and (3, 16) not in ext.buckets
        assert ext.buckets[-1][0] == (2 if grouped else 4)  # else 3 rows: padded to 4
        prompts = [[3 + (7 * i + n) % (vocab - 3) for i in range(n)] for n in (40, 23, EXTEND_TAIL_TOKENS + 70)]
        slots, starts = [0, 2, 1], [16, 0, 32]
        extend_forward(kv, [0, 1], [prompts[0][:16], prompts[2][:32]], [0, 0], every=False)  # the cached prefixes
        before = [c.clone() for c in kv.kv]
        tails = [p[s:] for p, s in zip(prompts, starts)]
        assert len(tails[2]) > EXTEND_TAIL_TOKENS  # two passes
        got = ext.extend(slots, tails, starts)
        got_kv = [c[:4].clone() for c in kv.kv]
        for c, b in zip(kv.kv, before):
            c.copy_(b)
        want = extend_forward(kv, slots, tails, starts, every=False)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
        for c, g in zip(kv.kv, got_kv):
            torch.testing.assert_close(g, c[:4], rtol=1e-4, atol=1e-4)


def test_a_long_tail_after_a_cached_prefix_in_graph_shapes(tok, model, monkeypatch):
    """In the CUDA graphs' shapes, a prompt whose uncached tail is longer than the largest tail bucket (several
    passes) and one with a short tail, prefilled together after a cached prefix: greedy outputs of the whole."""
    as_on_cuda(monkeypatch)
    monkeypatch.setattr(prefix, "EXTEND_TAIL_TOKENS", 32)  # the tiny model's 256 positions hold no longer tail
    shared = tok.encode(SHARED)
    long_tail = tok.encode(OTHER)
    assert len(long_tail) > 2 * 32
    batches = [[(shared, greedy(2))], [(shared + long_tail, greedy(6)), (shared + tok.encode("0"), greedy(6))]]
    engine = TransformersEngine(model, tok, max_batch_size=2, kv_cache="static")
    outputs = run(engine, batches)
    check_greedy(tok, model, batches, outputs)
    assert engine.prefix_cache_hit_tokens() == 2 * (len(shared) // BLOCK_TOKENS) * BLOCK_TOKENS


def test_verifying_stops_for_a_cool_down_when_it_costs_more_per_token_than_decoding(monkeypatch):
    monkeypatch.setattr(speculative, "JUDGE_STEPS", JUDGE_STEPS)
    spec = Speculator()
    for _ in range(JUDGE_STEPS):  # nothing to compare with yet: a few plain steps are timed first
        spec.observe_verify(0.05, 2)
    assert not spec.drafting()
    while not spec.drafting():
        spec.observe_decode(0.01)
    for _ in range(JUDGE_STEPS):  # 4 ms per emitted token against 10 ms: it pays
        spec.observe_verify(0.02, 5)
    assert spec.drafting() and spec.pauses == 0
    for _ in range(JUDGE_STEPS):  # 15 ms per emitted token: not drafting for a cool-down
        spec.observe_verify(0.03, 2)
    assert not spec.drafting() and spec.pauses == 1
    for _ in range(COOL_DOWN - 1):
        spec.observe_decode(0.01)
    assert not spec.drafting()
    spec.observe_decode(0.01)
    assert spec.drafting()  # probing again
    for _ in range(JUDGE_STEPS):
        spec.observe_verify(0.03, 2)
    assert spec.cool_down == 2 * COOL_DOWN and spec.pauses == 2  # still not paying: a longer cool-down


def test_speculation_stops_drafting_when_verifying_costs_more(tok, monkeypatch):
    """A verifier 200 ms slower than a decode step: after JUDGE_STEPS verify steps (and a few timed plain steps)
    drafting stops for a cool-down, though every draft is accepted; the outputs stay greedy."""
    monkeypatch.setattr(speculative, "JUDGE_STEPS", JUDGE_STEPS)
    step = Verifier.step

    def slow(self, drafts):
        import time

        time.sleep(0.2)
        return step(self, drafts)

    monkeypatch.setattr(Verifier, "step", slow)
    model = tiny_model(tok, init_range=0.1).eval()
    ids = tok.encode("서울은 대한민국의 수도입니다. " * 4)
    engine = TransformersEngine(model, tok, max_batch_size=2, kv_cache="static", speculative="ngram")
    out = run(engine, [[(ids, greedy(120))]])[0]
    assert out == tok.decode(greedy_without_cache(model, ids, 120), skip_special_tokens=True)
    spec = engine._speculator
    assert spec is not None and spec.pauses >= 1 and spec.accepted > 0
    assert spec.steps <= 2 * JUDGE_STEPS  # without the policy: about 120 / (tokens per step) verify steps


@CUDA
def test_on_cuda_prefix_hits_and_verify_steps_replay_graphs_captured_at_warm_up(tok):
    """On a GPU: the engine captures the prefix-hit prefill and verify graphs of every bucket at warm-up; requests
    that hit the cache and draft then replay them (none is captured on a request's path), with greedy outputs."""
    model = tiny_model(tok, init_range=0.1).eval().cuda()
    engine = TransformersEngine(model, tok, max_batch_size=4, kv_cache="static", speculative="ngram")
    shared = tok.encode(SHARED + "서울은 대한민국의 수도입니다. " * 2)
    batches = [
        [(shared, greedy(3))],
        [(shared + tok.encode("안녕"), greedy(30)), (shared + tok.encode("0"), greedy(20))],
    ]
    outputs = run(engine, batches)
    check_greedy(tok, model, batches, outputs)
    cache, verifier, spec = engine._prefix, engine._verifier, engine._speculator
    assert cache is not None and cache.extender is not None and verifier is not None and spec is not None
    assert len(cache.extender.graphs) == len(cache.extender.buckets) and cache.extender.late == 0
    assert cache.hit_tokens > 0 and spec.steps > 0
    assert len(verifier.graphs) == len(engine._kv.batch_buckets) * len(verifier.length_buckets)
    assert verifier.late == 0 and not verifier.eager
