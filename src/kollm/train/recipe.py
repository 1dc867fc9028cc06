"""What cpt, sft and align share around the loop: resolving the base model, loading it, logging training,
saving the Model artifact, and running the same training function in one process or across GPUs (DDP).

A step builds a picklable `Job` from its StepContext and hands it with its training function to `execute`.
The training function (a module-level function of the step) gets the Job and an `Env` (device, rank, logging)
and returns a StepResult; under `resources.gpus > 1` every rank runs it and rank 0 writes the artifact.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kollm.adapter import base_vocab_rows, folder_digest_cached
from kollm.errors import ConfigError, StepFailed
from kollm.jsonlog import JsonLog
from kollm.pipeline import sweep
from kollm.pipeline.lease import Lease
from kollm.pipeline.progress import progress_note
from kollm.pipeline.step import Artifact, Progress, StepContext, StepResult, _no_progress
from kollm.train import modeling
from kollm.train.config import PRESETS, TrainingConfig
from kollm.train.kernels import attention_implementation, causal_lm
from kollm.train.loop import LoopConfig, StepLog, TrainResult

log = logging.getLogger("kollm.train")
LINEAGE_FILE = "kollm.json"


@dataclass(frozen=True)
class Job:
    """Everything a training function needs, picklable so that GPU worker processes can receive it."""

    step: str
    kind: str
    config: TrainingConfig
    data: Artifact  # the step's dataset
    base_model: str  # "scratch", a hub name, or a folder
    base_artifact: Artifact | None  # the `model` input, when the base model came from a previous step
    tokenizer_corpus: Artifact | None  # for scratch: the corpus to train the tokenizer on
    output_dir: Path  # where the Model artifact goes
    checkpoint_dir: Path
    log_file: Path  # JSON lines
    lineage: dict[str, Any] = field(default_factory=dict)  # run ids and input digests for kollm.json
    project_dir: Path | None = None  # where user modules (a GRPO reward function) are imported from
    checkpoint_remote: str | None = None  # checkpoints mirrored into the artifact store (a retry on another node)
    lease: Lease | None = None  # the attempt's lease on checkpoint_dir: nothing is written once the step is published


@dataclass
class Env:
    """Per-process environment of a training function."""

    device: torch.device
    rank: int = 0
    world: int = 1
    progress: Progress = _no_progress
    on_log: Callable[[StepLog], None] | None = None
    log_params: Callable[[dict[str, Any]], None] = lambda params: None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------- job from the step context


def make_job(ctx: StepContext, *, default_scratch: bool) -> Job:
    cfg: TrainingConfig = ctx.config
    data = ctx.inputs["data"]
    base_artifact = ctx.inputs.get("model")
    if cfg.base_model:
        base = cfg.base_model
        local = ctx.project_dir / base
        if base != "scratch" and local.exists():
            base = str(local.resolve())
        base_artifact = None
    elif base_artifact is not None:
        base = str(base_artifact.path)
    elif default_scratch:
        base = "scratch"
    else:
        raise ConfigError(
            f"steps.{ctx.name}.config.base_model: {ctx.kind} needs a base model; set base_model (a hub name, a folder, or scratch) "
            "or put a step that outputs a model (cpt, sft) before it"
        )
    if base == "scratch" and cfg.lora is not None and not cfg.lora.merge:
        raise ConfigError(
            f"steps.{ctx.name}.config.lora.merge: with base_model: scratch the base is built inside this step, so a "
            "LoRA adapter would have no base to refer to; set lora: {merge: true} (or train the scratch model first)"
        )
    if cfg.chat_template and cfg.chat_template.endswith(".jinja") and (ctx.project_dir / cfg.chat_template).exists():
        cfg = cfg.model_copy(update={"chat_template": str((ctx.project_dir / cfg.chat_template).resolve())})
    elif cfg.chat_template and cfg.chat_template.endswith(".jinja") and not Path(cfg.chat_template).exists():
        raise ConfigError(
            f"steps.{ctx.name}.config.chat_template: no file {cfg.chat_template} (relative to {ctx.project_dir})"
        )
    corpus = None
    if base == "scratch":
        corpus = data if data.type == "corpus" else _latest_corpus(ctx)
    inputs = {name: {"type": a.type, "digest": a.digest} for name, a in ctx.inputs.items()}
    if corpus is not None and corpus is not data:
        inputs["tokenizer_corpus"] = {"type": corpus.type, "digest": corpus.digest}
    lineage = {
        "pipeline_run_id": ctx.run_id,
        "step_run_id": ctx.tracker.run_id if ctx.tracker is not None else None,
        "inputs": inputs,
    }
    return Job(
        step=ctx.name,
        kind=ctx.kind,
        config=cfg,
        data=data,
        base_model=base,
        base_artifact=base_artifact,
        tokenizer_corpus=corpus,
        output_dir=ctx.output_path("model"),
        checkpoint_dir=ctx.checkpoint_dir,
        checkpoint_remote=ctx.checkpoint_remote,
        lease=ctx.lease,
        log_file=ctx.logs_dir("training") / f"{ctx.name}.jsonl",
        lineage=lineage,
        project_dir=ctx.project_dir,
    )


def _latest_corpus(ctx: StepContext) -> Artifact | None:
    for a in ctx.inputs.values():
        if a.type == "corpus":
            return a
    for record in reversed(ctx.upstream):
        for a in record.outputs.values():
            if a.type == "corpus":
                return a
    return None


# ---------------------------------------------------------------- running it


def execute(ctx: StepContext, job: Job, fn: Callable[[Job, Env], StepResult]) -> StepResult:
    """Run `fn(job, env)` here, or on `resources.gpus` GPUs (one process each, DDP) when that is more than 1, or on
    `resources.workers` CPU processes (DDP over gloo). Under the ray executor: on that many Ray Train workers."""
    gpus = ctx.resources.gpus
    # Honour resources.cpus: on a shared machine, extra intra-op threads contend and slow training down.
    torch.set_num_threads(max(1, int(ctx.resources.cpus)))
    if ctx.tracker is not None:
        ctx.tracker.log_dataset(job.data, name=f"{job.step}-data", context="training")
    training_log = TrainingLog(
        job.log_file, job.step, ctx.tracker, job.lineage.get("step_run_id"), progress=ctx.progress
    )
    if ctx.executor == "ray":
        from kollm.train.ray_train import launch_ray

        workers = gpus or ctx.resources.workers
        return launch_ray(
            fn,
            job,
            workers=workers,
            use_gpu=gpus > 0,
            cpus_per_worker=ctx.resources.cpus / workers,
            progress=ctx.progress,
            training_log=training_log,
        )
    if gpus == 0 and ctx.resources.workers > 1:
        return launch(
            fn, job, world=ctx.resources.workers, backend="gloo", progress=ctx.progress, training_log=training_log
        )
    if gpus > 1:
        available = torch.cuda.device_count()
        if available < gpus:
            raise StepFailed(
                f"steps.{ctx.name}.resources.gpus is {gpus} but this host has {available} CUDA GPU(s); lower resources.gpus"
            )
        return launch(fn, job, world=gpus, backend="nccl", progress=ctx.progress, training_log=training_log)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = Env(device=device, progress=ctx.progress, on_log=training_log, log_params=training_log.log_params)
    if job.config.sharding == "fsdp":  # FSDP over a process group of one: the same code as on N processes
        from kollm.train.sharding import process_group

        with process_group(device):
            return fn(job, env)
    return fn(job, env)


def launch(
    fn: Callable[[Job, Env], StepResult],
    job: Job,
    *,
    world: int,
    backend: str,
    progress: Progress = _no_progress,
    training_log: TrainingLog | None = None,
) -> StepResult:
    """Run `fn` on `world` processes of this host under torch.distributed (nccl on GPUs, gloo on CPU).

    Rank 0 appends its logs to the job's JSON log; this process forwards them to the tracker and the progress bar."""
    import torch.multiprocessing as mp

    result_file = job.checkpoint_dir / f"result-{os.getpid()}.json"
    result_file.unlink(missing_ok=True)
    job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_offset = job.log_file.stat().st_size if job.log_file.exists() else 0
    context = mp.start_processes(
        _worker, args=(fn, job, world, backend, port, result_file), nprocs=world, join=False, start_method="spawn"
    )

    def events() -> Iterator[int]:
        offset = start_offset
        done = False
        while not done:
            try:
                done = context.join(timeout=0.5)
            except mp.ProcessRaisedException as e:
                last = str(e).strip().splitlines()[-1]
                raise StepFailed(f"a training process failed: {last}") from None
            except mp.ProcessExitedException as e:
                raise StepFailed(f"a training process died: {e}") from None
            lines, offset = _read_new_lines(job.log_file, offset)
            for line in lines:
                record = json.loads(line)
                if record.get("event") == "params":
                    if training_log is not None and training_log.tracker is not None:
                        training_log.tracker.log_params(record["params"])
                    continue
                if record.get("event") != "train_metrics":
                    continue
                if training_log is not None:
                    training_log.forward(record)
                    training_log.show(record)
                yield record["global_step"]

    for _ in progress(events(), total=None, description=f"{job.step} ({world} processes)"):
        pass
    if not result_file.exists():
        raise StepFailed("the training processes ended without a result")
    data = json.loads(result_file.read_text())
    result_file.unlink()
    return StepResult(metrics=data["metrics"], meta=data["meta"])


def _read_new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """The complete lines written to `path` since `offset`, and the new offset. A file smaller than `offset` was
    rotated (kollm.jsonlog): the rest of `path.1` comes first, then the new file from its start."""
    if not path.exists():
        return [], offset
    before: list[str] = []
    if path.stat().st_size < offset:
        rotated = path.with_name(f"{path.name}.1")
        if rotated.exists():
            before, _ = _read_new_lines(rotated, offset)
        offset = 0
    with open(path, "rb") as f:
        f.seek(offset)
        chunk = f.read()
    complete = chunk[: chunk.rfind(b"\n") + 1]
    return before + [ln for ln in complete.decode().splitlines() if ln.strip()], offset + len(complete)


def _worker(
    rank: int, fn: Callable[[Job, Env], StepResult], job: Job, world: int, backend: str, port: int, result_file: Path
) -> None:
    import torch.distributed as dist

    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
        }
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        training_log = TrainingLog(job.log_file, job.step, None, job.lineage.get("step_run_id")) if rank == 0 else None
        env = Env(
            device=device,
            rank=rank,
            world=world,
            on_log=training_log,
            log_params=training_log.log_params if training_log else (lambda params: None),
        )
        result = fn(job, env)
        if rank == 0:
            tmp = result_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"metrics": result.metrics, "meta": result.meta}))
            os.replace(tmp, result_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- logging


class TrainingLog:
    """on_log hook: a `train_metrics` line (kollm.jsonlog, component "train") in .kollm/logs/training/<step>.jsonl
    every `log_every` optimizer steps, MLflow metrics, and the latest loss beside the progress bar."""

    def __init__(
        self, path: Path, step_name: str, tracker: Any, run_id: str | None = None, progress: Progress = _no_progress
    ):
        self.path = path
        self.step_name = step_name
        self.tracker = tracker
        self.run_id = run_id  # the step's MLflow run: each line names it (every run of a step shares the file)
        self.progress = progress  # the step's ctx.progress: the training loop's bar shows the loss
        self.log = JsonLog(path, "train", step=step_name)

    def _record(self, event: str, level: str = "INFO", **fields: Any) -> dict[str, Any]:
        return self.log.record(event, level, **fields)

    def _write(self, record: dict[str, Any]) -> None:
        self.log.write_record(record)

    def __call__(self, entry: StepLog) -> None:
        fields: dict[str, Any] = {
            "epoch": entry.epoch,
            "global_step": entry.step,
            "loss": entry.loss,
            "learning_rate": entry.learning_rate,
            "grad_norm": entry.grad_norm,
            "tokens_per_s": entry.tokens_per_s,
            "tokens": entry.tokens,
        }
        if entry.gpu_memory_gb is not None:
            fields["gpu_memory_gb"] = entry.gpu_memory_gb
        fields.update({k: v for k, v in entry.metrics.items() if k not in fields})
        if self.run_id:
            fields["run_id"] = self.run_id
        record = self._record("train_metrics", "INFO" if math.isfinite(entry.loss) else "WARNING", **fields)
        self._write(record)
        self.show(record)
        if self.tracker is not None:
            self.forward(record)

    def show(self, record: dict[str, Any]) -> None:
        """The record's loss beside the progress bar the training loop has open."""
        if isinstance(record.get("loss"), (int, float)):
            progress_note(self.progress, loss=float(record["loss"]))

    def forward(self, record: dict[str, Any]) -> None:
        """Send a `train_metrics` line's numbers to MLflow as step metrics."""
        if self.tracker is None:
            return
        skip = {"global_step", "epoch"}
        metrics = {
            k: float(v)
            for k, v in record.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        metrics["epoch"] = float(record["epoch"])
        self.tracker.log_metrics(metrics, step=int(record["global_step"]))
        # sweep hook: inside a Ray Tune trial, feeds ASHA
        sweep.report_progress(metrics, int(record["global_step"]), getattr(self.tracker, "run_id", None))

    def log_params(self, params: dict[str, Any]) -> None:
        if self.tracker is not None:
            self.tracker.log_params(params)
        else:  # a worker process: the parent forwards it
            self._write(self._record("params", params=params))


# ---------------------------------------------------------------- models


def load_base(job: Job, env: Env, texts: Callable[[], list[str]]) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The model and tokenizer to train, LoRA-wrapped when configured, with a chat template.

    `texts` gives the tokenizer-training text for scratch when the job has no corpus artifact."""
    cfg = job.config
    attn = attention_implementation(env.device)
    quantize = cfg.lora.quantize if cfg.lora else None
    if job.base_model == "scratch":
        tokenizer = _scratch_tokenizer(job, env, texts)
        model = modeling.scratch_model(
            cfg.preset, tokenizer, seed=cfg.seed, attn_implementation=attn, architecture=cfg.architecture
        )
        base = {"source": "scratch", "preset": cfg.preset, "vocab_size": len(tokenizer)}
        if cfg.architecture is not None:
            base["architecture"] = cfg.architecture
        if quantize:
            raise ConfigError("lora.quantize: QLoRA needs a pretrained base model, not scratch")
    else:
        dtype = torch.bfloat16 if (cfg.lora and env.device.type == "cuda") else torch.float32
        if quantize and env.world > 1:
            raise ConfigError("lora.quantize: QLoRA runs on one GPU; set resources.gpus to 1")
        model, tokenizer = modeling.load_pretrained(
            job.base_model, attn_implementation=attn, quantize=quantize, dtype=dtype
        )
        base = {"source": job.base_model if job.base_artifact is None else "artifact"}
        if job.base_artifact is not None:
            base.update(path=str(job.base_artifact.path), digest=job.base_artifact.digest)
            upstream = job.base_artifact.path / LINEAGE_FILE if job.base_artifact.path else None
            if upstream is not None and upstream.exists():
                base["lineage"] = json.loads(upstream.read_text()).get("base_model")
        elif cfg.lora and not cfg.lora.merge:  # the adapter refers to this folder by digest
            folder = _base_folder(job.base_model)
            base.update(path=str(folder), digest=folder_digest_cached(folder, job.project_dir))
    rows = base_vocab_rows(model)
    modeling.ensure_chat_template(model, tokenizer, cfg.chat_template)
    if base_vocab_rows(model) != rows:  # chat tokens were added: an adapter carries the resized embeddings
        base["resized_to"] = base_vocab_rows(model)
    if cfg.lora:
        lr = cfg.lora
        model = modeling.apply_lora(
            model,
            r=lr.r,
            alpha=lr.alpha,
            dropout=lr.dropout,
            target_modules=lr.target_modules,
            quantized=bool(quantize),
        )
    trainable, total = modeling.count_parameters(model)
    base.update(trainable_params=trainable, total_params=total)
    return model, tokenizer, base


def _base_folder(base_model: str) -> Path:
    """The local folder of a base model (a folder, or a hub name's snapshot in the Hugging Face cache)."""
    if Path(base_model).is_dir():
        return Path(base_model).resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base_model, local_files_only=True))
    except Exception as e:  # huggingface_hub raises several types for a name it has no snapshot of
        raise ConfigError(
            f"lora: the base model {base_model} has no local folder for the adapter to refer to ({type(e).__name__})",
            hint="download it first (huggingface-cli download), or set lora: {merge: true} for a merged folder",
        ) from None


def _scratch_tokenizer(job: Job, env: Env, texts: Callable[[], list[str]]) -> Any:
    """Train the scratch tokenizer once per checkpoint folder (rank 0), so that every rank and a resumed run
    use the very same vocabulary."""
    from transformers import AutoTokenizer

    saved = job.checkpoint_dir / "tokenizer"
    if env.rank == 0 and not (saved / "tokenizer.json").exists():
        if job.tokenizer_corpus is not None and job.tokenizer_corpus.path is not None:
            from kollm.train.data import read_split

            corpus = read_split(job.tokenizer_corpus.path, "train", "text")
        else:
            corpus = texts()
        if not corpus:
            raise StepFailed("base_model: scratch needs text to train its tokenizer, but the corpus is empty")
        vocab = job.config.vocab_size or PRESETS[job.config.preset].vocab
        if job.config.architecture is not None:
            from kollm.train.architectures import train_tokenizer

            tokenizer = train_tokenizer(corpus, vocab, job.config.architecture)
        else:
            tokenizer = modeling.train_tokenizer(corpus, vocab)
        tmp = job.checkpoint_dir / f".tmp-tokenizer-{os.getpid()}"
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, saved)
    if env.world > 1:
        import torch.distributed as dist

        dist.barrier()
    return AutoTokenizer.from_pretrained(saved)


def loop_config(cfg: TrainingConfig, n_items: int, world: int, *, seq_len: int | None = None) -> LoopConfig:
    seq = seq_len or cfg.seq_len
    grad_accum = max(1, math.ceil(cfg.tokens_per_step / (cfg.batch_size * seq * world))) if cfg.tokens_per_step else 1
    per_step = cfg.batch_size * grad_accum * world
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * n_items / per_step))
    return LoopConfig(
        max_steps=max_steps,
        lr=cfg.lr,
        min_lr_ratio=cfg.min_lr_ratio,
        warmup_steps=min(cfg.warmup_steps, max_steps - 1),
        batch_size=cfg.batch_size,
        grad_accum=grad_accum,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
        checkpoint_every=cfg.checkpoint_every,
        log_every=cfg.log_every,
        seed=cfg.seed,
        compile=cfg.compile,
        gradient_checkpointing=cfg.gradient_checkpointing,
        precision=cfg.precision,
        sharding=cfg.sharding,
        cpu_offload=cfg.cpu_offload,
        seq_len=seq,
    )


def params_for_tracking(job: Job, loop: LoopConfig, **extra: Any) -> dict[str, Any]:
    """Derived settings (the runner logs the step's config itself), prefixed `train.`."""
    params = {"base_model": job.base_model, "grad_accum": loop.grad_accum, "total_steps": loop.max_steps, **extra}
    return {f"train.{k}": v for k, v in params.items() if v is not None}


def save_model(
    model: torch.nn.Module,
    tokenizer: Any,
    job: Job,
    env: Env,
    *,
    base: dict[str, Any],
    result: TrainResult,
    metrics: dict[str, float],
) -> dict[str, Any]:
    """Write the Model artifact (rank 0; every rank calls it): a plain Hugging Face folder (safetensors in 5 GB
    shards, tokenizer with chat template, generation config) + kollm.json; LoRA adapters also in adapter/. A
    sharded (fsdp) model is gathered onto rank 0 first. Returns the artifact's meta (empty on the other ranks)."""
    from transformers import GenerationConfig

    from kollm.train import sharding

    if sharding.root_of(model) is not None:
        state = sharding.full_state_dict(model)  # a collective
        if not env.is_main:
            return {}
        model = sharding.plain_model(model, state)
        del state
    elif not env.is_main:
        return {}
    if job.lease is not None:  # an attempt left running whose step was published since: it writes no model
        job.lease.check("the model")
    out = job.output_dir
    out.mkdir(parents=True, exist_ok=True)
    cfg = job.config
    final: torch.nn.Module
    lora_meta: dict[str, Any] | None = None
    if cfg.lora:
        from peft import PeftModel

        assert isinstance(model, PeftModel), "a LoRA job's model is the PeftModel that load_base made"
        if cfg.lora.merge:
            model.save_pretrained(str(out / "adapter"))
            final = _merge_from_disk(job, out / "adapter") if cfg.lora.quantize else model.merge_and_unload()
            causal_lm(final).config.use_cache = True
            causal_lm(final).save_pretrained(out, max_shard_size="5GB")
            lora_meta = {"adapter": "adapter", "merged": True}
        else:  # the adapter alone (PEFT format), its base referred to by digest and location
            model.peft_config["default"].base_model_name_or_path = str(base["path"])
            model.save_pretrained(str(out), save_embedding_layers=bool(base.get("resized_to")))
            lora_meta = {
                "adapter": ".",
                "merged": False,
                "base": {"digest": base["digest"], "path": base["path"], "source": base["source"]},
                "vocab_size": base.get("resized_to"),
            }
    else:
        causal_lm(model).config.use_cache = True
        causal_lm(model).save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    gen = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=modeling.end_of_turn_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=256,
    )
    gen.save_pretrained(out)
    lineage = {
        "format": "kollm.model/1",
        "kind": job.kind,
        "step": job.step,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "base_model": base,
        "config": cfg.model_dump(mode="json"),
        "data": job.lineage.get("inputs", {}),
        "pipeline_run_id": job.lineage.get("pipeline_run_id"),
        "step_run_id": job.lineage.get("step_run_id"),
        "lora": lora_meta,
        "training": {
            "steps": result.steps,
            "tokens": result.tokens,
            "seconds": round(result.seconds, 2),
            "resumed_from": result.resumed_from,
        },
        "metrics": metrics,
        "versions": _versions(),
    }
    (out / LINEAGE_FILE).write_text(json.dumps(lineage, ensure_ascii=False, indent=2))
    return {
        "base_model": base.get("source"),
        "kind": job.kind,
        "params": base.get("total_params"),
        "trainable_params": base.get("trainable_params"),
        "lora": bool(cfg.lora),
        "adapter": bool(lora_meta and not lora_meta["merged"]),
        "base_digest": base.get("digest"),
        "chat_template": True,
    }


def _merge_from_disk(job: Job, adapter_dir: Path) -> torch.nn.Module:
    """QLoRA: reload the base unquantized in bf16 and merge the adapter into it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(job.base_model, dtype=torch.bfloat16)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def _versions() -> dict[str, str]:
    import peft
    import transformers

    from kollm._version import __version__ as kollm_version

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "kollm": kollm_version,
    }


def step_metrics(
    result: TrainResult, eval_loss: float | None, extra: dict[str, float] | None = None
) -> dict[str, float]:
    """The step's summary metrics (logged once, at step 0): keys of their own, none of the per-step keys that
    TrainingLog sends (loss, tokens, ...), so MLflow's charts of those do not jump back to step 0."""
    metrics = {
        "train_loss": result.final_loss,
        "steps": float(result.steps),
        "total_tokens": float(result.tokens),
        "train_seconds": result.seconds,
    }
    if eval_loss is not None:
        metrics["eval_loss"] = eval_loss
    if result.resumed_from is not None:  # `kollm run` says so on the step's line
        metrics["resumed_from_step"] = float(result.resumed_from)
    metrics.update(extra or {})
    return metrics
