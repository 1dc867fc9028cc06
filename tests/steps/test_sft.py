"""`sft` through the real runner: LoRA on the previous step's model, adapter saved and merged (`merge: true`); errors for a
missing base model and for QLoRA without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

import kollm
from kollm.errors import ConfigError

DATA_PY = """
import random
import pandas as pd

SYL = "가나다라마바사아자차카타파하서울부산한국어문장입니다오늘날씨좋네요학교공부책"
QA = [("서울은 어느 나라의 수도인가요?", "서울은 대한민국의 수도입니다."), ("김치는 무엇인가요?", "김치는 한국의 발효 음식입니다."),
      ("한글은 누가 만들었나요?", "한글은 세종대왕이 만들었습니다."), ("부산은 어디에 있나요?", "부산은 한국의 남쪽에 있습니다.")]

def _sentence(rng):
    return " ".join("".join(rng.choice(SYL) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(3, 10))) + "."

def _write(out, df, n_eval):
    df.iloc[:-n_eval].to_parquet(out / "train.parquet")
    df.iloc[-n_eval:].to_parquet(out / "eval.parquet")
    (out / "stats.json").write_text("{}")

def make(ctx):
    rng = random.Random(0)
    texts = [" ".join(_sentence(rng) for _ in range(3)) for _ in range(80)] + [q + " " + a for q, a in QA] * 5
    _write(ctx.output_path("corpus"), pd.DataFrame({"text": texts}), 5)
    chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in QA] * 6
    _write(ctx.output_path("chats"), pd.DataFrame({"messages": chats}), 4)
    prefs = [{"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": "모르겠어요."} for q, a in QA] * 4
    _write(ctx.output_path("prefs"), pd.DataFrame(prefs), 4)
    return {}
"""


def make_project(root: Path, steps_yaml: str) -> Path:
    module = f"data_{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(DATA_PY, encoding="utf-8")
    head = f"""\
project: sft-test
steps:
  - kind: python
    name: gen
    config: {{callable: "{module}:make", outputs: {{corpus: corpus, chats: instructions, prefs: preferences}}}}
"""
    (root / "kollm.yaml").write_text(head + textwrap.indent(textwrap.dedent(steps_yaml), "  "), encoding="utf-8")
    return root


CPT = "- kind: cpt\n  config: {base_model: scratch, vocab_size: 400, seq_len: 64, max_steps: 6, lr: 3.0e-3, batch_size: 4, log_every: 3}\n"


@pytest.mark.slow(reason="cpt then sft with LoRA through the runner")
def test_sft_lora_on_previous_model_saves_adapter_and_merged_model(tmp_path):
    root = make_project(
        tmp_path / "p",
        CPT
        + "- kind: sft\n  config: {seq_len: 128, max_steps: 8, lr: 1.0e-2, batch_size: 4, log_every: 2, lora: {r: 4, alpha: 8, merge: true}}\n",
    )
    result = kollm.run(root)
    sft = result.steps["sft"].outputs["model"]
    cpt = result.steps["cpt"].outputs["model"]
    meta = json.loads((sft.path / "kollm.json").read_text())
    assert meta["base_model"]["source"] == "artifact" and meta["base_model"]["digest"] == cpt.digest
    assert meta["base_model"]["lineage"]["source"] == "scratch"  # lineage back to the cpt step's base
    assert meta["data"]["data"]["digest"] == result.steps["gen"].outputs["chats"].digest
    assert meta["lora"] == {"adapter": "adapter", "merged": True}
    assert (sft.path / "adapter" / "adapter_model.safetensors").exists() and (
        sft.path / "adapter" / "adapter_config.json"
    ).exists()
    assert sft.meta["trainable_params"] < sft.meta["params"] / 5
    # The merged folder is a plain model whose weights moved away from the cpt model (LoRA merged in).
    from safetensors.torch import load_file

    before, after = load_file(cpt.path / "model.safetensors"), load_file(sft.path / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("proj" in k for k in changed)  # only adapted linear layers changed
    assert result.steps["sft"].metrics["train_loss"] < result.steps["sft"].metrics.get("eval_loss", 99) + 5
    script = "import sys; from transformers import AutoModelForCausalLM as M; M.from_pretrained(sys.argv[1]); assert 'kollm' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", script, str(sft.path)], cwd="/", timeout=120).returncode == 0


def test_sft_without_a_base_model_says_what_to_do(tmp_path):
    root = make_project(tmp_path / "p", "- kind: sft\n  config: {max_steps: 1}\n")
    with pytest.raises(ConfigError, match="base_model"):
        kollm.run(root)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_qlora_on_cpu_is_a_clear_error(tmp_path):
    root = make_project(
        tmp_path / "p",
        CPT.replace("max_steps: 6", "max_steps: 1") + "- kind: sft\n  config: {max_steps: 1, lora: {quantize: 4bit}}\n",
    )
    with pytest.raises(ConfigError, match="quantize.*CUDA"):
        kollm.run(root)
