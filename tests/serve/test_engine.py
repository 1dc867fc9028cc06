"""The continuous-batching transformers engine on a tiny model, and the text helpers it uses."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from kollm.serve.engine import (
    EngineClosed,
    IncrementalDetokenizer,
    SamplingParams,
    StopFilter,
    TransformersEngine,
    load_engine,
)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(params=["dynamic", "static"])
def kv(request) -> str:
    """Both KV caches of the native engine (on CPU the static one runs its graph-ready step eagerly)."""
    return request.param


def new_engine(hf, kv="dynamic", **kwargs) -> TransformersEngine:
    model, tok = hf
    return TransformersEngine(model, tok, kv_cache=kv, **kwargs)


async def run(engine, prompt_ids, params, rid="r", delay=0.0):
    await asyncio.sleep(delay)
    chunks = [c async for c in engine.generate(prompt_ids, params, rid)]
    return "".join(c.text for c in chunks), chunks


def hf_greedy(hf, ids, n):
    """Greedy decoding with no KV cache at all: the whole sequence is recomputed for every token."""
    model, _ = hf
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def test_batched_greedy_matches_decoding_each_request_alone(hf, kv):
    """Requests arriving at different times, with different prompt lengths and budgets, share one batch
    (left padding, caches merged and trimmed as requests join and leave): each must get exactly the greedy
    tokens of decoding it alone without any cache."""
    engine = new_engine(hf, kv, max_batch_size=8)
    tok = hf[1]
    prompts = [
        "안녕하세요",
        "The quick brown fox jumps over the lazy dog.",
        "서울",
        "kollm serves models. 한국어 언어 모델을 서빙합니다.",
        "0",
        "오늘 날씨",
    ]
    budgets = [12, 20, 7, 25, 16, 3]

    async def main():
        jobs = [
            run(
                engine,
                engine.encode_prompt(p),
                SamplingParams(max_tokens=b, temperature=0, ignore_eos=True),
                f"r{i}",
                delay=0.003 * i,
            )
            for i, (p, b) in enumerate(zip(prompts, budgets))
        ]
        results = await asyncio.gather(*jobs)
        await engine.shutdown()
        return results

    results = asyncio.run(main())
    for p, b, (text, chunks) in zip(prompts, budgets, results):
        ids = engine.encode_prompt(p)
        expected = hf_greedy(hf, ids, b)
        assert [c.completion_tokens for c in chunks] == list(range(1, b + 1))
        assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
        assert text == tok.decode(expected, skip_special_tokens=True), p
    assert len({text for text, _ in results}) == len(
        prompts
    )  # the model's outputs differ: the comparison means something


def test_final_only_request_gets_its_first_chunk_then_one_last_chunk(hf, kv):
    """A non-streamed request (final_only) wakes its event loop twice, not once per token: the first token
    (time to first token, errors before any byte) and then everything else as one chunk, equal in text,
    token count and logprobs to the streamed chunks joined."""
    engine = new_engine(hf, kv)
    ids = engine.encode_prompt("한국어 모델")

    async def main():
        params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True, logprobs=2)
        streamed, held = await asyncio.gather(
            run(engine, ids, params, "s"), run(engine, ids, replace(params, final_only=True), "f")
        )
        await engine.shutdown()
        return streamed, held

    (text, chunks), (held_text, held) = asyncio.run(main())
    assert len(chunks) == 9 and [c.completion_tokens for c in held] == [1, 9]
    assert held_text == text and held[-1].finish_reason == "length" and held[0].finish_reason is None
    assert [lp.token for c in held for lp in c.logprobs] == [lp.token for c in chunks for lp in c.logprobs]
    assert held[-1].output_nll == pytest.approx(chunks[-1].output_nll)


def test_seeded_sampling_is_reproducible_alone_or_in_a_batch(hf, kv):
    engine = new_engine(hf, kv)
    ids = engine.encode_prompt("서울은 대한민국의")
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)

    async def main():
        alone, _ = await run(engine, ids, params)
        again, _ = await run(engine, ids, params)
        crowd = await asyncio.gather(
            run(engine, ids, params, "seeded", delay=0.01),
            *[
                run(
                    engine,
                    engine.encode_prompt(f"noise {i}"),
                    SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True),
                    f"n{i}",
                )
                for i in range(5)
            ],
        )
        other_seed, _ = await run(
            engine, ids, SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True)
        )
        await engine.shutdown()
        return alone, again, crowd[0][0], other_seed

    alone, again, in_batch, other = asyncio.run(main())
    assert alone == again == in_batch
    assert other != alone


def test_stop_sequence_cuts_the_output(hf, kv):
    engine = new_engine(hf, kv)
    ids = engine.encode_prompt("The quick brown fox")
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)

    async def main():
        full, _ = await run(engine, ids, greedy)
        stop = full[8:11]
        cut, chunks = await run(
            engine, ids, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=(stop, "never-appears"))
        )
        await engine.shutdown()
        return full, stop, cut, chunks

    full, stop, cut, chunks = asyncio.run(main())
    assert cut == full[: full.index(stop)]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens < 30


def test_end_of_sequence_token_finishes_unless_ignored(hf, kv):
    engine = new_engine(hf, kv)
    for prompt in [
        "안녕하세요",
        "The quick brown fox jumps over",
        "kollm serves",
        "서울은 대한민국의 수도",
        "0123456789",
    ]:
        ids = engine.encode_prompt(prompt)
        greedy = hf_greedy(hf, ids, 10)
        at = next((k for k in range(1, 10) if greedy[k] not in greedy[:k]), None)  # the first token not seen before
        if at is not None:
            break
    engine.eos_ids = frozenset({greedy[at]})  # pretend that token is the model's end-of-sequence token

    async def main():
        a = await run(engine, ids, SamplingParams(max_tokens=10, temperature=0))
        b = await run(engine, ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        await engine.shutdown()
        return a, b

    (_, stopped), (_, ignored) = asyncio.run(main())
    assert at >= 1
    assert stopped[-1].finish_reason == "stop" and stopped[-1].completion_tokens == at + 1
    assert ignored[-1].finish_reason == "length" and ignored[-1].completion_tokens == 10


def test_context_limit_ends_generation_with_length(hf, kv):
    engine = new_engine(hf, kv, context_length=20)
    ids = engine.encode_prompt("안녕하세요 반갑습니다")

    async def main():
        out = await run(engine, ids, SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True))
        await engine.shutdown()
        return out

    _, chunks = asyncio.run(main())
    assert chunks[-1].finish_reason == "length" and len(ids) + chunks[-1].completion_tokens == 20


def test_cancelled_request_leaves_the_batch_and_others_finish(hf, kv):
    engine = new_engine(hf, kv, max_batch_size=2)

    async def main():
        gen = engine.generate(
            engine.encode_prompt("long"), SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), "long"
        )
        got = [await anext(gen), await anext(gen)]
        await gen.aclose()
        other = await run(engine, engine.encode_prompt("short"), SamplingParams(max_tokens=5, temperature=0), "short")
        for _ in range(100):
            if engine.running() == 0:
                break
            await asyncio.sleep(0.01)
        running = engine.running()
        await engine.shutdown()
        return got, other, running

    got, (_, other), running = asyncio.run(main())
    assert [c.completion_tokens for c in got] == [1, 2]
    assert other[-1].finish_reason in ("length", "stop")
    assert running == 0


def test_queue_beyond_the_batch_and_shutdown_drains(hf, kv):
    engine = new_engine(hf, kv, max_batch_size=2)
    seen_queue = []

    async def watch():
        while True:
            seen_queue.append((engine.queue_depth(), engine.running()))
            await asyncio.sleep(0.002)

    async def main():
        watcher = asyncio.create_task(watch())
        jobs = [
            asyncio.create_task(
                run(
                    engine,
                    engine.encode_prompt(f"요청 {i}"),
                    SamplingParams(max_tokens=15, temperature=0, ignore_eos=True),
                    f"q{i}",
                )
            )
            for i in range(6)
        ]
        await asyncio.sleep(0.02)
        await engine.shutdown()  # waits for everything accepted
        results = [j.result() for j in jobs]
        watcher.cancel()
        with pytest.raises(EngineClosed):
            await anext(engine.generate([1, 2], SamplingParams(max_tokens=2), "late"))
        return results

    results = asyncio.run(main())
    assert all(chunks[-1].completion_tokens == 15 for _, chunks in results)
    assert max(q for q, _ in seen_queue) >= 1
    assert max(r for _, r in seen_queue) <= 2
    assert not engine.ready()


def test_load_engine_errors(tmp_path, tiny_model_dir):
    from kollm.errors import ConfigError, NotFound

    with pytest.raises(NotFound, match="no config.json"):
        load_engine(tmp_path)
    with pytest.raises(ConfigError, match="--backend vllm: vLLM is not importable here"):
        load_engine(tiny_model_dir, backend="vllm")
    with pytest.raises(ConfigError, match="--backend"):
        load_engine(tiny_model_dir, backend="tensorrt")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_engine(tiny_model_dir, device="cuda")


def test_incremental_detokenizer_keeps_hangul_whole(hf):
    tok = hf[1]
    text = "안녕하세요, 서울은 대한민국의 수도입니다. The quick brown fox 🦊!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # a character split over byte tokens is never emitted half-way


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab가나 ", max_size=30),
    stops=st.lists(st.text(alphabet="ab가나 ", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_stop_filter_equals_cutting_the_whole_text(text, stops, cuts):
    pieces, prev = [], 0
    for c in sorted(set(min(c, len(text)) for c in cuts)) + [len(text)]:
        pieces.append(text[prev:c])
        prev = c
    f = StopFilter(stops)
    out, stopped = [], False
    for p in pieces:
        emitted, stopped = f.push(p)
        out.append(emitted)
        if stopped:
            break
    if not stopped:
        out.append(f.flush())
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]  # the first stop to complete wins
    expected = text[: min(hits)[1]] if hits else text
    assert "".join(out) == expected
    assert stopped == bool(hits)
