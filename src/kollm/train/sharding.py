"""`sharding: fsdp`: PyTorch FSDP2 around the training model, and the memory estimate that says when it is needed.

`shard` applies `torch.distributed.fsdp.fully_shard` to every decoder layer and then to a `ShardedModel` root
that holds the model. The root is a wrapper rather than the causal LM itself because the training objectives do
not go through the model's `forward`: `kernels.lm_loss` calls the decoder and reads the head's weight directly (the
chunked loss). FSDP gathers a module's parameters around its `forward`, so the root's forward is one objective
call (`ShardedModel(objective, batch)`): the embeddings, final norm and head (the root's parameters) are gathered for
the whole objective, each decoder layer's own around that layer (and again, for its backward, around its
gradient computation). Gradients are reduce-scattered as sums (divide factor 1): the loop divides them by the
token count over all ranks, as on the ddp path.

Every rank ends training with its shard only: `full_state_dict` gathers the weights onto rank 0 (on the CPU) and
`plain_model` rebuilds an ordinary model from them there, which `recipe.save_model` writes as the usual Hugging
Face folder. One process with no process group gets a group of one (`process_group`), so `fsdp` runs the same
code on one device (sharded over a world of 1, with `cpu_offload` the way to fit a larger model on one GPU).

Over one rank without `cpu_offload` a shard is the whole tensor, so per-layer units would buy no memory and cost a
gather and a reduce per layer and pass (host work that left a 349M model's GPU idle most of each step): there the
root is the only unit and stays gathered between forward and backward (`per_layer_units`).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kollm.train.kernels import causal_lm, decoder_layers

log = logging.getLogger("kollm.train")

# the ShardedModel root of each sharded model, so that evaluate and save_model find it from the model alone
_ROOTS: weakref.WeakKeyDictionary[nn.Module, ShardedModel] = weakref.WeakKeyDictionary()


class ShardedModel(nn.Module):
    """The FSDP root: holds the model; its forward is one call of a training objective on it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, objective: Callable[[nn.Module, Any], Any], batch: Any) -> Any:
        return objective(self.model, batch)


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """A process group of one for the body, unless one is initialized already (a launch, Ray Train)."""
    if dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def per_layer_units(world: int, cpu_offload: bool) -> bool:
    """Whether each decoder layer is an FSDP unit of its own (gathered only while it computes): when the shards are
    smaller than the layers (more than one rank) or live in host memory. Otherwise the root is the one unit."""
    return world > 1 or cpu_offload


def shard(
    model: nn.Module, *, device: torch.device, bf16: bool, cpu_offload: bool, per_layer: bool | None = None
) -> ShardedModel:
    """Shard `model` in place over all ranks of the default process group (fully_shard on each decoder layer,
    then on the root; only on the root when `per_layer` is False, by default `per_layer_units`). Every rank
    starts from rank 0's weights. Returns the root to call objectives through."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if not dist.is_initialized():
        raise RuntimeError("sharding: fsdp needs a process group (kollm.train.sharding.process_group)")
    world = dist.get_world_size()
    if world > 1:  # as on the ddp path; LoRA's adapters are initialised from each process's own RNG
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                moved = t.data.to(device)
                dist.broadcast(moved, src=0)
                t.data.copy_(moved.to(t.device))
    mesh = init_device_mesh(device.type, (world,))
    # bf16 all-gathers and compute weights, fp32 gradient reduction. Inputs are not cast: autocast decides the
    # compute dtype as on the ddp path, the residual stream stays fp32, and the objective's float inputs (DPO's
    # reference log-probabilities) keep their precision.
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32, cast_forward_inputs=False
    )
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    if per_layer is None:
        per_layer = per_layer_units(world, cpu_offload)
    modules: list[FSDPModule] = []
    for layer in decoder_layers(model) if per_layer else []:
        fully_shard(layer, mesh=mesh, mp_policy=mp, offload_policy=offload)
        assert isinstance(layer, FSDPModule)
        modules.append(layer)
    root = ShardedModel(model)
    # one unit: kept gathered from forward to backward (a reshard would only free a copy the backward gathers again)
    fully_shard(root, mesh=mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=per_layer)
    assert isinstance(root, FSDPModule)
    modules.append(root)
    for m in modules:  # plain sums (no PREMUL_SUM, which gloo lacks): the loop divides by the token count
        m.set_gradient_divide_factor(1.0)
        m.set_force_sum_reduction_for_comms(True)
    _ROOTS[model] = root
    return root


def root_of(model: nn.Module) -> ShardedModel | None:
    return _ROOTS.get(model)


def call(model: nn.Module, objective: Callable[[nn.Module, Any], Any], batch: Any) -> Any:
    """`objective(model, batch)`, through the FSDP root when `model` is sharded."""
    root = _ROOTS.get(model)
    return root(objective, batch) if root is not None else objective(model, batch)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) parameter or gradient; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_state_dict(model: nn.Module) -> dict[str, Any]:
    """The whole model's weights, gathered from the shards onto rank 0's CPU (a collective: every rank calls it;
    the other ranks get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_model(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """An ordinary (unsharded) copy of the sharded `model` on the CPU, with the weights `state` (full_state_dict's):
    the same transformers class and config, LoRA-wrapped with the same adapter config when `model` is."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = model.get_base_model() if isinstance(model, PeftModel) else model
    config = causal_lm(lm).config
    with torch.device("meta"):
        fresh: nn.Module = AutoModelForCausalLM.from_config(config, dtype=next(iter(state.values())).dtype)
    if isinstance(model, PeftModel):
        fresh = get_peft_model(fresh, model.peft_config["default"])
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    tied = causal_lm(fresh).config.get_text_config().tie_word_embeddings
    if unexpected or [k for k in missing if not (tied and k.endswith("lm_head.weight"))]:
        raise RuntimeError(
            f"the gathered weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if tied:
        causal_lm(fresh).get_output_embeddings().weight = causal_lm(fresh).get_input_embeddings().weight
    for name, buf in list(fresh.named_buffers()):  # rotary frequencies and the like: not in the state dict
        if buf.is_meta:
            owner = fresh.get_submodule(name.rpartition(".")[0])
            owner._buffers[name.rpartition(".")[2]] = _rebuilt_buffer(model, name)
    return fresh


def _rebuilt_buffer(model: nn.Module, name: str) -> torch.Tensor:
    """A non-persistent buffer of the sharded model (FSDP leaves buffers whole), on the CPU."""
    return dict(model.named_buffers())[name].detach().cpu().clone()


# ---------------------------------------------------------------- memory estimate

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device for one training process."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        return (
            f"{self.total / GIB:.1f} GiB (parameters {self.parameters / GIB:.1f}, gradients {self.gradients / GIB:.1f}, "
            f"optimizer {self.optimizer / GIB:.1f}, activations {self.activations / GIB:.1f})"
        )


def estimate_memory(
    *,
    params: int,
    trainable: int,
    layers: int,
    hidden: int,
    vocab: int,
    tokens: int,
    world: int,
    sharding: str,
    cpu_offload: bool = False,
    param_bytes: float = 4,
    grad_bytes: float | None = None,
    compute_bytes: int = 2,
    gradient_checkpointing: bool = False,
    chunk_tokens: int = 8192,
) -> MemoryEstimate:
    """Device memory of one training process, by the usual accounting.

        Parameters are `param_bytes` each on average (4: fp32, 2: bf16; a bf16 base with fp32 adapters is in between),
        the `trainable` ones' gradients `grad_bytes` each (default `param_bytes`), AdamW
        two states of 4 bytes per trainable parameter. ddp holds all of it on every device; fsdp a 1/world share, plus
        the gathered (`compute_bytes`) weights of two decoder layers at a time (the one computing and the next; of the
    whole model over one rank without offload, where the root is the one unit); with
        `cpu_offload` the shares live in host memory and only the gathered layers are on the device. Activations per
        micro-batch of `tokens` tokens: about 34 x hidden bytes per token per layer in 16-bit compute (Korthikanti et
        al. 2022, with a fused attention kernel; 17 more x hidden for fp32), 2 x hidden x compute_bytes per token per
        layer with gradient checkpointing, plus one chunk of the loss's logits (fp32, and its gradient).
    """
    if sharding not in ("ddp", "fsdp"):
        raise ValueError(f"unknown sharding {sharding!r}")
    shard = 1.0 if sharding == "ddp" else 1.0 / world
    resident = 0.0 if cpu_offload else 1.0
    p = params * param_bytes * shard * resident
    g = trainable * (param_bytes if grad_bytes is None else grad_bytes) * shard * resident
    o = trainable * 8 * shard * resident
    if sharding == "fsdp":  # two gathered layers; the whole model where the root is the one unit
        p += (2 * params / max(layers, 1) if per_layer_units(world, cpu_offload) else params) * compute_bytes
    per_token_layer = (2 * compute_bytes if gradient_checkpointing else 17 * compute_bytes) * hidden
    activations = tokens * layers * per_token_layer + min(tokens, chunk_tokens) * vocab * 4 * 2
    return MemoryEstimate(parameters=p, gradients=g, optimizer=o, activations=activations)


def check_fits(
    available: float, estimate: Callable[[str, bool], MemoryEstimate], sharding: str, cpu_offload: bool
) -> str | None:
    """None if the configured run's estimate fits `available` bytes; else the message that names the fix (the
    first of `sharding: fsdp`, `cpu_offload: true` whose estimate fits, or what it would take)."""
    chosen = estimate(sharding, cpu_offload)
    if chosen.total <= available:
        return None
    need = f"training needs about {chosen.describe()} per device, but {available / GIB:.1f} GiB is free"
    if sharding == "ddp" and estimate("fsdp", False).total <= available:
        return f"{need}; set sharding: fsdp (about {estimate('fsdp', False).total / GIB:.1f} GiB per device)"
    if not cpu_offload and estimate("fsdp", True).total <= available:
        fix = "sharding: fsdp and cpu_offload: true" if sharding == "ddp" else "cpu_offload: true"
        return f"{need}; set {fix} (about {estimate('fsdp', True).total / GIB:.1f} GiB per device)"
    return f"{need}; even sharding: fsdp with cpu_offload: true would not fit: use LoRA, a smaller batch_size or seq_len, gradient_checkpointing, or more GPUs"
