"""The native engine's sampler on the tiny model: safe at every value the API accepts, penalties and logit_bias
equal to a plain reference loop, and logprobs equal to the model's own log-softmax."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kollm.serve import grammar
from kollm.serve.engine import SAMPLING_EPS, RequestError, SamplingParams, TransformersEngine, sample
from kollm.serve.protocol import ChatCompletionRequest


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def engine(hf):
    eng = TransformersEngine(*hf, max_batch_size=8)
    yield eng
    asyncio.run(eng.shutdown())


def generate(engine, prompt_ids, **params):
    async def main():
        return [c async for c in engine.generate(prompt_ids, SamplingParams(**params), "t")]

    return asyncio.run(main())


def reference(hf, ids, n, *, presence=0.0, frequency=0.0, repetition=1.0, bias=()):
    """Greedy decoding with OpenAI presence/frequency penalties, vLLM's repetition penalty and logit_bias,
    recomputing the whole sequence each step: the plain loop the engine must match."""
    model, _ = hf
    seq, out = list(ids), []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1].float().clone()
            for t in set(seq):
                logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
            for t in set(out):
                logits[t] -= presence + frequency * out.count(t)
            for t, b in bias:
                logits[t] += b
            out.append(int(logits.argmax()))
            seq.append(out[-1])
    return out


@pytest.fixture()
def probe(engine, monkeypatch):
    """Record the token ids the engine accepts (its `_accept`), to compare with the reference loop."""
    seen: list[int] = []
    original = engine._accept

    def accept(seqs, tokens, nlls, logprobs):
        seen.extend(tokens)
        original(seqs, tokens, nlls, logprobs)

    monkeypatch.setattr(engine, "_accept", accept)
    return seen


@pytest.mark.parametrize(
    "params",
    [
        dict(presence_penalty=2.0),
        dict(frequency_penalty=1.5, presence_penalty=-0.5),
        dict(repetition_penalty=1.8),
        dict(repetition_penalty=0.5),
        dict(logit_bias=((7, 100.0),)),
        dict(logit_bias=((5, -100.0), (9, 50.0), (11, 49.0))),
    ],
    ids=["presence", "frequency", "repetition", "repetition<1", "bias+100", "bias-mixed"],
)
def test_penalties_and_bias_equal_the_reference_loop(hf, engine, probe, params):
    ids = engine.encode_prompt("한국어 언어 모델을 학습하고 서빙합니다.")
    generate(engine, ids, max_tokens=12, temperature=0, ignore_eos=True, **params)
    expected = reference(
        hf,
        ids,
        12,
        presence=params.get("presence_penalty", 0.0),
        frequency=params.get("frequency_penalty", 0.0),
        repetition=params.get("repetition_penalty", 1.0),
        bias=params.get("logit_bias", ()),
    )
    assert probe == expected
    if "logit_bias" in params and params["logit_bias"][0][1] == 100.0:
        assert set(probe) == {7}


def test_penalties_change_greedy_output(hf, engine):
    ids = engine.encode_prompt("한국어 언어 모델을 학습하고 서빙합니다.")
    plain = reference(hf, ids, 12)
    for kwargs in (dict(presence=2.0), dict(frequency=1.5, presence=-0.5), dict(repetition=1.8), dict(repetition=0.5)):
        assert reference(hf, ids, 12, **kwargs) != plain, (
            kwargs
        )  # so the equalities above are not vacuous for this model


@pytest.mark.parametrize("temperature", [1e-38, 1e-30, SAMPLING_EPS / 2, SAMPLING_EPS, 1e-4, 2.0])
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"top_p": 0.0},
        {"top_p": 1e-12},
        {"top_k": 1},
        {"min_p": 1.0},
        {"repetition_penalty": 0.01, "presence_penalty": -2.0},
    ],
)
def test_every_temperature_the_schema_accepts_is_safe(engine, temperature, extra):
    ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": temperature, **extra}
    )
    chunks = generate(
        engine, engine.encode_prompt("서울은"), max_tokens=6, temperature=temperature, ignore_eos=True, **extra
    )
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 6
    assert engine.alive() and engine.failed_steps == 0


def test_tiny_temperature_is_greedy(engine):
    ids = engine.encode_prompt("The quick brown fox")
    greedy = "".join(c.text for c in generate(engine, ids, max_tokens=10, temperature=0, ignore_eos=True))
    for t in (1e-38, SAMPLING_EPS / 10):
        assert (
            "".join(c.text for c in generate(engine, ids, max_tokens=10, temperature=t, ignore_eos=True, seed=3))
            == greedy
        )


def test_sampler_survives_non_finite_logits(engine):
    class Row:
        def __init__(self, **p):
            self.params = SamplingParams(max_tokens=1, **p)
            self.generator, self.counts, self.seen, self.bias = None, None, None, None
            self.processed, self.greedy = False, self.params.temperature < SAMPLING_EPS

    logits = torch.tensor(
        [
            [float("nan")] * 4,
            [float("inf"), 0.0, float("inf"), -1.0],
            [float("-inf")] * 4,
            [3.0e38, -3.0e38, 0.0, 1.0],
            [float("nan"), 1.0, 2.0, float("nan")],
        ]
    )
    for p in (
        {"temperature": 0.0},
        {"temperature": 1e-5},
        {"temperature": 2.0, "top_p": 0.5},
        {"temperature": 1.0, "top_k": 2, "min_p": 0.5},
    ):
        chosen = sample(logits, [Row(**p) for _ in range(len(logits))])
        assert chosen.shape == (5,) and bool(((chosen >= 0) & (chosen < 4)).all())
        assert int(chosen[4]) == 2 and int(chosen[3]) == 0


def test_logprobs_are_the_models_log_softmax(hf, engine):
    model, tok = hf
    ids = engine.encode_prompt("오늘 날씨")
    chunks = generate(engine, ids, max_tokens=5, temperature=0, ignore_eos=True, logprobs=3)
    lps = [lp for c in chunks for lp in c.logprobs]
    assert len(lps) == 5
    seq = list(ids)
    with torch.inference_mode():
        for lp in lps:
            dist = model(torch.tensor([seq])).logits[0, -1].float().log_softmax(-1)
            top = dist.topk(3)
            assert [t for t, _ in lp.top] == [tok.decode([int(i)]) for i in top.indices]
            assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)
            assert lp.token == lp.top[0][0] and lp.logprob == pytest.approx(
                float(top.values[0]), abs=1e-4
            )  # greedy: the top token
            seq.append(int(top.indices[0]))
    sampled = generate(engine, ids, max_tokens=8, temperature=1.0, seed=5, ignore_eos=True, logprobs=0)
    assert all(
        lp.top == () and -9999.0 <= lp.logprob <= 0.0 and math.isfinite(lp.logprob)
        for c in sampled
        for lp in c.logprobs
    )


def test_bad_logit_bias_and_response_format_are_request_errors(engine, monkeypatch):
    with pytest.raises(RequestError) as e:
        generate(engine, [1, 2], max_tokens=2, logit_bias=((10**6, 1.0),))
    assert e.value.param == "logit_bias"
    for schema, says in [('{"type": "nope"}', 'Unsupported type "nope"'), ('{"type": ', "Expecting value")]:
        with pytest.raises(RequestError) as e:
            generate(engine, [1, 2], max_tokens=2, response_format="json_schema", json_schema=schema)
        assert e.value.param == "response_format" and says in str(e.value) and ".cc:" not in str(e.value)
    monkeypatch.setattr(grammar, "available", lambda: False)  # a server installed without the json extra
    with pytest.raises(RequestError) as e:
        generate(engine, [1, 2], max_tokens=2, response_format="json_object")
    assert e.value.param == "response_format" and "kollm[json]" in str(e.value)


CITY = {
    "type": "object",
    "properties": {"city": {"enum": ["부산", "서울"]}, "ok": {"type": "boolean"}},
    "required": ["city", "ok"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_response_format_constrains_output_to_json_beside_free_requests(hf, kv_cache):
    """json_schema and json_object requests (greedy and seeded sampling) batched with a free one: each constrained
    output parses and validates, ending with "stop" once its JSON is complete; the free request, which writes no
    JSON here, gets exactly what it gets alone."""
    import jsonschema

    engine = TransformersEngine(*hf, max_batch_size=8, kv_cache=kv_cache)
    ids = engine.encode_prompt("도시는")
    schema = json.dumps(CITY)
    requests = [
        SamplingParams(max_tokens=200, temperature=0, response_format="json_schema", json_schema=schema),
        SamplingParams(max_tokens=200, temperature=1.0, seed=3, response_format="json_schema", json_schema=schema),
        SamplingParams(max_tokens=200, temperature=0, response_format="json_object"),
        SamplingParams(max_tokens=200, temperature=1.0, seed=4, response_format="json_object"),
        SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
    ]

    async def one(i: int, params: SamplingParams):
        chunks = [c async for c in engine.generate(ids, params, f"r{i}")]
        return "".join(c.text for c in chunks), chunks[-1].finish_reason

    async def main():
        together = await asyncio.gather(*(one(i, p) for i, p in enumerate(requests)))
        alone = await one(9, requests[-1])
        await engine.shutdown()
        return together, alone

    together, alone = asyncio.run(main())
    for text, finish in together[:2]:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), CITY)
    for text, finish in together[2:4]:
        assert finish == "stop" and isinstance(json.loads(text), dict), text
    free, _ = together[-1]
    assert free == alone[0]
    with pytest.raises(ValueError):
        json.loads(free)  # the model writes no JSON unless constrained: the checks above mean something
