"""`sharding: fsdp` in one process (FSDP2 over a process group of one): the settings' checks, the memory estimate and
the failure it gives before the first step, and FSDP composed with gradient checkpointing, LoRA and a preference
objective, step for step equal to the unsharded loop. (2 processes, resume and the output folder: test_fsdp.py.)"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from kollm.errors import ConfigError
from kollm.steps import align, cpt, sft
from kollm.train import loop, prefs, sharding
from kollm.train.data import (
    PreferenceDataset,
    RowDataset,
    collate_preferences,
    encode_corpus,
    encode_preferences,
    pack_stream,
)
from kollm.train.loop import LoopConfig, evaluate, train
from kollm.train.modeling import apply_lora

CPU = torch.device("cpu")
GIB = 2**30


@pytest.mark.parametrize("config", [cpt.Config, sft.Config, align.DpoConfig])
def test_settings_and_their_checks(config):
    assert config().sharding == "ddp" and config().cpu_offload is False
    assert config(sharding="fsdp", cpu_offload=True).cpu_offload
    with pytest.raises(ValueError, match="cpu_offload: true needs sharding: fsdp"):
        config(cpu_offload=True)
    with pytest.raises(ValueError, match="sharding: fsdp does not shard a quantized"):
        config(sharding="fsdp", lora={"quantize": "4bit"})
    with pytest.raises(ValueError, match="sharding"):
        config(sharding="zero3")


LLAMA_8B = dict(params=8_030_261_248, layers=32, hidden=4096, vocab=128_256, tokens=4096)


def test_memory_estimate_of_an_8b_full_fine_tune():
    ddp = sharding.estimate_memory(**LLAMA_8B, trainable=LLAMA_8B["params"], world=8, sharding="ddp")
    assert ddp.parameters == ddp.gradients == LLAMA_8B["params"] * 4  # fp32
    assert ddp.optimizer == LLAMA_8B["params"] * 8  # AdamW: two fp32 states
    assert 115 * GIB < ddp.total - ddp.activations < 125 * GIB  # the issue's ~16 bytes per parameter
    fsdp = sharding.estimate_memory(**LLAMA_8B, trainable=LLAMA_8B["params"], world=8, sharding="fsdp")
    assert fsdp.optimizer == ddp.optimizer / 8 and fsdp.gradients == ddp.gradients / 8
    assert fsdp.total < 40 * GIB < 140 * GIB < ddp.total
    offload = sharding.estimate_memory(
        **LLAMA_8B, trainable=LLAMA_8B["params"], world=1, sharding="fsdp", cpu_offload=True
    )
    assert offload.optimizer == offload.gradients == 0
    assert offload.parameters == pytest.approx(2 * LLAMA_8B["params"] / 32 * 2)  # two gathered bf16 layers
    checkpointed = sharding.estimate_memory(
        **LLAMA_8B, trainable=0, world=1, sharding="ddp", gradient_checkpointing=True
    )
    assert checkpointed.activations < ddp.activations / 3
    with pytest.raises(ValueError):
        sharding.estimate_memory(**LLAMA_8B, trainable=0, world=1, sharding="zero")


def test_memory_estimate_of_lora_on_a_bf16_base(monkeypatch):
    """Found on an H100: a bf16 8B base with fp32 adapters was counted at 4 bytes per parameter (30 GiB, not 16),
    and the check failed a run that fit."""
    from kollm.train.loop import LoopConfig, check_memory

    lora = 42_000_000
    est = sharding.estimate_memory(**LLAMA_8B, trainable=lora, world=1, sharding="ddp", param_bytes=2.0, grad_bytes=4.0)
    assert est.parameters == LLAMA_8B["params"] * 2 and est.gradients == lora * 4
    assert est.parameters < 16 * GIB

    import transformers

    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            num_hidden_layers=1, hidden_size=8, intermediate_size=16, num_attention_heads=2, vocab_size=16
        )
    ).to(torch.bfloat16)
    model.requires_grad_(False)
    model.lm_head.float().requires_grad_(True)  # the one fp32, trainable part (as adapters are)
    logged = []
    real = sharding.estimate_memory
    monkeypatch.setattr(sharding, "estimate_memory", lambda **kw: logged.append(kw) or real(**kw))
    check_memory(model, LoopConfig(max_steps=1, seq_len=8), torch.device("cpu"), 1, bf16=True)
    head = model.lm_head.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    assert logged[0]["param_bytes"] == pytest.approx(((total - head) * 2 + head * 4) / total)
    assert logged[0]["grad_bytes"] == 4


def _estimator(world: int):
    return lambda s, offload: sharding.estimate_memory(
        **LLAMA_8B, trainable=LLAMA_8B["params"], world=world, sharding=s, cpu_offload=offload
    )


def test_check_fits_names_the_fix():
    eight = _estimator(8)
    assert sharding.check_fits(200 * GIB, eight, "ddp", False) is None
    message = sharding.check_fits(78 * GIB, eight, "ddp", False)
    assert "set sharding: fsdp" in message and "78.0 GiB is free" in message
    assert sharding.check_fits(78 * GIB, eight, "fsdp", False) is None
    one = _estimator(1)
    assert "set sharding: fsdp and cpu_offload: true" in sharding.check_fits(78 * GIB, one, "ddp", False)
    assert "set cpu_offload: true" in sharding.check_fits(78 * GIB, one, "fsdp", False)
    assert "would not fit" in sharding.check_fits(1 * GIB, one, "fsdp", True)


@pytest.fixture()
def rows(tokenizer, texts):
    return pack_stream(encode_corpus(texts(60), tokenizer), 48, tokenizer.pad_token_id)


def test_the_loop_fails_before_the_first_step_when_ddp_cannot_fit(tiny_model, rows, monkeypatch):
    """The device's free memory (CUDA's mem_get_info; unknown on a CPU, so set here) below ddp's estimate."""
    cfg = LoopConfig(max_steps=2, batch_size=4, seq_len=48)
    monkeypatch.setattr(loop, "device_memory", lambda device: 8 * 2**20)  # 8 MiB: ddp needs ~10, fsdp on one ~10
    with pytest.raises(ConfigError, match="set sharding: fsdp and cpu_offload: true") as e:
        train(tiny_model, RowDataset(rows), cfg, device=CPU)
    assert "per device" in str(e.value)
    monkeypatch.setattr(loop, "device_memory", lambda device: 64 * 2**30)
    assert train(tiny_model, RowDataset(rows), cfg, device=CPU).steps == 2


def _twice(make_model, run):
    """run(model, cfg_update) unsharded and under fsdp (a process group of one): both results."""
    plain = run(make_model(), {})
    with sharding.process_group(CPU):
        sharded = run(make_model(), {"sharding": "fsdp"})
    return plain, sharded


def test_fsdp_with_lora_and_gradient_checkpointing_matches_the_plain_loop(tiny_model, rows):
    def run(model, update):
        cfg = LoopConfig(max_steps=6, lr=3e-3, batch_size=4, grad_accum=2, gradient_checkpointing=True, **update)
        return train(model, RowDataset(rows), cfg, device=CPU).losses

    def make():
        torch.manual_seed(0)  # the same adapters
        return apply_lora(
            copy.deepcopy(tiny_model), r=4, alpha=8, dropout=0.0, target_modules="all-linear", quantized=False
        )

    plain, sharded = _twice(make, run)
    assert sharded == pytest.approx(plain, rel=1e-5)


def test_fsdp_with_cpu_offload_matches_the_plain_loop(tiny_model, rows):
    """Offloaded shards: per-layer units and the fused AdamW kernel over host-memory shards (its grad_scale input
    takes the clipped mean's divisor), gradient clipping on."""

    def run(model, update):
        cfg = LoopConfig(max_steps=4, lr=3e-3, batch_size=4, grad_clip=0.05, **update)
        return train(model, RowDataset(rows), cfg, device=CPU).losses

    plain = run(copy.deepcopy(tiny_model), {})
    with sharding.process_group(CPU):
        offloaded = run(copy.deepcopy(tiny_model), {"sharding": "fsdp", "cpu_offload": True})
    assert offloaded == pytest.approx(plain, rel=1e-5)
    assert len(set(plain)) == len(plain)  # it trains


def test_fsdp_with_dpo_matches_the_plain_loop(tiny_model, tokenizer):
    records = [
        {"prompt": [{"role": "user", "content": q}], "chosen": f"좋은 답변입니다 {i}.", "rejected": f"나쁜 대답 {i}!!"}
        for i, q in enumerate(["서울은 어디에 있나요?", "김치는 무엇인가요?", "한글은 누가 만들었나요?"] * 2)
    ]
    pairs, _ = encode_preferences(tokenizer, records, max_len=64)
    collate = partial(collate_preferences, pad_id=tokenizer.pad_token_id)

    def run(model, update):
        ds = PreferenceDataset(pairs)
        prefs.add_reference_logps(model, ds, device=CPU, batch_size=3, pad_id=tokenizer.pad_token_id)
        cfg = LoopConfig(max_steps=5, lr=3e-3, batch_size=3, **update)
        losses = train(model, ds, cfg, device=CPU, objective=prefs.dpo(0.5), collate=collate).losses
        return losses, evaluate(model, ds, device=CPU, batch_size=3, objective=prefs.dpo(0.5), collate=collate)

    (plain, plain_eval), (sharded, sharded_eval) = _twice(lambda: copy.deepcopy(tiny_model), run)
    assert sharded == pytest.approx(plain, rel=1e-5)
    with sharding.process_group(CPU):  # cpu_offload: the same path (the shards are in host memory anyway here)
        offloaded, _ = run(copy.deepcopy(tiny_model), {"sharding": "fsdp", "cpu_offload": True})
    assert offloaded == pytest.approx(plain, rel=1e-5)
    assert sharded_eval[0] == pytest.approx(plain_eval[0], rel=1e-5)  # evaluate goes through the FSDP root
    assert sharded_eval[1]["reward_margin"] == pytest.approx(plain_eval[1]["reward_margin"], rel=1e-4, abs=1e-6)


def test_fsdp_with_grpo_matches_the_plain_loop(tiny_model, tokenizer):
    """GRPO generates inside its objective: through the FSDP root each layer is gathered for every decode step."""
    from kollm.train.modeling import end_of_turn_ids

    records = [{"prompt": [{"role": "user", "content": q}]} for q in ["안녕", "서울", "한국어", "학교"]]

    def run(model, update):
        ds = prefs.PromptDataset(tokenizer, records, max_prompt_len=64)
        objective = prefs.grpo(
            tokenizer,
            ds,
            lambda prompts, completions, **_: [float(c.count("다")) for c in completions],
            num_generations=4,
            max_new_tokens=6,
            temperature=1.0,
            stop_ids=end_of_turn_ids(tokenizer),
        )
        torch.manual_seed(0)  # the same samples
        logs: list = []
        cfg = LoopConfig(max_steps=3, lr=1e-2, batch_size=4, log_every=1, **update)
        collate = partial(prefs.collate_prompts, pad_id=tokenizer.pad_token_id)
        train(model, ds, cfg, device=CPU, objective=objective, collate=collate, on_log=logs.append)
        return [x for e in logs for x in (e.loss, e.metrics["reward"], e.metrics["completion_length"])]

    plain, sharded = _twice(lambda: copy.deepcopy(tiny_model), run)
    assert len(sharded) == 9
    assert sharded == pytest.approx(plain, rel=1e-4, abs=1e-6)  # the same samples, rewards and losses


def test_the_readme_fsdp_example_is_a_valid_step():
    """README's training section: the 8B sft step with sharding: fsdp validates as written."""
    from pathlib import Path

    import yaml

    from kollm.config import Resources

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    start = readme.index("  - kind: sft                       # full fine-tuning of an 8B")
    step = yaml.safe_load(readme[start : readme.index("```", start)])[0]
    config = sft.Config.model_validate(step["config"])
    assert config.sharding == "fsdp" and config.base_model
    assert Resources.model_validate(step["resources"]).gpus == 8
    assert sft.Config.model_validate({**step["config"], "cpu_offload": True}).cpu_offload


@pytest.mark.slow(reason="the benchmark script in a fresh process: about a minute on a loaded 2-core machine")
def test_sharded_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/train_sharded.py --cpu --tiny: every case runs or skips its baseline with the reason."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "train_sharded.py"
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--cpu", "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cases = json.loads(out.read_text())["cases"]
    assert set(cases) == {"lora", "qlora", "offload", "fsdp_ddp"}
    ran = {r["name"]: r for c in cases.values() for r in c["runs"]}
    for name in ("kollm_lora", "kollm_fsdp_offload", "kollm_ddp_full", "kollm_ddp", "kollm_fsdp"):
        assert ran[name]["error"] is None and ran[name]["tokens_per_s"] > 0, name
    assert "kollm_fsdp_vs_kollm_ddp" in cases["fsdp_ddp"]["summary"]
    assert (
        "needs a CUDA GPU" in cases["qlora"]["skipped"]["kollm_qlora"]
        or "bitsandbytes" in cases["qlora"]["skipped"]["kollm_qlora"]
    )
    assert "tokens/s vs" in proc.stdout


@pytest.mark.parametrize(("world", "offload", "per_layer"), [(1, False, False), (1, True, True), (2, False, True)])
def test_fsdp_units_per_layer_only_where_they_save_memory(tiny_model, world, offload, per_layer):
    """Over one rank without offload a shard is the whole model: the root is the one unit, kept gathered from forward
    to backward (one gather a step, not one per layer and pass), and the estimate counts the whole gathered copy."""
    from torch.distributed.fsdp import FSDPModule

    from kollm.train.kernels import decoder_layers

    assert sharding.per_layer_units(world, offload) is per_layer
    if world == 1:
        model = copy.deepcopy(tiny_model)
        with sharding.process_group(CPU):
            root = sharding.shard(model, device=CPU, bf16=False, cpu_offload=offload)
            assert isinstance(root, FSDPModule)
            assert [isinstance(layer, FSDPModule) for layer in decoder_layers(model)] == [per_layer] * len(
                decoder_layers(model)
            )
    params = 8 * 10**9
    est = sharding.estimate_memory(
        params=params, trainable=params, layers=32, hidden=4096, vocab=128256, tokens=8192, world=world,
        sharding="fsdp", cpu_offload=offload,
    )  # fmt: skip
    gathered = est.parameters - (0 if offload else params * 4 / world)
    assert gathered == pytest.approx(2 * (2 * params / 32 if per_layer else params))


def test_per_layer_compile_leaves_fsdp_hooks_outside_the_graph(tiny_model):
    """Each layer's forward is compiled, not its __call__ (which runs FSDP's gather and reshard hooks): compiling
    __call__ on FSDP units crashed with an illegal memory access on an H100; torchtitan's form keeps hooks out."""
    from kollm.train.kernels import compile_model, decoder_layers

    model = compile_model(copy.deepcopy(tiny_model), per_layer=True)
    for layer in decoder_layers(model):
        assert layer._compiled_call_impl is None
        assert hasattr(layer.forward, "_torchdynamo_orig_callable")
