"""Training models that do not fit one device's ddp budget: kollm (LoRA, QLoRA, sharding: fsdp, cpu_offload) against
TRL SFTTrainer + PEFT (+ Liger), same model shape, same data, same settings, in one call.

Cases (each selectable with --case; all by default):
  lora      LoRA r=16 SFT of an 8B-shaped Llama (Llama-3-8B dimensions, random bf16 weights built on the GPU):
            kollm (without and with gradient checkpointing, TRL's default) vs TRL+PEFT and TRL+PEFT+Liger. Target: kollm >= 2x TRL+PEFT+Liger tokens/s at no more peak memory.
  qlora     the same with the base quantized to 4 bits (bitsandbytes NF4): kollm vs TRL+PEFT(+Liger). Target: kollm
            under 24 GiB peak. The random base is saved once to a temporary folder and loaded quantized (~16 GB disk).
  offload   full fine-tuning of a ~3B shape (Llama-3.2-3B dimensions) on one GPU with sharding: fsdp and
            cpu_offload: true, beside kollm ddp and TRL full fine-tuning (either may run out of memory: recorded).
  fsdp_ddp  the cost of sharding: kollm fsdp vs kollm ddp on one GPU at 349M (kollm's `base` preset). Target: <= 5 %.
            Also fsdp with the unit plan of several ranks (a unit per decoder layer) over this one GPU.

A baseline whose package is missing (trl, peft, liger_kernel, bitsandbytes) is skipped with the reason printed.
Throughput counts real (non-padding) tokens after `--warmup` untimed steps; peak memory is
torch.cuda.max_memory_allocated per run (in-process runs, the allocator's peak reset between them).

  python benchmarks/train_sharded.py                       # GPU: every case, JSON in benchmarks/results/
  python benchmarks/train_sharded.py --case lora           # one case
  python benchmarks/train_sharded.py --cpu --tiny          # a smoke check: tiny shapes, a few steps on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

import train_throughput as tt  # noqa: E402

from kollm.train import data as kdata  # noqa: E402
from kollm.train import kernels, sharding  # noqa: E402
from kollm.train import loop as kloop  # noqa: E402
from kollm.train.config import PRESETS, Preset  # noqa: E402
from kollm.train.modeling import apply_lora  # noqa: E402

CASES = ("lora", "qlora", "offload", "fsdp_ddp")
SHAPES = {
    "8b": Preset(
        hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256, max_positions=8192, tied=False
    ),
    "3b": Preset(
        hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256, max_positions=8192, tied=True
    ),
    "349m": PRESETS["base"],
    "tiny": tt.SHAPES["tiny"],
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def missing(*modules: str) -> str | None:
    """The first of `modules` that cannot be imported, as a reason to skip; None when all can."""
    import importlib.util

    for m in modules:
        if importlib.util.find_spec(m) is None:
            return f"{m} is not installed (pip install {m.replace('_', '-')})"
    return None


def build(shape: Preset, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, attn: str):
    """A Llama of `shape` with random weights, created directly on `device` in `dtype` (fast for 8B on a GPU)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = tt.build_model(shape, args.max_len, attn, seed=args.seed)
    finally:
        torch.set_default_dtype(default)
    return model


def quantized_base(shape: Preset, args: argparse.Namespace, folder: Path):
    """The random bf16 base saved once to `folder`, loaded 4-bit (NF4, bf16 compute) the way kollm loads QLoRA."""
    from transformers import AutoModelForCausalLM

    from kollm.train.modeling import _bnb_config

    if not (folder / "config.json").exists():
        model = build(shape, args, torch.device("cuda"), torch.bfloat16, "sdpa")
        model.save_pretrained(folder)
        del model
        tt.fresh_device(torch.device("cuda"))
    return AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=_bnb_config("4bit"),
        device_map={"": torch.cuda.current_device()},
        dtype=torch.bfloat16,
        attn_implementation=kernels.attention_implementation("cuda"),
    )


# ------------------------------------------------------------------------------------------ kollm


def run_kollm(
    name: str,
    model: torch.nn.Module,
    args: argparse.Namespace,
    examples: list[tt.Example],
    device: torch.device,
    *,
    sharding_: str = "ddp",
    cpu_offload: bool = False,
    grad_ckpt: bool | None = None,
    settings: dict[str, Any] | None = None,
) -> tt.RunResult:
    rows = kdata.pack_examples([(e.ids, tt.sft_labels(e)) for e in examples], args.max_len, tt.PAD_ID)
    dataset = tt.CountingRows(rows)
    n_params = tt.param_count(model)
    cfg = kloop.LoopConfig(
        max_steps=args.warmup + args.steps,
        lr=args.lr,
        min_lr_ratio=1.0,
        batch_size=args.batch,
        betas=(0.9, 0.999),
        log_every=1,
        seed=args.seed,
        compile=args.compile,
        gradient_checkpointing=args.grad_ckpt if grad_ckpt is None else grad_ckpt,
        precision="bf16" if device.type == "cuda" else "fp32",
        sharding=sharding_,
        cpu_offload=cpu_offload,
        seq_len=args.max_len,
    )
    meter = tt.Meter(device, args.warmup)
    tt.fresh_device(device)
    with sharding.process_group(device):
        kloop.train(model, dataset, cfg, device=device, on_log=lambda log: meter.step_end(dataset.served, log.loss))
    return meter.result(
        name,
        n_params,
        {
            "sharding": sharding_,
            "cpu_offload": cpu_offload,
            "compile": args.compile,
            "gradient_checkpointing": args.grad_ckpt if grad_ckpt is None else grad_ckpt,
            "rows": f"{args.batch} x {args.max_len}",
            **(settings or {}),
        },
    )


def kollm_lora(model: torch.nn.Module, quantized: bool) -> torch.nn.Module:
    return apply_lora(model, **LORA, target_modules="all-linear", quantized=quantized)


# ------------------------------------------------------------------------------------------ TRL


def run_trl(
    name: str,
    model: torch.nn.Module,
    args: argparse.Namespace,
    examples: list[tt.Example],
    device: torch.device,
    *,
    lora: bool,
    liger: bool,
) -> tt.RunResult:
    """SFTTrainer (packing, completion-only loss, bf16, its default gradient checkpointing) + PEFT when `lora`."""
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    return tt.run_trl(name, args, examples, device, packing=True, liger=liger, model=model, peft_config=peft_config)


# ------------------------------------------------------------------------------------------ cases


def case_runs(case: str, args: argparse.Namespace, device: torch.device) -> list[tuple[str, Any]]:
    """(run name, thunk returning a RunResult, or a string: the reason it was skipped) for one case."""
    big = "tiny" if args.tiny else {"lora": "8b", "qlora": "8b", "offload": "3b", "fsdp_ddp": "349m"}[case]
    shape = SHAPES[big]
    attn = kernels.attention_implementation(device)
    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32
    trl_missing = missing("trl", "peft", "datasets")
    liger_missing = trl_missing or missing("liger_kernel") or (None if device.type == "cuda" else "Liger needs a GPU")
    runs: list[tuple[str, Any]] = []
    if case == "lora":
        runs.append(
            (
                "kollm_lora",
                lambda: run_kollm(
                    "kollm_lora",
                    kollm_lora(build(shape, args, device, bf16, attn), False),
                    args,
                    EXAMPLES[0],
                    device,
                    settings={"lora_r": 16},
                ),
            )
        )
        runs.append(  # TRL checkpoints by default: the same setting, for its peak memory
            (
                "kollm_lora_ckpt",
                lambda: run_kollm(
                    "kollm_lora_ckpt",
                    kollm_lora(build(shape, args, device, bf16, attn), False),
                    args,
                    EXAMPLES[0],
                    device,
                    grad_ckpt=True,
                    settings={"lora_r": 16},
                ),
            )
        )
        runs.append(
            (
                "trl_peft",
                trl_missing
                or (
                    lambda: run_trl(
                        "trl_peft",
                        build(shape, args, device, bf16, "sdpa"),
                        args,
                        EXAMPLES[0],
                        device,
                        lora=True,
                        liger=False,
                    )
                ),
            )
        )
        runs.append(
            (
                "trl_peft_liger",
                liger_missing
                or (
                    lambda: run_trl(
                        "trl_peft_liger",
                        build(shape, args, device, bf16, "sdpa"),
                        args,
                        EXAMPLES[0],
                        device,
                        lora=True,
                        liger=True,
                    )
                ),
            )
        )
    elif case == "qlora":
        reason = missing("bitsandbytes") or (None if device.type == "cuda" else "QLoRA (bitsandbytes) needs a CUDA GPU")
        folder = Path(args.workdir) / f"base-{big}"
        runs.append(
            (
                "kollm_qlora",
                reason
                or (
                    lambda: run_kollm(
                        "kollm_qlora",
                        kollm_lora(quantized_base(shape, args, folder), True),
                        args,
                        EXAMPLES[0],
                        device,
                        settings={"lora_r": 16, "quantize": "4bit"},
                    )
                ),
            )
        )
        runs.append(
            (
                "trl_qlora",
                reason
                or trl_missing
                or (
                    lambda: run_trl(
                        "trl_qlora",
                        quantized_base(shape, args, folder),
                        args,
                        EXAMPLES[0],
                        device,
                        lora=True,
                        liger=False,
                    )
                ),
            )
        )
        runs.append(
            (
                "trl_qlora_liger",
                reason
                or liger_missing
                or (
                    lambda: run_trl(
                        "trl_qlora_liger",
                        quantized_base(shape, args, folder),
                        args,
                        EXAMPLES[0],
                        device,
                        lora=True,
                        liger=True,
                    )
                ),
            )
        )
    elif case == "offload":
        fp32 = torch.float32  # kollm's full fine-tuning keeps fp32 weights (bf16 autocast), as TRL's bf16=True does
        host = torch.device("cpu")
        runs.append(
            (
                "kollm_fsdp_offload",
                lambda: run_kollm(
                    "kollm_fsdp_offload",
                    build(shape, args, device, fp32, attn).to(host),
                    args,
                    EXAMPLES[0],
                    device,
                    sharding_="fsdp",
                    cpu_offload=True,
                ),
            )
        )
        runs.append(
            (
                "kollm_ddp_full",
                lambda: run_kollm("kollm_ddp_full", build(shape, args, device, fp32, attn), args, EXAMPLES[0], device),
            )
        )
        runs.append(
            (
                "trl_full",
                trl_missing
                or (
                    lambda: run_trl(
                        "trl_full",
                        build(shape, args, device, fp32, "sdpa"),
                        args,
                        EXAMPLES[0],
                        device,
                        lora=False,
                        liger=False,
                    )
                ),
            )
        )
    else:
        fp32 = torch.float32
        runs.append(
            (
                "kollm_ddp",
                lambda: run_kollm("kollm_ddp", build(shape, args, device, fp32, attn), args, EXAMPLES[0], device),
            )
        )
        runs.append(
            (
                "kollm_fsdp",
                lambda: run_kollm(
                    "kollm_fsdp", build(shape, args, device, fp32, attn), args, EXAMPLES[0], device, sharding_="fsdp"
                ),
            )
        )

        def per_layer() -> tt.RunResult:  # the unit plan of a run over several ranks, here over one
            plan, sharding.per_layer_units = sharding.per_layer_units, lambda world, cpu_offload: True
            try:
                return run_kollm(
                    "kollm_fsdp_per_layer",
                    build(shape, args, device, fp32, attn),
                    args,
                    EXAMPLES[0],
                    device,
                    sharding_="fsdp",
                    settings={"units": "per decoder layer"},
                )
            finally:
                sharding.per_layer_units = plan

        runs.append(("kollm_fsdp_per_layer", per_layer))
    return runs


EXAMPLES: list[list[tt.Example]] = []

BASELINES = {  # case -> [(kollm run, the baselines it is compared with, in order of preference)]
    "lora": [("kollm_lora", ("trl_peft_liger", "trl_peft")), ("kollm_lora_ckpt", ("trl_peft_liger", "trl_peft"))],
    "qlora": [("kollm_qlora", ("trl_qlora_liger", "trl_qlora"))],
    "offload": [("kollm_fsdp_offload", ("trl_full", "kollm_ddp_full"))],
    "fsdp_ddp": [("kollm_fsdp", ("kollm_ddp",)), ("kollm_fsdp_per_layer", ("kollm_ddp",))],
}


def summarize(case: str, results: dict[str, tt.RunResult]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mine, bases in BASELINES[case]:
        if mine not in results or results[mine].error:
            continue
        for base in bases:
            b = results.get(base)
            if b is not None and not b.error and b.tokens_per_s > 0:
                out[f"{mine}_vs_{base}"] = {
                    "tokens_per_s_ratio": results[mine].tokens_per_s / b.tokens_per_s,
                    "peak_memory_gib": [results[mine].peak_memory_gib, b.peak_memory_gib],
                }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--cpu", action="store_true", help="run on CPU (use with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, short rows, few steps: a smoke check")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (compilation, autotuning)")
    ap.add_argument("--batch", type=int, default=None, help="rows (TRL: examples) per optimizer step")
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--examples", type=int, default=None)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--grad-ckpt", action="store_true", help="kollm: gradient checkpointing (TRL's default is on)")
    ap.add_argument("--runs", default=None, help="comma-separated run names to run (default: every run of the cases)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="where qlora saves its random base (default: a temporary folder)")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON (default benchmarks/results/train_sharded_<device>.json)"
    )
    args = ap.parse_args(argv)
    cases = [c for c in args.case.split(",") if c]
    if unknown := set(cases) - set(CASES):
        ap.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    args.max_len = args.max_len or (64 if args.tiny else 2048)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.batch = args.batch or (2 if args.tiny else 4)
    args.examples = args.examples or (40 if args.tiny else 1000)
    if device.type != "cuda":
        args.compile = False  # inductor's CPU code generation costs more than a smoke check's few steps
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    args.workdir = args.workdir or tmp.name  # type: ignore[union-attr]
    print(f"device={device} cases={cases} rows={args.batch} x {args.max_len} steps={args.warmup}+{args.steps}")
    payload: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "settings": {k: str(v) for k, v in vars(args).items()},
        "versions": {
            m: tt._version(m) for m in ("torch", "transformers", "trl", "peft", "liger_kernel", "bitsandbytes")
        },
        "cases": {},
    }
    failed = False
    for case in cases:
        shape = SHAPES[
            "tiny" if args.tiny else {"lora": "8b", "qlora": "8b", "offload": "3b", "fsdp_ddp": "349m"}[case]
        ]
        EXAMPLES[:] = [
            tt.make_examples(
                args.examples, shape.vocab, min_len=8, max_len=args.max_len, median=args.max_len / 5, seed=args.seed
            )
        ]
        results: dict[str, tt.RunResult] = {}
        skipped: dict[str, str] = {}
        for name, thunk in case_runs(case, args, device):
            if args.runs is not None and name not in args.runs.split(","):
                thunk = "not selected (--runs)"
            if isinstance(thunk, str):
                skipped[name] = thunk
                print(f"[{case}] {name}: skipped: {thunk}", flush=True)
                continue
            started = time.perf_counter()
            try:
                results[name] = thunk()
            except Exception as e:  # an out-of-memory baseline is a result, not the end of the benchmark
                results[name] = tt.RunResult(name, 0.0, 0.0, None, 0, 0, 0.0, [], error=f"{type(e).__name__}: {e}")
                failed = failed or name.startswith("kollm") and not isinstance(e, torch.OutOfMemoryError)
                traceback.print_exc()
            gc.collect()
            tt.fresh_device(device)
            r = results[name]
            print(
                f"[{case}] {name}: {r.tokens_per_s:,.0f} tokens/s, peak {r.peak_memory_gib} GiB, {time.perf_counter() - started:.0f} s",
                flush=True,
            )
        payload["cases"][case] = {
            "shape": asdict(replace(shape)),
            "params": tt.param_count_of(shape, args.max_len),
            "runs": [asdict(r) for r in results.values()],
            "skipped": skipped,
            "summary": summarize(case, results),
        }
    print_table(payload)
    out = args.out or ROOT / "benchmarks" / "results" / f"train_sharded_{tt._device_tag(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json.tmp").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(out.with_suffix(".json.tmp"), out)
    print(f"results: {out}")
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


def print_table(payload: dict[str, Any]) -> None:
    print()
    print(f"{'case':<9} {'run':<20} {'params':>8} {'tokens/s':>10} {'peak GiB':>9} {'loss@end':>8}  tokens/s vs")
    for case, c in payload["cases"].items():
        ratios: dict[str, list[str]] = {}
        for key, v in c["summary"].items():
            mine, base = key.split("_vs_")
            ratios.setdefault(mine, []).append(f"{v['tokens_per_s_ratio']:.2f}x {base}")
        for r in c["runs"]:
            if r["error"]:
                print(f"{case:<9} {r['name']:<20} ERROR {r['error'][:90]}")
                continue
            peak = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "-"
            last = f"{np.mean(r['losses'][-3:]):.3f}" if r["losses"] else "-"
            ratio = ", ".join(ratios.get(r["name"], []))
            print(
                f"{case:<9} {r['name']:<20} {c['params'] / 1e9:>7.2f}B {r['tokens_per_s']:>10,.0f} {peak:>9} {last:>8}  {ratio}"
            )
        for name, reason in c["skipped"].items():
            print(f"{case:<9} {name:<20} skipped: {reason}")


if __name__ == "__main__":
    raise SystemExit(main())
