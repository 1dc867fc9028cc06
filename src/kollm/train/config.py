"""Settings shared by the training steps (cpt, sft, align), and the scratch model presets. Each step's `Config`
extends `TrainingConfig`. No torch here: step configs load (and cached steps are skipped) without importing it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from kollm.pipeline.artifacts import cached_folder_digest
from kollm.pipeline.step import STRICT, InputSpec


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int
    tied: bool


# Llama-shaped presets for `base_model: scratch`. tiny: 0.9M parameters (4k vocabulary), trains on CPU in a fraction of a second per step;
# small: 32M; base: 349M with a 32k vocabulary (the shape of the GPU throughput benchmark).
PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        hidden=128, layers=2, heads=4, kv_heads=2, intermediate=352, vocab=4096, max_positions=2048, tied=True
    ),
    "small": Preset(
        hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, vocab=16384, max_positions=4096, tied=True
    ),
    "base": Preset(
        hidden=1024, layers=24, heads=16, kv_heads=8, intermediate=2816, vocab=32000, max_positions=4096, tied=False
    ),
}


class LoraSettings(BaseModel):
    model_config = STRICT
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]), or all-linear for every linear layer but the head.",
    )
    quantize: Literal["4bit", "8bit"] | None = Field(
        None, description="QLoRA: load the frozen base quantized with bitsandbytes (CUDA GPU only)."
    )
    merge: bool = Field(
        False,
        description="false (default): the step's output is the adapter (PEFT's adapter_config.json and "
        "adapter_model.safetensors) and a reference to its base by digest. true: a full model folder with the adapter "
        "merged in (and saved in adapter/ as well).",
    )


class TrainingConfig(BaseModel):
    model_config = STRICT
    base_model: str | None = Field(
        None,
        description="A hub name or local folder, or `scratch` (a new small Llama and a BPE tokenizer trained on the corpus). "
        "Default: the `model` input (a previous step's model); for cpt without one, scratch.",
    )
    architecture: Literal["llama", "qwen2", "qwen3", "mistral", "gemma3", "exaone4"] | None = Field(
        None,
        description="Architecture of the scratch model and chat format of its tokenizer (kollm.train.architectures): "
        "llama (Llama 3 headers), qwen2 / qwen3 (ChatML with tools), mistral ([INST]), gemma3 (<start_of_turn>), "
        "exaone4 ([|user|] ... [|endofturn|]). Default: a Llama with kollm's Korean ChatML template.",
    )
    preset: Literal["tiny", "small", "base"] = Field(
        "tiny", description="Size of the scratch model: " + ", ".join(PRESETS) + "."
    )
    vocab_size: int | None = Field(
        None, ge=300, description="Scratch tokenizer vocabulary size. Default: the preset's."
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template (or a path to a .jinja file). Default: the model's own, else kollm's Korean ChatML template.",
    )
    lora: LoraSettings | None = Field(
        None, description="Train LoRA adapters instead of all weights (`lora: {}` for the defaults)."
    )
    seq_len: int = Field(512, ge=16, description="Tokens per packed training row.")
    batch_size: int = Field(8, ge=1, description="Rows (or preference pairs) per micro-batch per GPU.")
    tokens_per_step: int | None = Field(
        None,
        ge=1,
        description="Tokens per optimizer step; sets gradient accumulation. Default: one micro-batch per step.",
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps. Default: `epochs` passes over the data.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data when max_steps is not set.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="The cosine schedule ends at lr * min_lr_ratio.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (matrices only).")
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm to this (0: no clipping).")
    checkpoint_every: int = Field(100, ge=0, description="Save a resumable checkpoint every N steps (0: never).")
    log_every: int = Field(10, ge=1, description="Log metrics every N steps.")
    seed: int = Field(0, description="Seed for initialisation and data order.")
    compile: bool = Field(False, description="torch.compile the model (faster on GPU after a warm-up).")
    gradient_checkpointing: bool = Field(
        False,
        description="Keep only each layer's input and attention output (and, under bf16, a bf16 residual stream) and "
        "recompute the rest of the layer in the backward pass: a third of the peak memory for about 12 % fewer tokens/s "
        "(349M model, one GPU). For long sequences or a model that does not fit otherwise.",
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast on a GPU that supports it, else fp32."
    )
    sharding: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole model, its gradients and optimizer state (about 16 bytes per "
        "parameter). fsdp: PyTorch FSDP2 shards them over the processes (resources.gpus, resources.workers, or Ray "
        "Train workers), so a model N times larger fits on N devices; checkpoints are sharded too and resume on "
        "another number of processes. The output is the same Hugging Face folder either way.",
    )
    cpu_offload: bool = Field(
        False,
        description="With sharding: fsdp, keep the weight shards, gradients and optimizer state in host memory and "
        "bring each layer to the GPU only to compute: one GPU full-fine-tunes a model whose optimizer state does not "
        "fit it, at the cost of speed.",
    )

    @model_validator(mode="after")
    def _checks(self) -> TrainingConfig:
        if self.base_model is not None and self.base_model != "scratch" and self.vocab_size is not None:
            raise ValueError("vocab_size applies only to base_model: scratch")
        if self.base_model is not None and self.base_model != "scratch" and self.architecture is not None:
            raise ValueError(
                "architecture applies only to base_model: scratch (a model folder or hub name has its own)"
            )
        if self.cpu_offload and self.sharding != "fsdp":
            raise ValueError("cpu_offload: true needs sharding: fsdp (it offloads FSDP's shards); add sharding: fsdp")
        if self.sharding == "fsdp" and self.lora is not None and self.lora.quantize:
            raise ValueError(
                "sharding: fsdp does not shard a quantized (QLoRA) base; remove lora.quantize or use sharding: ddp"
            )
        return self


def model_input(config: TrainingConfig, help: str) -> dict[str, InputSpec]:
    """The optional `model` input of a training step, absent when `base_model` names the model to start from:
    then nothing is wired to it by default, and lineage (validate, MLflow tags, kollm.json) names the model that
    training actually starts from."""
    return {} if config.base_model else {"model": InputSpec(("model",), optional=True, help=help)}


def base_model_reference(base_model: str | None, project_dir: Path) -> dict[str, str]:
    """What a step's key must cover about a `base_model` outside the pipeline: a local folder's content digest
    (so new weights saved into the same folder re-run the step), or a hub model's cached revision where known."""
    if base_model is None or base_model == "scratch":
        return {}
    local = project_dir / base_model  # an absolute base_model stays absolute
    if local.is_dir():
        return {"base_model": cached_folder_digest(local, project_dir / ".kollm" / "digests.json")}
    return {"base_model": f"{base_model}@{hub_revision(base_model) or 'unknown-revision'}"}


def hub_revision(name: str) -> str | None:
    """The commit of `name`'s `main` ref in the local Hugging Face cache, without importing huggingface_hub."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub"
    )
    ref = Path(cache) / f"models--{name.replace('/', '--')}" / "refs" / "main"
    try:
        return ref.read_text().strip() or None
    except OSError:
        return None
