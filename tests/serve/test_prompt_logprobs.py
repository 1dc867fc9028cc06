"""Prompt logprobs (`/v1/completions` with echo and logprobs), what lm-evaluation-harness's `local-completions`
model needs for log-likelihood tasks: checked against the model's own forward pass, and lm-eval run against a real
`kollm serve` process gives the same accuracy and per-choice log-likelihoods as kollm's in-process evaluation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import httpx
import pytest

from kollm.serve.engine import MAX_PROMPT_LOGPROBS_TOKENS

from .conftest import free_port, wait_ready


def _reference(model_dir, ids: list[int]):
    """Each prompt token's logprob under the model, from transformers directly."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        lp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return lp


def test_echo_with_logprobs_returns_the_prompt_tokens_with_their_logprobs(tiny_server, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "서울은 대한민국의 수도입니다."
    ids = tok(prompt)["input_ids"]
    lp = _reference(tiny_model_dir, ids)
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 3}
    choice = httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    got = choice["logprobs"]
    assert choice["text"].startswith(prompt)
    assert len(got["tokens"]) == len(ids) + 2 and got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    assert got["tokens"][: len(ids)] == [tok.decode([i]) for i in ids]
    for pos in range(1, len(ids)):
        assert math.isclose(got["token_logprobs"][pos], float(lp[pos - 1, ids[pos]]), abs_tol=1e-4)
        top = lp[pos - 1].topk(3)
        want = [(tok.decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices)]
        # two tokens may read alike (byte fragments of one character): the likelier one stays
        assert got["top_logprobs"][pos] == pytest.approx(dict(reversed(want)), abs=1e-4)
    assert got["text_offset"] == [sum(len(t) for t in got["tokens"][:k]) for k in range(len(got["tokens"]))]

    # the same as token ids, streamed: the first chunk carries the echo and the prompt's logprobs
    body = {**body, "prompt": ids, "stream": True, "max_tokens": 1}
    with httpx.stream("POST", tiny_server.url + "/v1/completions", json=body, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    first = json.loads(events[0])["choices"][0]
    assert first["text"].startswith(prompt) and first["logprobs"]["token_logprobs"][0] is None
    assert first["logprobs"]["token_logprobs"][1 : len(ids)] == got["token_logprobs"][1 : len(ids)]


def test_prompt_logprob_limits_and_bad_token_ids_are_400s(tiny_server):
    url = tiny_server.url + "/v1/completions"
    long = [5] * (MAX_PROMPT_LOGPROBS_TOKENS + 1)
    r = httpx.post(url, json={"model": "tiny", "prompt": long, "echo": True, "logprobs": 1, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert f"at most {MAX_PROMPT_LOGPROBS_TOKENS} tokens" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "tiny", "prompt": [3, 99999], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert "token id 99999 is outside this model's vocabulary" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": "tiny", "prompt": [3, -1], "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt")


def _samples(out: dict) -> dict[int, list[float]]:
    """doc id -> the log-likelihood of each choice, from lm-eval's logged samples."""
    return {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in out["samples"]["ko_quickstart_mc"]}


@pytest.fixture(scope="module")
def kollm_serve(tiny_model_dir, tmp_path_factory):
    """`kollm serve` of the tiny model as a user runs it (a separate process on 127.0.0.1)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kollm.cli", "serve", str(tiny_model_dir), "--port", str(port)]
        + ["--served-model-name", "tiny", "--device", "cpu"],
        cwd=tmp_path_factory.mktemp("serve"),
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow(reason="a `kollm serve` process and three lm-eval runs")
def test_lm_eval_local_completions_matches_kollms_in_process_evaluation(kollm_serve, tiny_model_dir, tmp_path):
    import lm_eval

    from kollm.eval.harness import LmEvalConfig, run_lm_eval, task_manager

    cfg = LmEvalConfig(tasks=["ko_quickstart_mc"], limit=6, batch_size=8)
    in_process = run_lm_eval(tiny_model_dir, cfg, tmp_path, "cpu")
    manager = task_manager(cfg, tmp_path)
    common = dict(tasks=["ko_quickstart_mc"], limit=6, task_manager=manager, log_samples=True, bootstrap_iters=0)
    served = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": "tiny",
            "base_url": kollm_serve + "/v1/completions",
            "tokenizer": str(tiny_model_dir),
            "tokenizer_backend": "huggingface",
            "max_length": 256,
            "num_concurrent": 4,
        },
        **common,
    )
    local = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(tiny_model_dir), "dtype": "float32"}, device="cpu", **common
    )
    acc = served["results"]["ko_quickstart_mc"]
    assert acc["acc,none"] == in_process["ko_quickstart_mc.acc"]
    assert acc["acc_norm,none"] == in_process["ko_quickstart_mc.acc_norm"]
    got, want = _samples(served), _samples(local)
    assert got.keys() == want.keys() and len(got) == 6
    for doc, lls in want.items():
        assert len(got[doc]) == len(lls) >= 2
        assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(got[doc], lls)), (doc, got[doc], lls)
