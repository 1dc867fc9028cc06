"""`kollm serve --backend vllm`: kollm's OpenAI server over vLLM's AsyncLLM (CPU build), driven by the real `openai` client."""

from __future__ import annotations

import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from .conftest import needs_vllm, start_kollm

pytestmark = [needs_vllm, pytest.mark.timeout(900)]

MSG = [{"role": "system", "content": "한국어로 답하세요."}, {"role": "user", "content": "서울은 어떤 도시인가요?"}]
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(vllm_tiny_dir, tmp_path_factory):
    live = start_kollm(
        vllm_tiny_dir, tmp_path_factory.mktemp("serve"), "--served-model-name", "tiny", "--max-batch-size", "16"
    )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def hf_greedy(model_dir, prompt_ids: list[int], n: int) -> list[int]:
    """The model's own greedy continuation with transformers (the reference the engine must reproduce)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def test_served_by_vllm(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert "vLLM engine ready" in server.output()


def test_greedy_completion_is_the_models_greedy_continuation(client, vllm_tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vllm_tiny_dir)
    prompt = "서울은 대한민국의"
    expected = tok.decode(
        hf_greedy(vllm_tiny_dir, tok(prompt)["input_ids"], 12),
        skip_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body=NO_EOS
    )
    assert raw.headers["x-kollm-model-version"] == "local"
    r = raw.parse()
    assert r.choices[0].text == expected.rstrip("\ufffd")  # vLLM drops a last character left unfinished by max_tokens
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12


def test_logprobs_are_the_models_own(client, vllm_tiny_dir):
    """Completions and chat with logprobs through vLLM: one entry per generated token, equal to transformers'
    log-softmax of the model's logits at that step (vLLM's raw logprobs), the top alternatives by rank."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vllm_tiny_dir)
    prompt = "서울은 대한민국의"
    r = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=3, extra_body=NO_EOS
    )
    got = r.choices[0].logprobs
    ids = tok(prompt)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(vllm_tiny_dir, dtype=torch.float32).eval()
    expected = []
    with torch.inference_mode():
        for _ in range(6):
            lp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
            ids.append(int(lp.argmax()))
            expected.append(float(lp.max()))
    assert got.token_logprobs == pytest.approx(expected, abs=2e-3)
    assert all(
        max(top.values()) == pytest.approx(lp, abs=1e-6) for top, lp in zip(got.top_logprobs, got.token_logprobs)
    )
    chat = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=5, logprobs=True, top_logprobs=2, extra_body=NO_EOS
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


def test_echo_with_logprobs_returns_the_prompts_logprobs(client, vllm_tiny_dir):
    """Completions with echo and logprobs through vLLM's prompt_logprobs: the prompt's tokens (given as token ids,
    as lm-eval's local-completions sends them), the first one's logprob null, the rest equal to transformers'."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vllm_tiny_dir)
    ids = tok("서울은 대한민국의 수도입니다.")["input_ids"]
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, logprobs=2, echo=True)
    got = r.choices[0].logprobs
    model = AutoModelForCausalLM.from_pretrained(vllm_tiny_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert len(got.tokens) == len(ids) + 1 and got.token_logprobs[0] is None and got.top_logprobs[0] is None
    assert got.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=2e-3)
    assert r.choices[0].text.startswith(tok.decode(ids))


def test_response_format_constrains_the_output_to_json(client):
    """vLLM's structured outputs behind response_format: a random model answers with the schema's JSON (greedy:
    at temperature 1 the grammar's free whitespace can take the whole budget)."""
    schema = {
        "type": "object",
        "properties": {"city": {"enum": ["서울", "부산"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    assert r.choices[0].finish_reason == "stop", repr(r.choices[0].message.content)
    assert json.loads(r.choices[0].message.content)["city"] in ("서울", "부산")
    r = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=64, temperature=0, response_format={"type": "json_object"}
    )
    text = r.choices[0].message.content
    assert text.startswith("{")  # the unconstrained model does not begin so: the grammar holds from the first token
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    c = client.completions.create(  # completions take response_format too, as vLLM's own server
        model="tiny",
        prompt="도시:",
        max_tokens=64,
        temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}},
    )
    assert c.choices[0].finish_reason == "stop" and json.loads(c.choices[0].text)["city"] in ("서울", "부산")


def test_streaming_chat_equals_non_streaming(client):
    whole = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=20, temperature=0, extra_body=NO_EOS)
    stream = client.chat.completions.create(
        model="tiny",
        messages=MSG,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=NO_EOS,
    )
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content and content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 20 and whole.usage.completion_tokens == 20
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # streamed in pieces, not at the end


def test_seed_n_and_sampling(client):
    kwargs = dict(
        model="tiny",
        prompt="한국어 언어 모델을",
        max_tokens=12,
        temperature=1.0,
        top_p=0.95,
        n=3,
        seed=7,
        extra_body=NO_EOS,
    )
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # the same seed, the same answers
    assert len({c.text for c in a.choices}) > 1  # the n choices differ (seed + index each)
    assert a.usage.completion_tokens == 36


def test_stop_sequences_and_eos(client):
    full = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=30, temperature=0, extra_body=NO_EOS
    )
    text = full.choices[0].text
    stop = text[10:12]
    cut = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=30, temperature=0, stop=[stop], extra_body=NO_EOS
    )
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    natural = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=200, temperature=0)
    assert natural.choices[0].finish_reason in ("stop", "length")  # the end-of-sequence token ends it when sampled


def test_context_limit_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="서울 " * 400, max_tokens=4)


def test_concurrent_streams_match_sequential_answers(client):
    prompts = [f"{i}번째 질문: 서울은" for i in range(12)]

    def ask(prompt: str) -> tuple[str, int]:
        stream = client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=NO_EOS,
        )
        parts, usage = [], 0
        for chunk in stream:
            parts += [c.text for c in chunk.choices]
            usage = chunk.usage.completion_tokens if chunk.usage else usage
        return "".join(parts), usage

    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, prompts))
    alone = [ask(p) for p in prompts[:3]]
    assert all(n == 16 for _, n in together)
    assert together[:3] == alone  # batching does not change greedy answers
    assert len({t for t, _ in together}) > 1


def test_cancelled_stream_frees_its_slot(server, client):
    stream = client.completions.create(
        model="tiny", prompt="취소", max_tokens=200, temperature=0, stream=True, extra_body=NO_EOS
    )
    next(iter(stream))
    stream.close()
    deadline = time.time() + 30
    while time.time() < deadline:
        running = re.search(
            r'^kollm_running_sequences\{model_version="local"\} (\S+)', httpx.get(server.url + "/metrics").text, re.M
        )
        if running and float(running.group(1)) == 0:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the cancelled request still runs")
    after = client.completions.create(model="tiny", prompt="다음", max_tokens=4, temperature=0, extra_body=NO_EOS)
    assert after.usage.completion_tokens == 4


def test_metrics_carry_kollm_and_vllm_families(server, client):
    client.completions.create(model="tiny", prompt="지표", max_tokens=5, temperature=0, extra_body=NO_EOS)
    text = httpx.get(server.url + "/metrics").text
    kollm_out = float(re.search(r'^kollm_output_tokens_total\{model_version="local"\} (\S+)', text, re.M).group(1))
    vllm_out = sum(float(v) for v in re.findall(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)", text, re.M))
    assert kollm_out >= 5 and vllm_out >= kollm_out  # vLLM counted every token kollm returned (and the cancelled ones)
    assert re.search(r"^vllm:num_requests_running\{", text, re.M) and re.search(
        r"^vllm:kv_cache_usage_perc\{", text, re.M
    )
    assert re.search(
        r'^kollm_requests_total\{endpoint="/v1/completions",model_version="local",status_code="200"\}', text, re.M
    )


def test_logs_name_the_requests(server):
    lines = [
        json.loads(x)
        for x in (server.cwd / ".kollm" / "logs" / "inference" / "inference.jsonl").read_text().splitlines()
    ]
    assert lines and all(x.get("request_id") for x in lines)


def test_sigterm_finishes_the_request_in_flight_then_exits(server):
    """Last in this module: stops the shared server the way a process manager does, mid-stream."""
    body = {
        "model": "tiny",
        "prompt": "안녕하세요",
        "max_tokens": 120,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    lines = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as stream:
        for line in stream.iter_lines():
            if line:
                lines.append(line)
                if len(lines) == 2:
                    server.proc.send_signal(signal.SIGTERM)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: ") :])["usage"]["completion_tokens"] == 120  # finished, not cut
    server.proc.wait(timeout=120)
    output = server.output()
    assert "Application shutdown complete" in output and "Traceback" not in output, output[-4000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)
