"""An engine step that fails (injected into the tiny model's forward pass) fails only the requests it touched; the
engine goes on serving, and only a device that keeps failing makes it dead, which /health then reports."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from kollm.serve.engine import MAX_CONSECUTIVE_FAILURES, EngineClosed, EngineError, SamplingParams, TransformersEngine

from .conftest import start_server

POISON = 13  # a prompt holding this token id makes the (faulty) model raise


class FaultyModel:
    """The tiny model, raising on a poisoned prompt (prefill) or, while `fail_decode` is set, on decode steps."""

    def __init__(self, model):
        self.model = model
        self.fail_decode = False
        self.fail_always = False

    def __getattr__(self, name):
        return getattr(self.model, name)

    def eval(self):
        return self

    def __call__(self, **kwargs):
        ids = kwargs["input_ids"]
        if (
            self.fail_always
            or (ids.shape[1] > 1 and bool((ids == POISON).any()))
            or (ids.shape[1] == 1 and self.fail_decode)
        ):
            raise RuntimeError("injected failure")
        return self.model(**kwargs)


@pytest.fixture()
def faulty(tiny_model_dir):
    model = FaultyModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    engine = TransformersEngine(model, AutoTokenizer.from_pretrained(tiny_model_dir), max_batch_size=8)
    yield model, engine
    asyncio.run(engine.shutdown())


async def text(engine, ids, n=30, rid="r"):
    return "".join(
        [c.text async for c in engine.generate(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True), rid)]
    )


def test_a_failing_prefill_fails_only_its_request(faulty):
    model, engine = faulty
    good = engine.encode_prompt("안녕하세요")
    assert POISON not in good

    async def main():
        alone = await text(engine, good, n=200)
        running = asyncio.create_task(text(engine, good, n=200, rid="good"))
        await asyncio.sleep(0.05)  # the good request is decoding when the poisoned one arrives
        with pytest.raises(EngineError, match="injected failure"):
            await text(engine, [POISON, 5, 6], rid="poisoned")
        assert not running.done()
        assert await running == alone  # untouched, and its output is unchanged
        assert await text(engine, good, n=200) == alone

    asyncio.run(main())
    assert engine.failed_steps == 1 and engine.alive()


def test_a_failing_decode_fails_the_batch_then_the_engine_goes_on(faulty):
    model, engine = faulty
    ids = engine.encode_prompt("서울")

    async def main():
        expected = await text(engine, ids, n=8)
        model.fail_decode = True
        results = await asyncio.gather(*(text(engine, ids, rid=f"r{i}") for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, EngineError) for r in results), results
        model.fail_decode = False
        assert await text(engine, ids, n=8) == expected

    asyncio.run(main())
    assert engine.alive() and engine.ready()


def test_an_engine_that_keeps_failing_is_dead_and_health_says_so(faulty):
    from kollm.serve import create_app

    model, engine = faulty
    live = start_server(create_app(engine, model_name="tiny", model_version="1", shutdown_engine=False))
    try:
        body = {"model": "tiny", "prompt": "안녕", "max_tokens": 3}
        assert httpx.post(live.url + "/v1/completions", json=body, timeout=30).status_code == 200
        assert httpx.get(live.url + "/health").status_code == 200
        model.fail_always = True
        for _ in range(MAX_CONSECUTIVE_FAILURES):
            r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
            assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        r = httpx.get(live.url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert httpx.get(live.url + "/ready").status_code == 503
        r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
        assert r.status_code == 503 and "dead" in r.json()["error"]["message"]
    finally:
        live.stop()
    assert not engine.alive()
    with pytest.raises(EngineClosed):
        asyncio.run(text(engine, [1, 2]))
