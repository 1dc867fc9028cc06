"""Ray Train's cost: kollm sft training through Ray Train against kollm's own launches, same model, same data, one run.

The claims (issues 14 and 22): Ray Train with one GPU worker trains the 349M `base` model at most 3 % slower than
kollm's local one-process path, with the same losses; two Ray Train workers on two GPUs of one host train at
least 1.85x as fast as one, with the same losses at equal steps; and kollm's own multi-process launch
(`resources: {gpus: 2}` without Ray) on the same two GPUs says what Ray Train costs there.

Every configuration runs the very same training function (`bench_fn` below: the benchmark's SFT data packed by
kollm.train.data.pack_examples, then kollm.train.loop.train with compile, bf16, fused AdamW: the `kollm_sft` run
of benchmarks/train_throughput.py), each in its own process, dispatched the way kollm dispatches a training step:
  local_1    fn(job, env) in this process on one device     (recipe.execute with resources.gpus <= 1)
  ray_1      kollm.train.ray_train.launch_ray, 1 worker     (--executor ray, resources.gpus: 1)
  ray_2      kollm.train.ray_train.launch_ray, 2 workers    (--executor ray, resources.gpus: 2; NCCL)
  local_2    kollm.train.recipe.launch, 2 processes         (resources.gpus: 2 without Ray; NCCL)
On CPU (--cpu) the same four run with CPU workers over gloo (a rehearsal).

Every configuration trains on the same global batch (--rows rows of --max-len tokens per optimizer step): one
worker takes --rows / --micro-batch accumulation micro-batches, two workers half as many each, so each GPU runs
the same micro-batch shape and the losses are comparable step by step. Throughput counts real (non-padding)
tokens over all ranks between the end of the warm-up steps and the last step (rank 0 times them after a device
sync; the ranks meet in the gradient all-reduce every step). Peak memory is torch.cuda.max_memory_allocated
per GPU. Ray's start-up (ray.init, the worker group) is outside the timed steps: `wall_s` shows it.

  python benchmarks/ray_train_gpu.py                                # GPU: all four, JSON in benchmarks/results/
  python benchmarks/ray_train_gpu.py --cpu --tiny                   # a tiny model on 2 CPU workers (a rehearsal)
"""

from __future__ import annotations

import argparse
import functools
import json
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT / "src"), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from train_throughput import (
    PAD_ID,
    SHAPES,
    build_model,
    fresh_device,
    make_examples,
    param_count,
    param_count_of,
    sft_labels,
)  # noqa: E402

from kollm.train import data as kdata  # noqa: E402
from kollm.train import kernels  # noqa: E402
from kollm.train import loop as kloop  # noqa: E402

ALL_CONFIGS = ("local_1", "ray_1", "ray_2", "local_2")
PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16, as train_throughput.py
# Leave NVLink multicast off on shared multi-GPU hosts (the device machines set these; keep them set for Ray's workers).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class ConfigResult:
    name: str
    workers: int
    tokens_per_s: float = 0.0
    tokens_per_s_per_gpu: float = 0.0
    mfu_per_gpu: float = 0.0
    peak_memory_gib: list[float] = field(default_factory=list)  # per GPU (rank)
    measured_steps: int = 0
    real_tokens: int = 0
    seconds: float = 0.0
    wall_s: float = 0.0  # the whole launch: Ray start-up, worker group, compile, all steps
    losses: list[float] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# ------------------------------------------------------------------------------------------ the training function


class RecordingRows(kdata.RowDataset):
    """kollm's row dataset, remembering the real (non-padding) tokens of each row in the order it was served."""

    def __init__(self, rows: kdata.PackedRows):
        super().__init__(rows)
        self.real = (rows.input_ids != PAD_ID).sum(axis=1)
        self.served: list[int] = []

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        self.served.append(int(self.real[i]))
        return super().__getitem__(i)


def bench_fn(s: dict[str, Any], job: Any, env: Any) -> Any:
    """kollm's sft training on this rank (a `fn(job, env)` like the sft step's): returns rank 0's StepResult with
    tokens/s over all ranks, peak memory per rank and the loss of every step."""
    import torch.distributed as dist

    from kollm.pipeline.step import StepResult

    device, rank, world = env.device, env.rank, env.world
    shape = SHAPES[s["model"]]
    examples = make_examples(
        s["examples"], shape.vocab, min_len=s["min_len"], max_len=s["max_len"], median=s["max_len"] / 7, seed=s["seed"]
    )
    rows = kdata.pack_examples([(e.ids, sft_labels(e)) for e in examples], s["max_len"], PAD_ID)
    dataset = RecordingRows(rows)
    micro, steps, warmup = s["micro_batch"], s["steps"], s["warmup"]
    accum = s["rows"] // (micro * world)
    total = warmup + steps
    if len(dataset) // world < total * micro * accum:
        raise ValueError(
            f"{len(dataset)} packed rows are too few for {total} steps of {s['rows']} rows; raise --examples"
        )
    attn = kernels.attention_implementation(device)
    model = build_model(shape, s["max_len"], attn, seed=s["seed"])
    n_params = param_count(model)
    cfg = kloop.LoopConfig(
        max_steps=total,
        lr=s["lr"],
        min_lr_ratio=1.0,
        warmup_steps=0,
        batch_size=micro,
        grad_accum=accum,
        weight_decay=0.0,
        betas=(0.9, 0.999),
        grad_clip=1.0,
        log_every=warmup,  # a host sync only at the end of the warm-up and at the end
        seed=s["seed"],
        compile=s["compile"],
        precision="bf16" if device.type == "cuda" else "fp32",
    )
    marks: dict[int, float] = {}

    def on_log(log: kloop.StepLog) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks[log.step] = time.perf_counter()
        if env.on_log is not None:  # the job's JSON log (Ray: through the queue to the driver), as in a real step
            env.on_log(log)

    fresh_device(device)
    result = kloop.train(model, dataset, cfg, device=device, on_log=on_log)
    per_step = micro * accum
    cum = np.concatenate([[0], np.cumsum(dataset.served)])
    counts = torch.tensor([float(cum[warmup * per_step]), float(cum[total * per_step])], dtype=torch.float64)
    peaks = torch.zeros(world, dtype=torch.float64)
    if device.type == "cuda":
        peaks[rank] = torch.cuda.max_memory_allocated(device) / 2**30
    if world > 1:
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        counts, peaks = counts.to(comm), peaks.to(comm)
        dist.all_reduce(counts)
        dist.all_reduce(peaks)
        counts, peaks = counts.cpu(), peaks.cpu()
    if rank != 0:
        return StepResult(metrics={}, meta={})
    seconds = marks[total] - marks[warmup]
    tokens = int(counts[1] - counts[0])
    tps = tokens / max(seconds, 1e-9)
    meta = {
        "losses": [float(x) for x in result.losses[:total]],
        "peak_memory_gib": [float(x) for x in peaks] if device.type == "cuda" else [],
        "n_params": n_params,
        "settings": {
            "attn_implementation": attn,
            "micro_batch": micro,
            "grad_accum": accum,
            "world": world,
            "rows_per_step": s["rows"],
            "fill": round(rows.stats.fill, 4),
            "packed_rows": len(dataset),
        },
    }
    return StepResult(metrics={"tokens_per_s": tps, "seconds": seconds, "real_tokens": float(tokens)}, meta=meta)


# ------------------------------------------------------------------------------------------ one configuration


def _job(tmp: Path) -> Any:
    from kollm.pipeline.step import Artifact
    from kollm.train.config import TrainingConfig
    from kollm.train.recipe import Job

    return Job(
        step="sft",
        kind="sft",
        config=TrainingConfig(),
        data=Artifact("sft_dataset", None, "sha256:benchmark"),
        base_model="scratch",
        base_artifact=None,
        tokenizer_corpus=None,
        output_dir=tmp / "model",
        checkpoint_dir=tmp / "checkpoints",
        log_file=tmp / "logs" / "sft.jsonl",
    )


def run_config(name: str, args: argparse.Namespace, settings: dict[str, Any]) -> ConfigResult:
    import ray_train_gpu as me  # by reference, so that spawned processes and Ray workers import it (not __main__)

    from kollm.train.recipe import Env, TrainingLog, launch

    use_gpu = not args.cpu
    kind, workers = name.split("_")[0], int(name.split("_")[1])
    fn = functools.partial(me.bench_fn, settings)
    with tempfile.TemporaryDirectory() as tmp:
        job = _job(Path(tmp))
        training_log = TrainingLog(job.log_file, job.step, None)
        started = time.perf_counter()
        if kind == "local" and workers == 1:
            torch.set_num_threads(max(1, int(args.cpus_per_worker)))
            device = torch.device("cuda" if use_gpu else "cpu")
            out = fn(job, Env(device=device, on_log=training_log, log_params=training_log.log_params))
        elif kind == "local":
            out = launch(fn, job, world=workers, backend="nccl" if use_gpu else "gloo", training_log=training_log)
        else:
            import ray

            from kollm.train.ray_train import launch_ray

            ray.init(
                num_cpus=int(workers * args.cpus_per_worker) + 1,
                num_gpus=workers if use_gpu else 0,
                include_dashboard=False,
                object_store_memory=2 * 10**9,
                log_to_driver=True,
            )
            try:
                out = launch_ray(
                    fn,
                    job,
                    workers=workers,
                    use_gpu=use_gpu,
                    cpus_per_worker=args.cpus_per_worker,
                    training_log=training_log,
                )
            finally:
                ray.shutdown()
        wall = time.perf_counter() - started
        logged = [json.loads(ln) for ln in job.log_file.read_text().splitlines()] if job.log_file.exists() else []
    tps = out.metrics["tokens_per_s"]
    n_params = out.meta["n_params"]
    return ConfigResult(
        name=name,
        workers=workers,
        tokens_per_s=tps,
        tokens_per_s_per_gpu=tps / workers,
        mfu_per_gpu=6 * n_params * tps / workers / PEAK_FLOPS,
        peak_memory_gib=out.meta["peak_memory_gib"],
        measured_steps=args.steps,
        real_tokens=int(out.metrics["real_tokens"]),
        seconds=out.metrics["seconds"],
        wall_s=wall,
        losses=out.meta["losses"],
        settings=out.meta["settings"] | {"job_log_records": len(logged), "cpus_per_worker": args.cpus_per_worker},
    )


# ------------------------------------------------------------------------------------------ summary


def loss_check(r: ConfigResult, ref: ConfigResult, rtol: float) -> dict[str, Any]:
    n = min(len(r.losses), len(ref.losses))
    a, b = np.array(r.losses[:n]), np.array(ref.losses[:n])
    tail = slice(max(0, n - 3), n)
    first_gap = float(abs(a[0] - b[0]) / b[0])
    end_gap = float(abs(a[tail].mean() - b[tail].mean()) / b[tail].mean())
    return {
        "against": ref.name,
        "steps": n,
        "first_step": [float(a[0]), float(b[0])],
        "last_steps_mean": [float(a[tail].mean()), float(b[tail].mean())],
        "max_step_gap": float(np.max(np.abs(a - b) / b)),
        "relative_gap": [first_gap, end_gap],
        "agree": bool(first_gap <= rtol and end_gap <= rtol),
    }


def summarize(results: list[ConfigResult], rtol: float) -> dict[str, Any]:
    by = {r.name: r for r in results if not r.error}
    out: dict[str, Any] = {"ratios": {}, "loss_checks": {}, "goals": {}}

    def ratio(a: str, b: str) -> float | None:
        return by[a].tokens_per_s / by[b].tokens_per_s if a in by and b in by and by[b].tokens_per_s > 0 else None

    pairs = {
        "ray_1_vs_local_1": ("ray_1", "local_1"),
        "ray_scaling_2_vs_1": ("ray_2", "ray_1"),
        "local_scaling_2_vs_1": ("local_2", "local_1"),
        "ray_2_vs_local_2": ("ray_2", "local_2"),
        "ray_2_vs_local_1": ("ray_2", "local_1"),
    }
    for key, (a, b) in pairs.items():
        if (v := ratio(a, b)) is not None:
            out["ratios"][key] = v
    if (v := out["ratios"].get("ray_1_vs_local_1")) is not None:
        out["goals"]["ray_1_at_most_3pct_slower"] = {"value": v, "goal": 0.97, "met": v >= 0.97}
    if (v := out["ratios"].get("ray_scaling_2_vs_1")) is not None:
        out["goals"]["ray_2gpu_scaling"] = {"value": v, "goal": 1.85, "met": v >= 1.85}
    ref = by.get("local_1")
    ok = True
    if ref is not None:
        for r in by.values():
            if r is ref or not r.losses:
                continue
            c = loss_check(r, ref, rtol)
            out["loss_checks"][r.name] = c
            ok = ok and c["agree"]
    out["losses_agree"] = ok
    return out


def print_table(results: list[ConfigResult], summary: dict[str, Any]) -> None:
    print()
    print(
        f"{'config':<9} {'workers':>7} {'tokens/s':>10} {'per GPU':>9} {'MFU/GPU':>8} {'peak GiB per GPU':>17} {'wall s':>7} {'loss@1':>7} {'loss@end':>8}"
    )
    for r in results:
        if r.error:
            print(f"{r.name:<9} ERROR {r.error[:90]}")
            continue
        peak = "/".join(f"{p:.2f}" for p in r.peak_memory_gib) or "-"
        print(
            f"{r.name:<9} {r.workers:>7} {r.tokens_per_s:>10,.0f} {r.tokens_per_s_per_gpu:>9,.0f} {r.mfu_per_gpu:>8.1%} {peak:>17} "
            f"{r.wall_s:>7.1f} {r.losses[0]:>7.3f} {np.mean(r.losses[-3:]):>8.3f}"
        )
    for k, v in summary["ratios"].items():
        print(f"{k}: {v:.3f}x")
    for k, g in summary["goals"].items():
        print(f"goal {k}: {g['value']:.3f} (goal {g['goal']}) -> {'met' if g['met'] else 'NOT met'}")
    for name, c in summary["loss_checks"].items():
        print(
            f"loss check {name} vs {c['against']}: first-step gap {c['relative_gap'][0]:.2%}, last-steps gap "
            f"{c['relative_gap'][1]:.2%}, max step gap {c['max_step_gap']:.2%} -> {'ok' if c['agree'] else 'DISAGREE'}"
        )


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="CPU workers over gloo (use with --tiny): a rehearsal")
    ap.add_argument("--tiny", action="store_true", help="tiny model, short rows, few steps")
    ap.add_argument(
        "--configs", default=",".join(ALL_CONFIGS), help=f"comma-separated subset of {','.join(ALL_CONFIGS)}"
    )
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 20; tiny 3)")
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed optimizer steps first, at least 1 (default 5; tiny 1)"
    )
    ap.add_argument("--rows", type=int, default=16, help="rows per optimizer step over all workers (the global batch)")
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per micro-batch on each worker")
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--examples", type=int, default=None)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cpus-per-worker", type=float, default=None, help="CPU threads per worker (default: cores / 2, tiny 1)"
    )
    ap.add_argument("--loss-rtol", type=float, default=0.03, help="allowed relative loss gap to local_1 at equal steps")
    ap.add_argument("--timeout", type=int, default=420, help="seconds allowed to each configuration's process")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON file (default benchmarks/results/ray_train_<device>.json)"
    )
    ap.add_argument("--note", default=None, help="a note stored in the JSON")
    ap.add_argument("--single", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    cuda = not args.cpu and torch.cuda.is_available()
    args.cpu = not cuda
    args.model = "tiny" if args.tiny else "349m"
    args.max_len = args.max_len or (128 if args.tiny else 2048)
    args.steps = args.steps or (3 if args.tiny else 20)
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if args.tiny else 5))
    args.examples = args.examples or (300 if args.tiny else 3000)
    args.cpus_per_worker = args.cpus_per_worker or (
        1.0 if args.tiny or args.cpu else float(max(1, (os.cpu_count() or 2) // 2))
    )
    if not cuda:
        args.compile = False
    configs = [c for c in args.configs.split(",") if c]
    if unknown := set(configs) - set(ALL_CONFIGS):
        ap.error(f"unknown configs {sorted(unknown)}; choose from {', '.join(ALL_CONFIGS)}")
    if args.rows % (2 * args.micro_batch):
        ap.error("--rows must be a multiple of 2 x --micro-batch (two workers split each step's rows)")
    if cuda and any(c.endswith("_2") for c in configs) and torch.cuda.device_count() < 2:
        ap.error(
            f"the 2-GPU configs need 2 GPUs; this machine has {torch.cuda.device_count()}: pass --configs local_1,ray_1"
        )
    settings = {
        "model": args.model,
        "max_len": args.max_len,
        "min_len": 8 if args.tiny else 32,
        "examples": args.examples,
        "seed": args.seed,
        "lr": args.lr,
        "rows": args.rows,
        "micro_batch": args.micro_batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
    }
    if not args.single:  # fail here, not after Ray and the workers have started
        shape = SHAPES[args.model]
        examples = make_examples(
            args.examples,
            shape.vocab,
            min_len=settings["min_len"],
            max_len=args.max_len,
            median=args.max_len / 7,
            seed=args.seed,
        )
        packed = len(kdata.pack_examples([(e.ids, sft_labels(e)) for e in examples], args.max_len, PAD_ID).input_ids)
        if packed < (args.warmup + args.steps) * args.rows:
            ap.error(
                f"{args.examples} examples pack into {packed} rows, too few for {args.warmup + args.steps} steps of {args.rows} rows; raise --examples"
            )
    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)
    # Spawned processes and Ray workers import this module and train_throughput by name.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    )

    if args.single:
        try:
            r = run_config(args.single, args, settings)
        except Exception as e:  # noqa: BLE001 - reported in the table, the other configurations still run
            import traceback

            traceback.print_exc()
            r = ConfigResult(
                args.single,
                int(args.single.split("_")[1]),
                error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}",
            )
        args.result.write_text(json.dumps(asdict(r)))
        return 0

    device_name = torch.cuda.get_device_name(0) if cuda else (platform.processor() or "cpu")
    print(
        f"device={device_name} x{torch.cuda.device_count() if cuda else 0} model={args.model} rows/step={args.rows} "
        f"micro={args.micro_batch} steps={args.warmup}+{args.steps} configs={configs}",
        flush=True,
    )
    out = args.out or ROOT / "benchmarks" / "results" / f"ray_train_{_device_tag(device_name) if cuda else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    base_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    results: list[ConfigResult] = []
    for name in configs:
        print(f"--- {name}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result_file = Path(tmp) / "result.json"
            try:
                proc = subprocess.run(
                    [sys.executable, __file__, *base_argv, "--single", name, "--result", str(result_file)],
                    timeout=args.timeout,
                )
                rc: int | str = proc.returncode
            except subprocess.TimeoutExpired:
                rc = f"timeout after {args.timeout} s"
            if result_file.exists():
                r = ConfigResult(**json.loads(result_file.read_text()))
            else:
                r = ConfigResult(
                    name, int(name.split("_")[1]), error=f"the process ended with {rc} (see its output above)"
                )
        results.append(r)
        if not r.error:
            print(
                f"    {r.tokens_per_s:,.0f} tok/s  peak {r.peak_memory_gib} GiB  wall {r.wall_s:.1f} s  losses {[round(x, 3) for x in r.losses]}",
                flush=True,
            )
        summary = summarize(results, args.loss_rtol)
        payload = {
            "benchmark": "ray_train_gpu",
            "command": "python benchmarks/ray_train_gpu.py " + " ".join(_without_out(base_argv)),
            "note": args.note,
            "device": device_name,
            "gpus": torch.cuda.device_count() if cuda else 0,
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "ray": _version("ray"),
            "model": asdict(SHAPES[args.model]) | {"parameters": param_count_of(SHAPES[args.model], args.max_len)},
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "single", "result")}
            | {"peak_flops": PEAK_FLOPS},
            "nccl_env": {k: os.environ.get(k) for k in SAFE_ENV},
            "configs": [asdict(x) for x in results],
            "summary": summary,
        }
        tmp_out = out.with_suffix(".json.tmp")
        tmp_out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(tmp_out, out)  # after every configuration: a later crash or time-out keeps the earlier ones
    print_table(results, summary)
    print(f"results: {out}")
    return 0 if summary["losses_agree"] and not any(r.error for r in results) else 1


def _device_tag(name: str) -> str:
    return next((tag.lower() for tag in ("H100", "H200", "B200", "A100") if tag in name), "cuda")


def _without_out(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--out", "--note"):
            skip = True
        elif not (a.startswith("--out=") or a.startswith("--note=")):
            out.append(a)
    return out


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
