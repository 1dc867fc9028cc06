"""Training throughput: TRL SFTTrainer against kollm's sft and cpt training, same model, same data, one run.

The claim: kollm's packed training (per-document varlen attention, chunked linear cross-entropy, per-layer
torch.compile, fused AdamW) trains the 349M Llama-shaped model on SFT data with lognormal lengths at
several times TRL's throughput, with no higher peak memory and the same losses.

Runs (each from the same initial weights, on the same examples, in this one process):
  trl_default       SFTTrainer with its defaults (padded batches of 8 examples, gradient checkpointing, bf16)
  trl_packed        + packing=True (best-fit-decreasing rows, padding-free batches)
  trl_packed_liger  + use_liger_kernel=True
  plain_compiled    a plain PyTorch loop: 8 x 2048 causal rows (no document masking), torch.compile, fused AdamW
  kollm_sft         kollm.train.data.pack_examples + kollm.train.loop.train (loss on completions only)
  kollm_cpt         kollm.train.data.pack_stream + kollm.train.loop.train (loss on every token)
  kollm_sft_lowmem  kollm_sft with gradient_checkpointing: true (each layer but its attention recomputed in the
                    backward pass, bf16 residual stream) and smaller loss chunks: below the memory of TRL's runs,
                    which checkpoint activations by default
  kollm_cpt_lowmem  kollm_cpt with the same settings as kollm_sft_lowmem

Throughput counts real (non-padding) tokens only. MFU = 6 * parameters * tokens/s / 989 TFLOP/s (H100 SXM
dense bf16), the convention of the issue's reference numbers.

  python benchmarks/train_throughput.py                      # GPU: the full comparison, JSON in benchmarks/results/
  python benchmarks/train_throughput.py --cpu --tiny         # a few steps of a tiny model on CPU (a smoke check)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kollm.train import data as kdata  # noqa: E402
from kollm.train import kernels  # noqa: E402
from kollm.train import loop as kloop  # noqa: E402
from kollm.train.config import PRESETS, Preset  # noqa: E402

PEAK_FLOPS = 989e12  # H100 SXM dense bf16
PAD_ID = 0  # never produced by the data generator
ALL_RUNS = (
    "trl_default",
    "trl_packed",
    "trl_packed_liger",
    "plain_compiled",
    "kollm_sft",
    "kollm_cpt",
    "kollm_sft_lowmem",
    "kollm_cpt_lowmem",
)


# The 349M shape is kollm's `base` scratch preset; `tiny` is a CPU smoke check.
SHAPES = {
    "349m": PRESETS["base"],
    "tiny": Preset(
        hidden=64, layers=2, heads=4, kv_heads=2, intermediate=160, vocab=512, max_positions=128, tied=False
    ),
}


@dataclass
class RunResult:
    name: str
    tokens_per_s: float
    mfu: float
    peak_memory_gib: float | None
    measured_steps: int
    real_tokens: int
    seconds: float
    losses: list[float]
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ------------------------------------------------------------------------------------------ model and data


def build_model(shape: Preset, max_len: int, attn: str, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_len,
        tie_word_embeddings=shape.tied,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


@dataclass
class Example:
    ids: np.ndarray  # int32 tokens in [3, vocab)
    prompt_len: int  # the first prompt_len tokens carry no loss in SFT


def make_examples(
    n: int, vocab: int, *, min_len: int, max_len: int, median: float, sigma: float = 1.0, seed: int = 0
) -> list[Example]:
    """SFT examples with lognormal lengths in [min_len, max_len]. Tokens follow a Zipf unigram plus a fixed
    bigram map (half the tokens are a function of the previous draw), so the loss has something to fall to."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(median), sigma, n), min_len, max_len).astype(np.int64)
    ranks = np.arange(1, vocab - 2, dtype=np.float64)
    p = 1.0 / (ranks + 10.0) ** 1.1
    p /= p.sum()
    total = int(lengths.sum())
    z = rng.choice(np.arange(3, vocab), size=total + 1, p=p)
    perm = rng.permutation(np.arange(3, vocab))
    follow = rng.random(total) < 0.5
    x = np.where(follow, perm[z[:-1] - 3], z[1:]).astype(np.int32)
    out, off = [], 0
    for length in lengths:
        ids = x[off : off + length]
        off += length
        out.append(Example(ids=ids, prompt_len=int(length * rng.uniform(0.2, 0.6))))
    return out


def sft_labels(ex: Example) -> np.ndarray:
    labels = ex.ids.copy()
    labels[: ex.prompt_len] = kernels.IGNORE_INDEX
    return labels


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ measuring


class Meter:
    """Step end times (after a device sync) and cumulative real tokens; the first `warmup` steps are not timed."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup = device, warmup
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []

    def step_end(self, cumulative_tokens: int, loss: float | None = None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())
        self.tokens.append(int(cumulative_tokens))
        if loss is not None:
            self.losses.append(float(loss))

    def result(self, name: str, n_params: int, settings: dict[str, Any]) -> RunResult:
        w = min(self.warmup, len(self.times) - 1)
        seconds = self.times[-1] - self.times[w - 1] if w > 0 else self.times[-1] - self.times[0]
        tokens = self.tokens[-1] - (self.tokens[w - 1] if w > 0 else 0)
        steps = len(self.times) - w
        tps = tokens / max(seconds, 1e-9)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        return RunResult(
            name=name,
            tokens_per_s=tps,
            mfu=6 * n_params * tps / PEAK_FLOPS,
            peak_memory_gib=peak,
            measured_steps=steps,
            real_tokens=tokens,
            seconds=seconds,
            losses=self.losses,
            settings=settings,
        )


def fresh_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------------ TRL


def _tokenizer(vocab: int) -> Any:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def run_trl(
    name: str,
    args: argparse.Namespace,
    examples: list[Example],
    device: torch.device,
    *,
    packing: bool,
    liger: bool,
    model: torch.nn.Module | None = None,
    peft_config: Any = None,
) -> RunResult:
    """TRL's SFTTrainer on `model` (default: a fresh model of `args.model`'s shape), with PEFT when `peft_config`."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    if model is None:
        model = build_model(SHAPES[args.model], args.max_len, "sdpa", seed=args.seed)
    n_params = param_count(model)
    ds = Dataset.from_dict(
        {
            "input_ids": [e.ids.tolist() for e in examples],
            "completion_mask": [[0] * e.prompt_len + [1] * (len(e.ids) - e.prompt_len) for e in examples],
        }
    )
    meter = Meter(device, args.warmup)

    class Timing(TrainerCallback):
        def on_step_end(self, targs, state, control, **kw):
            meter.step_end(state.num_input_tokens_seen)

        def on_log(self, targs, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                meter.losses.append(float(logs["loss"]))

    settings = dict(
        per_device_train_batch_size=args.batch,
        max_length=args.max_len,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        packing=packing,
        use_liger_kernel=liger,
        completion_only_loss=True,
        bf16=device.type == "cuda",
    )
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(
            output_dir=out,
            max_steps=args.warmup + args.steps,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            include_num_input_tokens_seen="non_padding",
            use_cpu=device.type != "cuda",
            seed=args.seed,
            disable_tqdm=True,
            dataloader_num_workers=0,
            **settings,
        )
        fresh_device(device)
        trainer = SFTTrainer(
            model=model,
            args=cfg,
            train_dataset=ds,
            processing_class=_tokenizer(model.config.vocab_size),
            callbacks=[Timing()],
            peft_config=peft_config,
        )
        trainer.remove_callback(PrinterCallback)  # per-step log dicts; the table at the end says it all
        settings["gradient_checkpointing"] = cfg.gradient_checkpointing
        settings["padding_free"] = trainer.padding_free
        settings["attn_implementation"] = model.config._attn_implementation
        settings["optim"] = str(cfg.optim)
        settings["peft"] = peft_config is not None
        trainer.train()
    result = meter.result(name, n_params, settings)
    del trainer, model
    return result


# ------------------------------------------------------------------------------------------ a plain PyTorch loop


def run_plain(name: str, args: argparse.Namespace, examples: list[Example], device: torch.device) -> RunResult:
    """8 x max_len causal rows (documents concatenated, attention crosses them), HF loss, torch.compile, fused AdamW."""
    shape = SHAPES[args.model]
    model = build_model(shape, args.max_len, "sdpa", seed=args.seed).to(device)
    n_params = param_count(model)
    stream = np.concatenate([e.ids for e in examples])
    n_rows = len(stream) // args.max_len
    rows = torch.from_numpy(stream[: n_rows * args.max_len].astype(np.int64)).view(n_rows, args.max_len)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    step_fn = torch.compile(model) if args.compile else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    meter = Meter(device, args.warmup)
    fresh_device(device)
    seen = 0
    for step in range(args.warmup + args.steps):
        i = (step * args.batch) % max(1, n_rows - args.batch)
        batch = rows[i : i + args.batch].to(device, non_blocking=True)
        with autocast:
            loss = step_fn(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += batch.numel()
        meter.step_end(seen, loss.item())
    result = meter.result(
        name, n_params, {"rows": f"{args.batch} x {args.max_len}", "document_masking": False, "compile": args.compile}
    )
    del model, opt, step_fn
    return result


# ------------------------------------------------------------------------------------------ kollm


class CountingRows(kdata.RowDataset):
    """kollm's row dataset, counting the real (non-padding) tokens handed to the loop."""

    def __init__(self, rows: kdata.PackedRows):
        super().__init__(rows)
        self.real = (rows.input_ids != PAD_ID).sum(axis=1)
        self.served = 0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.served += int(self.real[i])
        return super().__getitem__(i)


def run_kollm(
    name: str, args: argparse.Namespace, examples: list[Example], device: torch.device, *, objective: str
) -> RunResult:
    """kollm's own path: its packing, then kollm.train.loop.train with compile: true (kernels.compile_model)."""
    shape = SHAPES[args.model]
    lowmem = name.endswith("_lowmem")
    micro = (args.lowmem_micro_batch if lowmem else args.micro_batch) or args.batch
    checkpointing = lowmem or args.grad_ckpt
    budget = args.lowmem_act_budget if lowmem else args.act_budget
    chunk = (args.lowmem_chunk_tokens if lowmem else args.chunk_tokens) or kernels.DEFAULT_CHUNK_TOKENS
    if objective == "sft":
        rows = kdata.pack_examples([(e.ids, sft_labels(e)) for e in examples], args.max_len, PAD_ID)
    else:
        rows = kdata.pack_stream([e.ids for e in examples], args.max_len, PAD_ID)
    dataset = CountingRows(rows)
    attn = kernels.attention_implementation(device)
    model = build_model(shape, args.max_len, attn, seed=args.seed)
    n_params = param_count(model)
    kernels.DEFAULT_CHUNK_TOKENS = chunk
    if budget is not None:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = budget
    cfg = kloop.LoopConfig(
        max_steps=args.warmup + args.steps + (3 if args.profile else 0),  # profiled steps come after the timed ones
        lr=args.lr,
        min_lr_ratio=1.0,  # constant, as TRL's runs here
        warmup_steps=0,
        batch_size=micro,
        grad_accum=args.batch // micro,
        weight_decay=0.0,
        betas=(0.9, 0.999),
        grad_clip=1.0,
        # The loop reads losses back only when it logs: log at the end of warmup and at the end.
        log_every=1 if args.profile else max(1, args.warmup),
        seed=args.seed,
        compile=args.compile,
        gradient_checkpointing=checkpointing,
        precision="bf16" if device.type == "cuda" else "fp32",
    )
    marks: list[tuple[int, float, int]] = []  # (step, time after a device sync, real tokens served)
    profiler = None

    def on_log(log: kloop.StepLog) -> None:
        nonlocal profiler
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append((log.step, time.perf_counter(), dataset.served))
        if args.profile and log.step == args.warmup + args.steps:
            profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            )
            profiler.start()
        if profiler is not None and log.step == args.warmup + args.steps + 3:
            profiler.stop()
            table = profiler.key_averages().table(
                sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                row_limit=25,
                max_name_column_width=60,
            )
            print(table, flush=True)
            profiler = None

    fresh_device(device)
    if args.memory_report:
        torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    started = time.perf_counter()
    result = kloop.train(model, dataset, cfg, device=device, on_log=on_log)
    if args.memory_report:
        print_memory_report(torch.cuda.memory._snapshot())
        torch.cuda.memory._record_memory_history(enabled=None)
    first = (0, started, 0) if args.warmup == 0 else next(m for m in marks if m[0] == args.warmup)
    last = next(m for m in marks if m[0] == args.warmup + args.steps)
    seconds, tokens = last[1] - first[1], last[2] - first[2]
    tps = tokens / max(seconds, 1e-9)
    settings = {
        "rows": f"{args.batch} x {args.max_len}",
        "micro_batch": micro,
        "attn_implementation": attn,
        "compile": args.compile,
        "activation_memory_budget": budget,
        "gradient_checkpointing": checkpointing,
        "chunk_tokens": chunk,
        "fill": round(rows.stats.fill, 4),
        "objective": objective,
    }
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out = RunResult(
        name=name,
        tokens_per_s=tps,
        mfu=6 * n_params * tps / PEAK_FLOPS,
        peak_memory_gib=peak,
        measured_steps=args.steps,
        real_tokens=tokens,
        seconds=seconds,
        losses=result.losses[: args.warmup + args.steps],
        settings=settings,
    )
    del model
    return out


def print_memory_report(snapshot: dict[str, Any], top: int = 20) -> None:
    """The allocations alive at the moment of peak allocated memory, largest first, with where they were made."""
    live: dict[int, dict[str, Any]] = {}
    total = peak = 0
    at_peak: list[dict[str, Any]] = []
    for trace in snapshot["device_traces"]:
        for ev in trace:
            if ev["action"] == "alloc":
                live[ev["addr"]] = ev
                total += ev["size"]
                if total > peak:
                    peak, at_peak = total, list(live.values())
            elif ev["action"] == "free_completed" and ev["addr"] in live:
                total -= live.pop(ev["addr"])["size"]
    print(f"memory report: peak {peak / 2**30:.2f} GiB over the recorded events; largest live allocations then:")
    groups: dict[str, list[int]] = {}
    for ev in at_peak:
        frames = [
            f
            for f in ev.get("frames", [])
            if "site-packages/torch/" not in f["filename"] or "_inductor" in f["filename"]
        ]
        where = " <- ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in frames[:3]) or "?"
        groups.setdefault(where, []).append(ev["size"])
    for where, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"  {sum(sizes) / 2**20:9.1f} MiB  {len(sizes):5d} blocks  {where}")


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on CPU (use with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny model, short rows, few steps: a smoke check")
    ap.add_argument("--runs", default=",".join(ALL_RUNS), help=f"comma-separated subset of {','.join(ALL_RUNS)}")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first (compilation, autotuning)")
    ap.add_argument("--batch", type=int, default=8, help="rows (TRL: examples) per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=0, help="kollm rows per micro-batch (0: --batch)")
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--examples", type=int, default=None)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--loss-rtol", type=float, default=0.03, help="allowed relative loss gap to TRL at equal steps")
    ap.add_argument(
        "--act-budget", type=float, default=None, help="kollm: fraction of activations kept (compile partitioner)"
    )
    ap.add_argument("--grad-ckpt", action="store_true", help="kollm: gradient checkpointing in every kollm run")
    ap.add_argument(
        "--lowmem-micro-batch", type=int, default=0, help="kollm_sft_lowmem: rows per micro-batch (0: --batch)"
    )
    ap.add_argument(
        "--lowmem-act-budget", type=float, default=None, help="kollm_sft_lowmem: fraction of activations kept"
    )
    ap.add_argument("--lowmem-chunk-tokens", type=int, default=2048, help="kollm_sft_lowmem: tokens per loss chunk")
    ap.add_argument("--chunk-tokens", type=int, default=0, help="kollm: tokens per loss chunk (0: kernels default)")
    ap.add_argument(
        "--memory-report", action="store_true", help="kollm (CUDA): list the allocations alive at peak memory"
    )
    ap.add_argument(
        "--profile", action="store_true", help="kollm: print a profiler table of 3 extra steps after the timed ones"
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON file (default benchmarks/results/train_throughput_<device>.json)"
    )
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)  # internal: run one configuration in this process
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    args.model = "tiny" if args.tiny else "349m"
    args.max_len = args.max_len or (128 if args.tiny else 2048)
    args.steps = args.steps or (3 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.examples = args.examples or (120 if args.tiny else 3000)
    runs = [r for r in args.runs.split(",") if r]
    if unknown := set(runs) - set(ALL_RUNS):
        ap.error(f"unknown runs {sorted(unknown)}; choose from {', '.join(ALL_RUNS)}")
    if device.type != "cuda" and "trl_packed_liger" in runs:
        runs.remove("trl_packed_liger")  # Liger's kernels are Triton (GPU only)
    if args.batch % (args.micro_batch or args.batch) or args.batch % (args.lowmem_micro_batch or args.batch):
        ap.error("--batch must be a multiple of --micro-batch and --lowmem-micro-batch")
    if device.type != "cuda":
        args.compile = False  # inductor's CPU code generation is slower than the few steps it would speed up

    shape = SHAPES[args.model]
    examples = make_examples(
        args.examples,
        shape.vocab,
        min_len=8 if args.tiny else 32,
        max_len=args.max_len,
        median=args.max_len / 7,
        seed=args.seed,
    )
    lengths = np.array([len(e.ids) for e in examples])
    print(
        f"device={device} model={args.model} examples={len(examples)} mean_len={lengths.mean():.0f} "
        f"median_len={np.median(lengths):.0f} runs={runs}",
        flush=True,
    )

    if args.single:
        name = args.single
        if name.startswith("trl"):
            r = run_trl(name, args, examples, device, packing=name != "trl_default", liger=name == "trl_packed_liger")
        elif name == "plain_compiled":
            r = run_plain(name, args, examples, device)
        else:
            r = run_kollm(name, args, examples, device, objective=name.removeprefix("kollm_").removesuffix("_lowmem"))
        args.result.write_text(json.dumps(asdict(r)))
        return 0

    # Each run in its own process: Liger patches transformers' Llama classes globally, compiled code and
    # allocator state would carry over, and a crash in one run must not take the others down.
    results: list[RunResult] = []
    base_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    for name in runs:
        print(f"--- {name}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result_file = Path(tmp) / "result.json"
            proc = subprocess.run(
                [sys.executable, __file__, *base_argv, "--single", name, "--result", str(result_file)]
            )
            if proc.returncode == 0 and result_file.exists():
                r = RunResult(**json.loads(result_file.read_text()))
            else:
                r = RunResult(
                    name,
                    0.0,
                    0.0,
                    None,
                    0,
                    0,
                    0.0,
                    [],
                    error=f"the run exited with status {proc.returncode} (see its output above)",
                )
        results.append(r)
        peak = f"{r.peak_memory_gib:.2f}" if r.peak_memory_gib is not None else "-"
        print(
            f"    {r.tokens_per_s:,.0f} tok/s  mfu {r.mfu:.1%}  peak {peak} GiB  losses {[round(x, 3) for x in r.losses]}",
            flush=True,
        )

    summary = summarize(results, args.loss_rtol)
    payload = {
        "benchmark": "train_throughput",
        "command": "python benchmarks/train_throughput.py "
        + " ".join(_without_out(argv if argv is not None else sys.argv[1:])),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "liger_kernel": _version("liger_kernel"),
        "model": asdict(shape) | {"parameters": param_count_of(shape, args.max_len)},
        "data": {
            "examples": len(examples),
            "length_distribution": f"lognormal(median {args.max_len / 7:.0f}, sigma 1.0) clipped to [{lengths.min()}, {args.max_len}]",
            "mean_length": float(lengths.mean()),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"peak_flops": PEAK_FLOPS},
        "runs": [asdict(r) for r in results],
        "summary": summary,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"train_throughput_{_device_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, out)
    print_table(results, summary)
    print(f"results: {out}")
    return 0 if summary["losses_agree"] and not any(r.error for r in results) else 1


def _device_tag(device: torch.device) -> str:
    """h100, h200, ... from the GPU's name (cuda when it names none of these), or cpu."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return next((tag.lower() for tag in ("H100", "H200", "B200", "A100") if tag in name), "cuda")


def _without_out(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod.replace("_", "-"))
    except Exception:
        return None


def param_count_of(shape: Preset, max_len: int) -> int:
    with torch.device("meta"):
        return param_count(build_model(shape, max_len, "sdpa"))


def summarize(results: list[RunResult], rtol: float) -> dict[str, Any]:
    """Ratios against the TRL runs, and whether kollm's losses track TRL's packed run step by step."""
    by = {r.name: r for r in results if not r.error}
    out: dict[str, Any] = {"ratios": {}, "loss_checks": {}}
    for base in ("trl_default", "trl_packed", "trl_packed_liger", "plain_compiled"):
        if base in by and by[base].tokens_per_s > 0:
            for r in by.values():
                out["ratios"].setdefault(r.name, {})[f"vs_{base}"] = r.tokens_per_s / by[base].tokens_per_s
    ref = by.get("trl_packed_liger") or by.get("trl_packed")
    ok = True
    if ref is not None:
        for name in ("kollm_sft", "kollm_cpt", "kollm_sft_lowmem", "kollm_cpt_lowmem", "trl_default", "trl_packed"):
            r = by.get(name)
            if r is None or r is ref or not r.losses:
                continue
            n = min(len(r.losses), len(ref.losses))
            # Mean of the last three steps, to damp batch-to-batch noise; the first step checks equal initial weights.
            tail = slice(max(0, n - 3), n)
            first_gap = abs(r.losses[0] - ref.losses[0]) / ref.losses[0]
            end_gap = abs(np.mean(r.losses[tail]) - np.mean(ref.losses[tail])) / np.mean(ref.losses[tail])
            agree = bool(first_gap <= rtol and end_gap <= rtol)
            out["loss_checks"][name] = {
                "against": ref.name,
                "first_step": [r.losses[0], ref.losses[0]],
                "last_steps_mean": [float(np.mean(r.losses[tail])), float(np.mean(ref.losses[tail]))],
                "relative_gap": [first_gap, end_gap],
                "agree": agree,
            }
            if name.startswith("kollm"):
                ok = ok and agree
    out["losses_agree"] = ok
    return out


def print_table(results: list[RunResult], summary: dict[str, Any]) -> None:
    ratios = summary["ratios"]
    print()
    print(
        f"{'run':<18} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'vs TRL':>7} {'vs TRL+pk+liger':>15} {'loss@1':>7} {'loss@end':>8}"
    )
    for r in results:
        if r.error:
            print(f"{r.name:<18} ERROR {r.error[:80]}")
            continue
        rr = ratios.get(r.name, {})
        peak = f"{r.peak_memory_gib:.2f}" if r.peak_memory_gib is not None else "-"
        first = f"{r.losses[0]:.3f}" if r.losses else "-"
        last = f"{np.mean(r.losses[-3:]):.3f}" if r.losses else "-"
        print(
            f"{r.name:<18} {r.tokens_per_s:>10,.0f} {r.mfu:>6.1%} {peak:>9} {rr.get('vs_trl_default', float('nan')):>6.2f}x "
            f"{rr.get('vs_trl_packed_liger', float('nan')):>14.2f}x {first:>7} {last:>8}"
        )
    for name, c in summary["loss_checks"].items():
        print(
            f"loss check {name} vs {c['against']}: first-step gap {c['relative_gap'][0]:.2%}, last-steps gap {c['relative_gap'][1]:.2%} -> {'ok' if c['agree'] else 'DISAGREE'}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
