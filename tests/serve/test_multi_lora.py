"""Many LoRA adapters on one base in the native engine (kollm.serve.multi_lora): each adapter's greedy answers equal
PEFT's merged model's; one batch mixes adapters and the base; adapters load on first use and are evicted least
recently used beyond max_adapters, with no request failing under concurrent load. On both KV caches: the dynamic
one (Hugging Face's forward through the wrapped layers) and the static one (kollm.serve.kv.StaticKV's own layer
code), there also in the shapes its CUDA graphs have (run eagerly: padded prompts and rows, the spare slot)."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kollm.errors import ConfigError
from kollm.serve.engine import RequestError, SamplingParams, TransformersEngine
from kollm.serve.kv import StaticKV
from kollm.serve.multi_lora import AdapterBank
from tests.serve.test_kv import CUDA, eager_graph_shapes

TOKENS = 6
PROMPTS = ["서울은 대한민국의", "The quick brown", "한국어 언어 모델을", "0123"]
# longer than one prefix-cache block (16 tokens): its blocks are cached, per adapter
LONG = "kollm serves models with an OpenAI compatible API. 서울은 대한민국의 수도입니다."
# the engine's KV cache: dynamic, static, or static in its CUDA graphs' shapes (run eagerly on CPU)
CACHES = ["dynamic", "static", "graph_shapes"]
# three adapters with different ranks and target modules
SHAPES = {"ko": (4, ["q_proj", "v_proj"]), "en": (8, ["o_proj", "down_proj", "up_proj"]), "mix": (2, "all-linear")}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (name, (r, targets)) in enumerate(SHAPES.items()):
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
        model = get_peft_model(base, cfg)
        with torch.no_grad():  # strong random adapters: each changes the greedy answers
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def _greedy(model, ids: list[int]) -> list[int]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(TOKENS):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapters) -> dict[tuple[str | None, str], list[int]]:
    """Greedy tokens of PEFT's merged model for each adapter (None: the base) and prompt."""
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    models = {None: base} | {
        n: PeftModel.from_pretrained(copy.deepcopy(base), str(f)).merge_and_unload().eval() for n, f in adapters.items()
    }
    out = {}
    for name, model in models.items():
        for p in [*PROMPTS, LONG]:
            out[(name, p)] = _greedy(model, tok(p)["input_ids"])
    assert len({tuple(out[(n, PROMPTS[0])]) for n in models}) > 1  # the adapters change the answers
    return out


def _engine(
    tiny_model_dir, adapters, max_adapters: int, cache: str = "dynamic", monkeypatch=None
) -> TransformersEngine:
    if cache == "graph_shapes":  # StaticKV as on CUDA (batch and prompt buckets, padding rows), steps run eagerly
        assert monkeypatch is not None
        eager_graph_shapes(monkeypatch)
        init = StaticKV.__init__
        monkeypatch.setattr(StaticKV, "__init__", lambda self, model, **kw: init(self, model, **kw, cuda_graphs=True))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    bank = AdapterBank(model, dict(adapters), max_adapters=max_adapters)
    kv_cache = "dynamic" if cache == "dynamic" else "static"
    return TransformersEngine(
        model, AutoTokenizer.from_pretrained(tiny_model_dir), max_batch_size=16, adapters=bank, kv_cache=kv_cache
    )


async def _answers(engine, jobs, prefix: str, stagger: float = 0.0) -> list:
    """Every (adapter, prompt) job at once, greedy: its text, or the exception it raised."""
    try:

        async def one(n, p, i):
            ids = engine.encode_prompt(p)
            params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True, adapter=n)
            await asyncio.sleep(stagger * (i % 4))
            return "".join([c.text async for c in engine.generate(ids, params, f"{prefix}{i}")])

        return await asyncio.gather(*(one(n, p, i) for i, (n, p) in enumerate(jobs)), return_exceptions=True)
    finally:
        await engine.shutdown()


@pytest.mark.parametrize("cache", CACHES)
def test_each_adapter_answers_as_its_merged_model_in_one_mixed_batch(
    tiny_model_dir, adapters, expected, cache, monkeypatch
):
    engine = _engine(tiny_model_dir, adapters, 3, cache, monkeypatch)
    assert engine.kv_cache == ("dynamic" if cache == "dynamic" else "static")
    jobs = [(name, p) for name in (None, *adapters) for p in PROMPTS]
    answers = asyncio.run(_answers(engine, jobs, "r"))
    for (n, p), got in zip(jobs, answers):
        assert got == engine.decode(expected[(n, p)]), (n, p)
    stats = engine.adapters.stats()
    assert all(s["loads"] == 1 and s["evictions"] == 0 and s["requests"] == len(PROMPTS) for s in stats.values())
    assert engine.adapters.mixed_passes > 0  # decode steps ran rows of different adapters together


@pytest.mark.parametrize("cache", CACHES)
def test_adapters_beyond_max_are_evicted_lru_with_no_failed_request(
    tiny_model_dir, adapters, expected, cache, monkeypatch
):
    engine = _engine(tiny_model_dir, adapters, 1, cache, monkeypatch)  # three adapters through one slot
    names = list(adapters)
    jobs = [(names[i % 3], PROMPTS[i % len(PROMPTS)]) for i in range(18)] + [(None, PROMPTS[0])] * 3
    answers = asyncio.run(_answers(engine, jobs, "e", stagger=0.01))
    failed = [a for a in answers if isinstance(a, BaseException)]
    assert not failed, failed[:3]
    for (n, p), got in zip(jobs, answers):
        assert got == engine.decode(expected[(n, p)]), (n, p)
    stats = engine.adapters.stats()
    assert sum(s["loaded"] for s in stats.values()) == 1
    assert all(s["loads"] >= 1 for s in stats.values()) and sum(s["evictions"] for s in stats.values()) >= 2


def test_unknown_adapter_and_a_non_lora_layer_are_clear_errors(tiny_model_dir, adapters, tmp_path):
    engine = _engine(tiny_model_dir, adapters, max_adapters=2)

    async def ask():
        try:
            params = SamplingParams(max_tokens=2, adapter="nope")
            async for _ in engine.generate(engine.encode_prompt("안녕"), params, "x"):
                pass
        finally:
            await engine.shutdown()

    with pytest.raises(RequestError, match="no adapter 'nope'.*en, ko, mix"):
        asyncio.run(ask())
    with pytest.raises(ConfigError, match="--speculative ngram does not run with --adapters"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        TransformersEngine(
            model,
            AutoTokenizer.from_pretrained(tiny_model_dir),
            kv_cache="static",
            speculative="ngram",
            adapters=AdapterBank(model, dict(adapters), 1),
        )
    with pytest.raises(ConfigError, match="--max-adapters"):
        AdapterBank(AutoModelForCausalLM.from_pretrained(tiny_model_dir), dict(adapters), max_adapters=0)
    with pytest.raises(ConfigError, match="not a LoRA adapter"):
        AdapterBank(AutoModelForCausalLM.from_pretrained(tiny_model_dir), {"x": tmp_path}, max_adapters=1)


def test_the_prefix_cache_keeps_each_adapters_blocks_apart(tiny_model_dir, adapters, expected, monkeypatch):
    """One long prompt asked of every adapter and the base in turn, twice: each answer is its own merged model's
    (a block cached under one adapter is never reused by another), and the second round reuses cached blocks."""
    engine = _engine(tiny_model_dir, adapters, 3, "graph_shapes", monkeypatch)
    assert len(engine.encode_prompt(LONG)) > 16  # at least one full cached block
    order: list[str | None] = ["ko", "en", None, "mix"]

    async def run():
        out = []
        for round_ in range(2):
            for n in order:
                ids = engine.encode_prompt(LONG)
                params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True, adapter=n)
                out.append("".join([c.text async for c in engine.generate(ids, params, f"p{round_}{n}")]))
            if round_ == 0:
                assert engine.prefix_cache_hit_tokens() == 0  # every adapter's blocks are its own
        await engine.shutdown()
        return out

    answers = asyncio.run(run())
    assert answers == [engine.decode(expected[(n, LONG)]) for n in order] * 2
    assert engine.prefix_cache_hit_tokens() >= 16 * len(order)


@CUDA
def test_adapters_on_cuda_run_the_static_cache_in_cuda_graphs(tiny_model_dir, adapters, expected):
    """On CUDA `--kv-cache auto` with adapters is the static cache, every step a replayed CUDA graph; the answers
    are the merged models' (float32 here: the same greedy tokens as on CPU)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda()
    bank = AdapterBank(model, dict(adapters), max_adapters=2)
    engine = TransformersEngine(model, AutoTokenizer.from_pretrained(tiny_model_dir), max_batch_size=16, adapters=bank)
    assert engine.kv_cache == "static"
    jobs = [(name, p) for name in (None, *adapters) for p in PROMPTS]
    answers = asyncio.run(_answers(engine, jobs, "g"))
    assert answers == [engine.decode(expected[job]) for job in jobs]
    assert engine._kv is not None and engine._kv.graphs


def test_the_least_recently_used_idle_adapter_is_evicted(tiny_model_dir, adapters):
    bank = AdapterBank(AutoModelForCausalLM.from_pretrained(tiny_model_dir), dict(adapters), max_adapters=2)
    assert bank.acquire("ko", set()) == 1 and bank.acquire("en", set()) == 2
    assert bank.acquire("ko", set()) == 1  # ko is now the most recently used
    assert bank.acquire("mix", {"ko", "en"}) is None  # both slots run requests: mix waits
    assert bank.acquire("mix", set()) == 2  # en, the least recently used, leaves
    stats = bank.stats()
    assert stats["en"] == {"loaded": 0, "loads": 1, "evictions": 1, "requests": 1}
    assert stats["ko"]["loaded"] == 1 and stats["ko"]["evictions"] == 0


@pytest.mark.slow(reason="starts a `kollm serve` process")
def test_kollm_serve_adapters_by_model_name_with_eviction_and_metrics(tiny_model_dir, adapters, expected, tmp_path):
    """`kollm serve BASE --adapters NAME=URI ... --max-adapters 1`: a real server on 127.0.0.1, the openai client,
    requests of three adapters and the base at once, each answered as its merged model, none failing."""
    import json
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from openai import OpenAI

    from tests.serve.conftest import free_port, wait_ready

    port = free_port()
    args = [a for n, f in adapters.items() for a in ("--adapters", f"{n}={f}")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "kollm.cli", "serve", str(tiny_model_dir), "--port", str(port), "--served-model-name"]
        + ["base", "--device", "cpu", "--max-adapters", "1", *args],
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        client = OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert sorted(m.id for m in client.models.list().data) == ["base", "en", "ko", "mix"]
        jobs = [(n, p) for n in ("base", *adapters) for p in PROMPTS[:2]] * 2

        def ask(job):
            name, prompt = job
            r = client.completions.create(
                model=name, prompt=prompt, max_tokens=TOKENS, temperature=0, extra_body={"ignore_eos": True}
            )
            return r.model, r.choices[0].text

        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        for (name, prompt), (model, text) in zip(jobs, answers):
            assert model == name
            assert text == tok.decode(expected[(None if name == "base" else name, prompt)]), (name, prompt)
        missing = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 1})
        assert missing.status_code == 404 and "'base', 'ko', 'en', 'mix'" in missing.text
        scrape = httpx.get(url + "/metrics").text
        for name in adapters:
            assert f'kollm_adapter_requests_total{{adapter="{name}",model_version="local"}} 4.0' in scrape
            assert (
                f'kollm_adapter_output_tokens_total{{adapter="{name}",model_version="local"}} {4.0 * TOKENS}' in scrape
            )
        log = (tmp_path / ".kollm" / "logs" / "inference" / "inference.jsonl").read_text(encoding="utf-8")
        logged = [json.loads(line).get("adapter") for line in log.splitlines()]
        assert sorted(a for a in logged if a) == sorted([n for n in adapters] * 4) and logged.count(None) == 4
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_adapters_of_another_base_are_refused_naming_both_digests(tiny_model_dir, adapters, tmp_path):
    import json
    import shutil

    from kollm.adapter import AdapterBaseMismatch
    from kollm.pipeline.artifacts import folder_digest
    from kollm.serve.engine import load_engine

    other = tmp_path / "ko"
    shutil.copytree(adapters["ko"], other)
    wrong = "sha256:" + "1" * 64
    (other / "kollm.json").write_text(json.dumps({"lora": {"merged": False, "base": {"digest": wrong, "path": None}}}))
    with pytest.raises(AdapterBaseMismatch) as e:
        load_engine(tiny_model_dir, backend="transformers", device="cpu", adapters={"ko": other})
    assert wrong in str(e.value) and folder_digest(tiny_model_dir) in str(e.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--adapters", "ko"], "--adapters ko: expected NAME=URI"),
        (["--adapters", "ko=./x", "--canary", "models:/m@challenger"], "--adapters is not supported with --canary"),
        (
            ["--adapters-from-lineage", "--canary", "models:/m@challenger"],
            "--adapters-from-lineage is not supported with --canary",
        ),
    ],
)
def test_bad_adapters_options_are_one_clear_message(args, message, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "kollm.cli", "serve", "./model", *args], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 2 and message in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow(reason="starts a `kollm serve` process")
def test_adapters_found_by_lineage_to_the_base(tiny_model_dir, adapters, expected, tmp_path):
    """`kollm serve BASE --adapters-from-lineage`: every registered adapter whose kollm.base_model_digest is the
    base's, under its registered name (its champion version), and none of another base."""
    import os
    import subprocess
    import sys

    import httpx

    from kollm.adapter import BASE_DIGEST_TAG
    from kollm.pipeline.artifacts import folder_digest
    from kollm.pipeline.tracking import client_for
    from tests.serve.conftest import free_port, wait_ready

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "kollm.yaml").write_text(f"project: p\ntracking:\n  uri: {uri}\nsteps:\n  - kind: python\n")
    client, digest = client_for(uri), folder_digest(tiny_model_dir)
    for name, folders, tag in [
        ("ko-lora", [adapters["ko"], adapters["en"]], digest),  # v1 champion (ko), v2 newer (en)
        ("mix-lora", [adapters["mix"]], digest),
        ("stray-lora", [adapters["en"]], "sha256:" + "1" * 64),  # trained on another base
    ]:
        client.create_registered_model(name)
        for folder in folders:
            client.create_model_version(name, source=str(folder), tags={BASE_DIGEST_TAG: tag})
    client.set_registered_model_alias("ko-lora", "champion", "1")

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kollm.cli", "serve", str(tiny_model_dir), "--port", str(port), "--served-model-name"]
        + ["base", "--device", "cpu", "--adapters-from-lineage"],
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        models = httpx.get(url + "/v1/models").json()["data"]
        assert sorted(m["id"] for m in models) == ["base", "ko-lora", "mix-lora"]
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        for name, adapter in [("ko-lora", "ko"), ("mix-lora", "mix"), ("base", None)]:
            r = httpx.post(
                url + "/v1/completions",
                json={"model": name, "prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True},
                timeout=60,
            )
            assert r.json()["choices"][0]["text"] == tok.decode(expected[(adapter, PROMPTS[0])]), name
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_adapters_from_lineage_with_none_registered_is_one_clear_message(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    from kollm.pipeline.artifacts import folder_digest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "kollm.yaml").write_text(f"project: p\ntracking:\n  uri: {uri}\nsteps:\n  - kind: python\n")
    proc = subprocess.run(
        [sys.executable, "-m", "kollm.cli", "serve", str(tiny_model_dir), "--port", "0", "--adapters-from-lineage"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "no registered LoRA adapter was trained on this base" in out, out
    assert folder_digest(tiny_model_dir) in out
    assert "Traceback" not in out


def test_an_adapter_added_later_must_fit_the_wrapped_layers(tiny_model_dir, adapters):
    bank = AdapterBank(AutoModelForCausalLM.from_pretrained(tiny_model_dir), {"ko": adapters["ko"]}, max_adapters=2)
    bank.add("ko2", adapters["ko"])
    assert sorted(bank.adapters) == ["ko", "ko2"] and bank.acquire("ko2", set()) == 1
    with pytest.raises(ConfigError, match="adapter en .* adapts model.layers.0.mlp.down_proj"):
        bank.add("en", adapters["en"])
    with pytest.raises(ConfigError, match="adapter ko is served already"):
        bank.add("ko", adapters["ko"])
