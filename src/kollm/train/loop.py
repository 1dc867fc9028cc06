# kollm-train: loop ready
"""The training loop shared by cpt, sft and align.

One optimizer step = `grad_accum` micro-batches of `batch_size` rows per rank. Each micro-batch returns a
summed loss and the number of items that carry it (tokens for language modelling, pairs for preferences); the
gradients are divided by the total count over all micro-batches and ranks before clipping, so the step
minimises the exact token mean however the tokens fall into micro-batches (gradient accumulation by token count).

Language-model objectives go through `kollm.train.kernels.lm_loss` (the performance seam). Rows are packed and
fixed-length, labels are pre-aligned, bf16 autocast runs on GPU, AdamW is fused where available, and the same
code runs data-parallel under torch.distributed: each rank reads its shard of the data, gradients are summed
over ranks once per optimizer step (kollm.train.reducer's bucketed all-reduce, launched during the last
micro-batch's backward pass as gradients become ready, rather than the DistributedDataParallel wrapper, because
`lm_loss` reaches into the model's decoder and head), and rank 0 logs and checkpoints. Under
`sharding: fsdp` (kollm.train.sharding) each rank holds a shard of the weights, gradients and optimizer state
instead: FSDP2 reduce-scatters the gradients, the norm is summed over the shards, and every rank writes its
shards of each checkpoint.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sized
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kollm.pipeline.lease import Lease
from kollm.pipeline.step import Progress, _no_progress
from kollm.train import checkpoint as ckpt
from kollm.train import sharding
from kollm.train.data import ResumableSampler
from kollm.train.kernels import IGNORE_INDEX, causal_lm, compile_model, decoder_layers, lm_loss
from kollm.train.reducer import GradReducer

log = logging.getLogger("kollm.train")


@dataclass
class LoopConfig:
    max_steps: int  # optimizer steps
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    batch_size: int = 8  # rows (or pairs) per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 disables clipping
    checkpoint_every: int = 0  # 0: no checkpoints
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    compile: bool = False
    gradient_checkpointing: bool = False  # recompute the layers in the backward pass (see checkpoint_layers)
    precision: str = "auto"  # auto (bf16 on a GPU that supports it, else fp32) | bf16 | fp32
    shuffle: bool = True
    sharding: str = "ddp"  # ddp: every rank holds the whole model | fsdp: FSDP2 shards (kollm.train.sharding)
    cpu_offload: bool = False  # fsdp: keep the shards (and the optimizer step) in host memory
    seq_len: int = 0  # tokens per row, for the memory estimate (0: not estimated)


@dataclass
class LossOut:
    """A micro-batch's summed loss, how many items (tokens or pairs) it sums over, and extra metric sums."""

    loss_sum: torch.Tensor
    count: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOut]


@dataclass
class StepLog:
    step: int
    epoch: int
    loss: float
    learning_rate: float
    grad_norm: float
    tokens_per_s: float
    tokens: int
    gpu_memory_gb: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # objective-specific means (e.g. DPO reward margin)


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    tokens: int
    seconds: float
    resumed_from: int | None  # the checkpoint step this run resumed from

    @property
    def final_loss(self) -> float:
        tail = self.losses[-max(1, min(10, len(self.losses) // 5)) :]
        return sum(tail) / len(tail) if tail else float("nan")


def lm_objective(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOut:
    """Next-token loss on a packed batch (no attention mask: position_ids make attention per-document)."""
    loss_sum, n = lm_loss(model, batch["input_ids"], batch["labels"], batch.get("position_ids"), None)
    return LossOut(loss_sum, n)


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def autocast_for(device: torch.device, precision: str) -> Any:
    if device.type == "cuda" and (precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def _keep_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """Selective checkpointing policy: keep what the attention kernel returns, recompute every other op."""
    from torch.utils.checkpoint import CheckpointPolicy

    name = str(op)
    return CheckpointPolicy.MUST_SAVE if "attn" in name or "attention" in name else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_layers(model: torch.nn.Module, residual_dtype: torch.dtype | None = None) -> Callable[[], None]:
    """Gradient checkpointing: keep each decoder layer's input and its attention output, and recompute the rest of
    the layer in the backward pass (the attention kernel is the costly part to recompute, its output is small).
    With `residual_dtype` (bf16 under bf16 autocast) the residual stream, and so each kept layer input, is held
    in that dtype rather than fp32. Returns the function that undoes both.

    Non-reentrant `torch.utils.checkpoint`, so torch.compile traces through it and partitions the recomputation
    like any other graph. Done here rather than through transformers' `gradient_checkpointing_enable`, whose
    behaviour differs between releases.
    """
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    layers = list(decoder_layers(model))
    for layer in layers:
        layer.forward = functools.partial(
            checkpoint,
            type(layer).forward.__get__(layer),
            use_reentrant=False,
            context_fn=lambda: create_selective_checkpoint_contexts(_keep_attention),
        )
    hook = None
    if residual_dtype is not None:
        embeddings = causal_lm(model).get_input_embeddings()
        hook = embeddings.register_forward_hook(lambda module, args, out: out.to(residual_dtype))

    def undo() -> None:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        if hook is not None:
            hook.remove()

    return undo


def _mean_and_clip(
    grads: list[torch.Tensor], denom: torch.Tensor, max_norm: float, *, sharded: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """For summed gradients over `denom` items: the norm of the mean gradient, and the one divisor that makes
    them the mean gradient clipped to `max_norm` (0: no clipping), as torch.nn.utils.clip_grad_norm_ would.
    `sharded`: `grads` are this rank's shards, and the squared norm is summed over the ranks."""
    norms = [n.float() for n in torch._foreach_norm(grads)]
    if sharded:
        squares = torch.stack(norms).square().sum().to(denom.device)
        if dist.get_world_size() > 1:
            dist.all_reduce(squares)
        norm = squares.sqrt() / denom
    else:
        norm = torch.linalg.vector_norm(torch.stack(norms)) / denom
    if max_norm <= 0:
        return norm, denom
    return norm, denom / torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def device_memory(device: torch.device) -> float | None:
    """Free bytes on `device` where known (CUDA), else None."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    return None


def check_memory(model: torch.nn.Module, cfg: LoopConfig, device: torch.device, world: int, *, bf16: bool) -> None:
    """Log the memory estimate of the configured run; when the device's free memory is known and the estimate
    does not fit it, fail now with the setting that would fit (sharding: fsdp, cpu_offload: true)."""
    from kollm.errors import ConfigError

    if not cfg.seq_len:
        return
    lm_config = causal_lm(model).config.get_text_config()
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params) or 1
    trainable = sum(p.numel() for p in params if p.requires_grad)
    trainable_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    # parameters already on the device are part of the budget that mem_get_info no longer reports as free
    resident = sum(p.numel() * p.element_size() for p in params if p.device.type == device.type)

    def estimate(sharding_: str, offload: bool) -> sharding.MemoryEstimate:
        return sharding.estimate_memory(
            params=n_params,
            trainable=trainable,
            layers=lm_config.num_hidden_layers,
            hidden=lm_config.hidden_size,
            vocab=lm_config.vocab_size,
            tokens=cfg.batch_size * cfg.seq_len,
            world=world,
            sharding=sharding_,
            cpu_offload=offload,
            param_bytes=sum(p.numel() * p.element_size() for p in params) / n_params,
            grad_bytes=trainable_bytes / trainable if trainable else 4,
            compute_bytes=2 if bf16 else 4,
            gradient_checkpointing=cfg.gradient_checkpointing,
        )

    chosen = estimate(cfg.sharding, cfg.cpu_offload)
    log.info(
        "memory estimate per device (sharding: %s, cpu_offload: %s): %s",
        cfg.sharding,
        cfg.cpu_offload,
        chosen.describe(),
    )
    available = device_memory(device)
    if available is not None:
        available += resident
        problem = sharding.check_fits(available, estimate, cfg.sharding, cfg.cpu_offload)
        if problem is not None:
            raise ConfigError(problem)


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig, device: torch.device) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused on the GPU (DTensor shards too) and for shards offloaded to host memory (the fused CPU kernel)
    fused = (device.type == "cuda" or (cfg.sharding == "fsdp" and cfg.cpu_offload)) and all(
        p.dtype.is_floating_point for p in decay + no_decay
    )
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: LoopConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(
    dataset: torch.utils.data.Dataset,
    cfg: LoopConfig,
    collate: Callable | None,
    state: ckpt.TrainState,
    device: torch.device,
) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """(epoch, offset after this batch, batch) forever, starting at the saved data position."""
    rank, world = rank_and_world()
    if not isinstance(dataset, Sized):
        raise TypeError(f"training needs a map-style dataset (with __len__), not a {type(dataset).__name__}")
    n = len(dataset)
    epoch, offset = state.epoch, state.offset
    per_rank = n // world
    if per_rank == 0:
        raise ValueError(f"the dataset has {n} examples, fewer than the {world} ranks training on it")
    while True:
        if offset >= per_rank:
            epoch, offset = epoch + 1, 0
        sampler = ResumableSampler(
            n, seed=cfg.seed, epoch=epoch, offset=offset, rank=rank, world=world, shuffle=cfg.shuffle
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            num_workers=0,
        )
        for batch in loader:
            offset = min(per_rank, offset + cfg.batch_size)
            yield epoch, offset, {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        offset = per_rank


def train(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    cfg: LoopConfig,
    *,
    device: torch.device,
    objective: LossFn = lm_objective,
    collate: Callable | None = None,
    checkpoint_dir: Path | None = None,
    checkpoint_remote: str | None = None,
    lease: Lease | None = None,
    progress: Progress = _no_progress,
    on_log: Callable[[StepLog], None] | None = None,
    description: str = "training",
) -> TrainResult:
    """Train `model` in place for `cfg.max_steps` optimizer steps, resuming from the newest checkpoint in
    `checkpoint_dir` if there is one. With `checkpoint_remote` (a folder in the artifact store) checkpoints are
    also uploaded there, and the newest one there is pulled first: a run on another node resumes from it. With
    `lease` (the attempt's, kollm.pipeline.lease) every checkpoint is written only while the step is not published:
    an attempt left running stops with Superseded instead.
    `on_log` is called on rank 0 every `cfg.log_every` steps and at the end."""
    rank, world = rank_and_world()
    torch.manual_seed(cfg.seed + rank)
    autocast = autocast_for(device, cfg.precision)
    bf16 = isinstance(autocast, torch.autocast) and autocast.fast_dtype == torch.bfloat16
    sharded = cfg.sharding == "fsdp"
    check_memory(model, cfg, device, world, bf16=bf16)
    per_layer = sharded and sharding.per_layer_units(world, cfg.cpu_offload)
    if sharded:  # fully_shard moves each layer's shard to the device (or, with cpu_offload, to host memory)
        sharding.shard(model, device=device, bf16=bf16, cpu_offload=cfg.cpu_offload, per_layer=per_layer)
        raw = model
    else:
        raw = model.to(device)
    raw.train()
    optimizer = make_optimizer(raw, cfg, device)
    fused_optimizer = bool(optimizer.defaults.get("fused"))
    scheduler = make_scheduler(optimizer, cfg)
    state = ckpt.TrainState()
    resumed_from = None
    if checkpoint_remote and checkpoint_dir is not None:
        ckpt.pull(checkpoint_remote, checkpoint_dir)
    last = ckpt.latest(checkpoint_dir)
    if last is not None:
        state = (ckpt.load_sharded if sharded else ckpt.load)(last, raw, optimizer, scheduler)
        resumed_from = state.step
        if state.world != world:  # the data position counts items per rank: the same global position
            state.offset = state.offset * state.world // world
    state.world = world
    params = [p for p in raw.parameters() if p.requires_grad]
    reducer = None
    if world > 1 and not sharded:  # every rank starts from rank 0's weights (shard broadcasts them itself)
        for p in raw.parameters():
            dist.broadcast(p.data, src=0)
        reducer = GradReducer(params)  # sums the gradients over ranks during the last micro-batch's backward
    undo_checkpointing = None
    if cfg.gradient_checkpointing:
        undo_checkpointing = checkpoint_layers(raw, torch.bfloat16 if bf16 else None)
    # fsdp with a unit per layer: one graph per layer, FSDP's gathers between them (torch._dynamo skips FSDP's hooks)
    model = compile_model(raw, per_layer=per_layer) if cfg.compile else raw
    batches = _batches(dataset, cfg, collate, state, device)
    started = time.perf_counter()
    window_t, window_tokens = time.perf_counter(), 0
    pending: list[torch.Tensor] = []  # step losses not yet read back from the device

    def flush() -> None:
        if pending:
            state.losses.extend(torch.stack(pending).tolist())
            pending.clear()

    for step in progress(range(state.step, cfg.max_steps), total=cfg.max_steps - state.step, description=description):
        loss_sum = torch.zeros((), device=device)
        count = torch.zeros((), device=device)
        metric_sums: dict[str, torch.Tensor] = {}
        step_tokens = 0
        for micro in range(cfg.grad_accum):
            epoch, offset, batch = next(batches)
            with autocast:
                out = sharding.call(model, objective, batch)
            if reducer is not None and micro == cfg.grad_accum - 1:
                reducer.arm()
            out.loss_sum.backward()
            loss_sum += out.loss_sum.detach().float()
            count += out.count.detach().float()
            for k, v in out.metrics.items():
                metric_sums[k] = metric_sums.get(k, torch.zeros((), device=device)) + v.detach().float()
            step_tokens += batch["input_ids"].numel()
        totals = torch.stack([loss_sum, count, *metric_sums.values()])
        if reducer is not None:  # every rank issues the buckets' all-reduces in one order, then the totals'
            reducer.finish()
        if world > 1:  # the gradients are sums over ranks now (FSDP reduce-scattered them in the backward pass)
            dist.all_reduce(totals)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        denom = totals[1].clamp(min=1)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        if sharded:  # this rank's shards (on the host with cpu_offload)
            shards = [sharding.local(g) for g in grads]
            grad_norm, divisor = _mean_and_clip(shards, denom, cfg.grad_clip, sharded=True)
            divisor = divisor.to(shards[0].device) if shards else divisor
            del shards
        else:
            grad_norm, divisor = _mean_and_clip(grads, denom, cfg.grad_clip)  # tensors: no host sync
        if fused_optimizer:  # the fused kernel divides the gradients as it reads them: no extra pass over them
            # the hook torch.amp.GradScaler uses; Optimizer does not declare it (GradScaler sets it under an ignore too)
            optimizer.grad_scale = divisor  # type: ignore[attr-defined]
        else:
            torch._foreach_div_([sharding.local(g) for g in grads] if sharded else grads, divisor)
        del grads  # kept to the next step, the list would hold last step's gradients through its whole forward
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append(totals[0] / denom)  # read back (a host sync) only when logging or checkpointing
        state.step, state.epoch, state.offset = step + 1, epoch, offset
        state.tokens += step_tokens * world
        window_tokens += step_tokens * world
        if (
            cfg.checkpoint_every
            and state.step % cfg.checkpoint_every == 0
            and state.step < cfg.max_steps
            and checkpoint_dir is not None
        ):
            flush()
            saved = None
            what = f"the checkpoint of step {state.step}"
            if lease is not None and (sharded or rank == 0):  # the ranks that write
                lease.check(what)
            if sharded:
                saved = ckpt.save_sharded(checkpoint_dir, raw, optimizer, scheduler, state, keep=cfg.keep_checkpoints)
            elif rank == 0:
                saved = ckpt.save(checkpoint_dir, raw, optimizer, scheduler, state, keep=cfg.keep_checkpoints)
            pushed = None
            if checkpoint_remote and rank == 0 and saved is not None:
                pushed = ckpt.push(checkpoint_remote, saved, keep=cfg.keep_checkpoints)
            if lease is not None and rank == 0 and saved is not None:  # published while it was written: undone
                lease.written(what, [saved], [pushed] if pushed else [])
            if world > 1 and not sharded:
                dist.barrier()
        if rank == 0 and on_log is not None and (state.step % cfg.log_every == 0 or state.step == cfg.max_steps):
            flush()
            now = time.perf_counter()
            metrics = {k: (v / denom).item() for k, v in zip(metric_sums, totals[2:], strict=True)}
            on_log(
                StepLog(
                    step=state.step,
                    epoch=epoch,
                    loss=state.losses[-1],
                    learning_rate=float(lr),  # get_last_lr() is typed float | Tensor
                    grad_norm=float(grad_norm),
                    tokens_per_s=window_tokens / max(now - window_t, 1e-9),
                    tokens=state.tokens,
                    gpu_memory_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                    metrics=metrics,
                )
            )
            window_t, window_tokens = now, 0
    flush()
    if reducer is not None:
        reducer.remove()
    if undo_checkpointing is not None:
        undo_checkpointing()
    raw.eval()
    return TrainResult(
        steps=state.step,
        losses=state.losses,
        tokens=state.tokens,
        seconds=time.perf_counter() - started,
        resumed_from=resumed_from,
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    device: torch.device,
    batch_size: int = 8,
    objective: LossFn = lm_objective,
    collate: Callable | None = None,
    precision: str = "auto",
) -> tuple[float, dict[str, float]]:
    """Mean loss (and objective metrics) over a whole dataset, without gradients."""
    model.eval()
    loss_sum, count = 0.0, 0.0
    sums: dict[str, float] = {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    with autocast_for(device, precision):
        for batch in loader:
            out = sharding.call(model, objective, {k: v.to(device) for k, v in batch.items()})
            loss_sum += out.loss_sum.float().item()
            count += out.count.float().item()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + v.float().item()
    denom = max(count, 1.0)
    return loss_sum / denom, {k: v / denom for k, v in sums.items()}


def loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a batch of aligned labels (the first position never predicts anything)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
