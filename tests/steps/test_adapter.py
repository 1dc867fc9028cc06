"""LoRA adapters as artifacts, through the real runner: cpt (scratch) -> sft with `lora:` (its output is the adapter
and a reference to the cpt model by digest) -> align (DPO on the adapter, merged at load) -> register. Evaluate,
register, serve and the lineage take the adapter; a base that is not the one the adapter was trained on is one
error naming both digests."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import kollm

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("sft_test_helpers_adapter", HERE / "test_sft.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

SFT = "- kind: sft\n  config: {seq_len: 128, max_steps: 4, lr: 1.0e-2, batch_size: 4, log_every: 2, lora: {r: 4, alpha: 16}}\n"
ALIGN = "- kind: align\n  config: {seq_len: 128, max_steps: 2, batch_size: 4, log_every: 1}\n"
EVALUATE = (
    "- kind: evaluate\n  inputs: {model: sft.model, data: gen.chats}\n"
    "  config: {max_eval_rows: 8, lm_eval: {tasks: [ko_quickstart_mc], limit: 4}, gate: ['perplexity <= 1000000']}\n"
)
REGISTER = "- kind: register\n  inputs: {model: sft.model}\n  config: {name: ko-adapter}\n"


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = helpers.make_project(
        tmp_path_factory.mktemp("adapter") / "p", helpers.CPT + SFT + ALIGN + EVALUATE + REGISTER
    )
    return root, kollm.run(root)


def _merged_reference(sft: Path, cpt: Path):
    """What the adapter means, computed with PEFT directly: the cpt model with the adapter merged in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cpt), str(sft)).merge_and_unload().eval()


@pytest.mark.slow(reason="cpt, sft (LoRA), align and register through the runner (shared by the module's tests)")
def test_lora_output_is_the_adapter_and_its_base_digest(pipeline):
    from kollm.adapter import find_base, is_adapter

    root, result = pipeline
    sft, cpt = result.steps["sft"].outputs["model"], result.steps["cpt"].outputs["model"]
    names = {p.name for p in sft.path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "kollm.json"} <= names
    assert not any(n.startswith("model") and n.endswith(".safetensors") for n in names) and "config.json" not in names
    assert is_adapter(sft.path) and find_base(sft.path) == cpt.path
    meta = json.loads((sft.path / "kollm.json").read_text())
    assert meta["lora"]["merged"] is False
    assert meta["lora"]["base"] == {"digest": cpt.digest, "path": str(cpt.path), "source": "artifact"}
    assert sft.meta["adapter"] is True and sft.meta["base_digest"] == cpt.digest
    assert _bytes(sft.path) < _bytes(cpt.path) / 3
    config = json.loads((sft.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(cpt.path) and config["r"] == 4


@pytest.mark.slow(reason="shares the module's pipeline run")
def test_loading_the_adapter_merges_it_into_its_base(pipeline):
    from kollm.adapter import load_causal_lm

    _, result = pipeline
    sft, cpt = result.steps["sft"].outputs["model"].path, result.steps["cpt"].outputs["model"].path
    merged, reference = load_causal_lm(sft).eval(), _merged_reference(sft, cpt)
    base = load_causal_lm(cpt)
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        out, ref, plain = merged(ids).logits, reference(ids).logits, base(ids).logits
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)  # the adapter changed the model


@pytest.mark.slow(reason="shares the module's pipeline run")
def test_a_later_step_trains_on_the_adapter_merged_at_load(pipeline):
    _, result = pipeline
    align = result.steps["align"]
    meta = json.loads((align.outputs["model"].path / "kollm.json").read_text())
    assert meta["base_model"]["digest"] == result.steps["sft"].outputs["model"].digest
    assert (align.outputs["model"].path / "config.json").is_file()  # a full fine-tune of the merged model
    assert align.metrics["train_loss"] == align.metrics["train_loss"]  # a number, not NaN


@pytest.mark.slow(reason="shares the module's pipeline run")
def test_registering_an_adapter_registers_megabytes_not_the_base(pipeline):
    from kollm import registry
    from kollm.adapter import BASE_DIGEST_TAG

    root, result = pipeline
    sft, cpt = result.steps["sft"].outputs["model"], result.steps["cpt"].outputs["model"]
    version = registry.show("ko-adapter", "challenger", project_dir=root)
    assert version.tags[BASE_DIGEST_TAG] == cpt.digest and version.tags["kollm.model_digest"] == sft.digest
    # the evaluate step measured the adapter (merged into its base at load): perplexity, lm-eval, the gate
    assert float(version.tags["kollm.metric.perplexity"]) > 1 and version.tags["kollm.gate"] == "passed"
    assert "kollm.metric.ko_quickstart_mc.acc" in version.tags
    folder = registry.resolve_model_uri("models:/ko-adapter@challenger", root)
    download = folder.parent  # the logged model: MLmodel, the adapter folder, code, components
    registered = _bytes(download)
    weights = _bytes(cpt.path)
    print(f"registered adapter version: {registered} bytes; base model folder: {weights} bytes")
    assert registered < weights / 3, (registered, weights)
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "config.json").exists()
    import mlflow

    uri = registry.tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/ko-adapter@challenger")  # kollm's pyfunc: transformers + PEFT
    assert len(model.predict(["서울은"], params={"max_new_tokens": 3})) == 1


@pytest.mark.slow(reason="shares the module's pipeline run")
def test_serving_the_registered_adapter_answers_as_the_merged_model(pipeline):
    from kollm import registry
    from kollm.serve import load_engine
    from kollm.serve.engine import SamplingParams

    root, result = pipeline
    sft, cpt = result.steps["sft"].outputs["model"].path, result.steps["cpt"].outputs["model"].path
    folder = registry.resolve_model_uri("models:/ko-adapter@challenger", root)
    engine = load_engine(folder, backend="transformers", device="cpu")
    reference = _merged_reference(sft, cpt)
    prompt = engine.encode_prompt("서울은 대한민국의")
    import asyncio

    async def generate() -> str:
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        try:
            return "".join([c.text async for c in engine.generate(prompt, params, "r1")])
        finally:
            await engine.shutdown()

    got = asyncio.run(generate())
    seq = list(prompt)
    with torch.no_grad():  # greedy, the whole sequence recomputed per token
        for _ in range(8):
            seq.append(int(reference(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == engine.decode(seq[len(prompt) :])


@pytest.mark.slow(reason="shares the module's pipeline run")
def test_an_adapter_on_another_base_names_both_digests(pipeline, tmp_path):
    from kollm.adapter import AdapterBaseMismatch, find_base, load_causal_lm
    from kollm.pipeline.artifacts import folder_digest

    _, result = pipeline
    sft, cpt = result.steps["sft"].outputs["model"], result.steps["cpt"].outputs["model"]
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(cpt.path, base)
    shutil.copytree(sft.path, adapter)
    meta = json.loads((adapter / "kollm.json").read_text())
    meta["lora"]["base"]["path"] = str(base)
    (adapter / "kollm.json").write_text(json.dumps(meta))
    assert find_base(adapter) == base
    (base / "generation_config.json").write_text('{"max_new_tokens": 3}')  # another base: its content differs
    other = folder_digest(base)
    with pytest.raises(AdapterBaseMismatch) as e:
        load_causal_lm(adapter)
    assert cpt.digest in str(e.value) and other in str(e.value)


def test_lora_on_a_scratch_base_without_merge_says_to_merge(tmp_path):
    from kollm.errors import ConfigError

    root = helpers.make_project(
        tmp_path / "p",
        "- kind: cpt\n  config: {base_model: scratch, vocab_size: 400, seq_len: 64, max_steps: 1, lora: {r: 4}}\n",
    )
    with pytest.raises(ConfigError, match=r"lora\.merge.*scratch.*merge: true"):
        kollm.run(root)


@pytest.mark.slow(reason="shares the module's pipeline run")
def test_lineage_shows_the_adapter_and_its_base(pipeline):
    import httpx

    from kollm.ui import data
    from kollm.ui.app import create_app
    from tests.rollout.conftest import Server

    root, result = pipeline
    cpt = result.steps["cpt"].outputs["model"]
    store = data.Store(data.open_project(root))
    lin = data.version_lineage(store, "ko-adapter", "challenger")
    assert lin.base == {"digest": cpt.digest, "path": str(cpt.path), "registered": ""}
    assert [v.name for v in data.forward_lineage(store, cpt.digest).versions] == ["ko-adapter"]
    with Server(create_app(root, host="127.0.0.1")) as srv:
        page = httpx.get(f"{srv.url}/lineage/ko-adapter/1", timeout=60).text
    assert "LoRA adapter on base" in page and cpt.digest in page
