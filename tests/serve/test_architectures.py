"""The native engine's static path (kollm.serve.kv.StaticKV) for every architecture of the released Korean bases,
each a tiny random model built from its transformers config class (kollm.train.architectures): its greedy token
ids must equal transformers' `generate`. Plus what `kollm serve` says about the path it took."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest
import torch

from kollm.serve.engine import TransformersEngine, load_engine
from kollm.serve.kv import StaticKV, static_kv_unsupported
from kollm.train import architectures
from tests.tiny import CORPUS

NEW_TOKENS = 40
QUESTIONS = ["안녕하세요", "서울은 대한민국의 수도입니다. The quick brown fox jumps over the lazy dog."]
# initializer ranges that give varied greedy outputs (gemma3's scaled embeddings saturate above ~0.1)
INIT = {"gemma3": 0.05, "gemma2": 0.05, "exaone4": 0.1}
WINDOW = 8  # sliding-window layers (mistral, gemma3, exaone4): prompts plus 40 tokens run well past it


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One tiny folder per architecture, shared by the module (and built lazily)."""
    root = tmp_path_factory.mktemp("archs")
    made: dict[str, object] = {}

    def get(arch: str):
        if arch not in made:
            made[arch] = architectures.build_folder(
                root / arch, arch, CORPUS, initializer_range=INIT.get(arch, 0.5), sliding_window=WINDOW
            )
        return made[arch]

    return get


def _model(arch: str, folders):
    model, tok = _built(arch, folders)
    with torch.no_grad():  # norms away from their initial ones (and gemma's zeros), so that each one counts
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, tok


def _built(arch: str, folders):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if arch == "gemma2":  # gemma3's sibling with attention logit soft-capping (gemma3 applies none)
        from transformers import Gemma2Config, Gemma2ForCausalLM

        tok = AutoTokenizer.from_pretrained(folders("gemma3"))
        config = Gemma2Config(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=2.0,  # a small cap, so that capping changes the outputs
            final_logit_softcapping=3.0,  # changes the logits, not their order
            tie_word_embeddings=False,  # tied, this random model predicts its input token
            max_position_embeddings=256,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            initializer_range=0.1,
        )
        torch.manual_seed(0)
        return Gemma2ForCausalLM(config).eval(), tok
    from transformers import AutoConfig

    path = folders(arch)
    config = AutoConfig.from_pretrained(path)
    if arch == "gemma3":  # a scale other than head_dim**-0.5, a final cap; an attention cap gemma3 ignores
        config.update({"query_pre_attn_scalar": 5, "final_logit_softcapping": 3.0, "attn_logit_softcapping": 1.0})
    model = AutoModelForCausalLM.from_pretrained(path, config=config).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _prompts(tok) -> list[list[int]]:
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _static_greedy(model, prompts: list[list[int]], windows: list | None = None, softcap: bool = True):
    """Greedy decoding through StaticKV: the first prompt alone for 5 steps, then the second joins the batch.
    `windows` replaces each layer's sliding window, softcap=False drops the attention soft-capping (to show that
    they change the outputs)."""
    with torch.inference_mode():
        kv = StaticKV(model, slots=4, context_length=256)
        if windows is not None:
            kv.windows = windows
        if not softcap:
            kv.spec = dataclasses.replace(kv.spec, softcap=None)
        out: list[list[int]] = []
        for i, prompt in enumerate(prompts):
            handle, logits = kv.prefill([prompt])
            first = logits.argmax(-1)
            kv.join(handle, first)
            out.append([int(first[0])])
            for _ in range(5 if i < len(prompts) - 1 else 0):
                step = kv.decode().argmax(-1)
                kv.advance(step)
                for row, t in zip(out, step):
                    row.append(int(t))
        while min(len(r) for r in out) < NEW_TOKENS:
            step = kv.decode().argmax(-1)
            kv.advance(step)
            for row, t in zip(out, step):
                row.append(int(t))
    return [r[:NEW_TOKENS] for r in out]


@pytest.mark.parametrize("arch", [*architectures.ARCHITECTURES, "gemma2"])
def test_static_path_gives_the_token_ids_of_transformers_generate(arch, folders):
    model, tok = _model(arch, folders)
    assert static_kv_unsupported(model) is None
    prompts = _prompts(tok)
    with torch.inference_mode():  # the prefill's logits (final soft-capping included) are the model's own
        _, logits = StaticKV(model, slots=2, context_length=256).prefill(prompts)
        for row, ids in zip(logits, prompts):
            torch.testing.assert_close(row, model(torch.tensor([ids])).logits[0, -1], atol=1e-4, rtol=1e-4)
    expected = []
    for ids in prompts:
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        expected.append(out[0, len(ids) :].tolist())
    assert _static_greedy(model, prompts) == expected
    assert all(len(set(e)) >= 4 for e in expected)  # varied outputs: the comparison means something
    if arch in ("mistral", "gemma3", "exaone4", "gemma2"):  # the windows matter here: ignoring them differs
        assert any(w == WINDOW for w in layer_windows_of(model))
        assert _static_greedy(model, prompts, windows=[None] * len(model.model.layers)) != expected
    if arch == "gemma2":
        assert _static_greedy(model, prompts, softcap=False) != expected
    # windowed or soft-capped layers decode with PyTorch's attention, even where the Triton kernels are asked for
    with torch.inference_mode():
        fused = StaticKV(model, slots=1, context_length=64, fused_attention=True).fused_attention
    assert fused is (arch in ("llama", "qwen2", "qwen3"))


def layer_windows_of(model) -> list:
    from kollm.serve.kv import layer_windows

    return layer_windows(model.config)


def test_a_model_the_static_path_cannot_serve_says_why_in_the_log_and_on_health(tmp_path, caplog):
    """A GPT-2 folder: `--kv-cache auto` serves it with the dynamic cache and says why; `--backend auto` says that
    vLLM does not import here (it is not installed in this environment)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from kollm.serve.vllm_engine import vllm_importable

    tok = architectures.train_tokenizer(CORPUS, 300, "qwen2")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    tok.save_pretrained(tmp_path / "gpt2")
    with caplog.at_level(logging.INFO, logger="kollm.serve"):
        engine = load_engine(tmp_path / "gpt2", device="cpu" if vllm_importable() else "auto")
    assert isinstance(engine, TransformersEngine) and engine.kv_cache == "dynamic"
    assert "dynamic KV cache for gpt2 (the static path cannot serve this model: model type 'gpt2'" in (
        engine.serving_path
    )
    if not vllm_importable():
        assert engine.serving_path.startswith("native engine (--backend auto: vLLM does not import here)")
    assert f"serving path: {engine.serving_path}" in caplog.text

    from fastapi.testclient import TestClient

    from kollm.serve.router import create_app

    with TestClient(create_app(engine, model_name="gpt2")) as client:
        assert client.get("/health").json() == {"status": "ok", "serving_path": engine.serving_path}
    asyncio.run(engine.shutdown())


def test_on_cpu_auto_names_the_static_path_it_could_take(folders):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = folders("exaone4")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    engine = TransformersEngine(model, tok, kv_cache="auto")
    assert engine.serving_path == (
        "native engine (--backend transformers), dynamic KV cache for exaone4 "
        "(--kv-cache auto on cpu; the static path can serve this model: --kv-cache static)"
    )
    asyncio.run(engine.shutdown())
