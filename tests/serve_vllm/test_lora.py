"""A model folder that carries an unmerged LoRA adapter (kollm.json `lora.merged: false`) is served by vLLM with a
LoRARequest on every request: the answers are the adapted model's, not the base weights'."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from .conftest import needs_vllm, save_vllm_tiny, start_kollm

pytestmark = [needs_vllm, pytest.mark.timeout(900)]

PROMPTS = ["서울은 대한민국의", "The quick brown fox", "한국어 언어 모델을"]
TOKENS = 10


def save_with_adapter(path: Path) -> Path:
    """Base weights + adapter/ (random, strong LoRA weights) + kollm.json, as a `lora: {merge: false}` training run writes it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    save_vllm_tiny(path)
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)  # far from zero: the adapter changes the greedy answers
    peft_model.save_pretrained(path / "adapter")
    (path / "kollm.json").write_text(
        json.dumps({"format": "kollm.model/1", "lora": {"adapter": "adapter", "merged": False}})
    )
    return path


def greedy_texts(path: Path, *, adapter: bool) -> list[str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, path / "adapter")
    model.eval()
    out = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt")["input_ids"]
            new = model.generate(ids, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False)[0, ids.shape[1] :]
            out.append(tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False).rstrip("\ufffd"))
    return out


@pytest.mark.slow(reason="a vLLM server of its own (LoRA enabled): 129 s on the loaded 2-core machine")
def test_unmerged_adapter_is_applied(tmp_path):
    model = save_with_adapter(tmp_path / "lora-model")
    adapted, base = greedy_texts(model, adapter=True), greedy_texts(model, adapter=False)
    assert adapted != base  # the adapter matters for these prompts
    server = start_kollm(model, tmp_path, "--served-model-name", "tiny-lora")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        served = [
            client.completions.create(
                model="tiny-lora", prompt=p, max_tokens=TOKENS, temperature=0, extra_body={"ignore_eos": True}
            )
            .choices[0]
            .text
            for p in PROMPTS
        ]
        assert served == adapted
        assert "LoRA adapter" in server.output()
    finally:
        server.stop()
