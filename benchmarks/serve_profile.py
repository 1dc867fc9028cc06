"""Where a decode step's time goes in the native engine at concurrency 1 (issue #35: measure before optimizing).

Builds serve_throughput's model (or takes --model-dir), loads the engine with the static KV cache, warms it up,
then runs --requests greedy requests of --max-tokens tokens one after another under torch.profiler. Printed:
wall time per output token, the device's kernel time per token (what the GPU is busy with), the gap between the
two (host work, launches, synchronization), kernels and CUDA API calls per token, and the top operators by device
and by host time. --trace writes a Chrome trace.

    python benchmarks/serve_profile.py --device cuda --preset 349m --out benchmarks/results/serve_profile.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]


async def one(engine, ids: list[int], max_tokens: int, rid: str) -> int:
    from kollm.serve.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    n = 0
    async for chunk in engine.generate(ids, params, rid):
        if chunk.finish_reason is not None:
            n = chunk.completion_tokens
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default=None, help="serve_throughput's presets (default: tiny on CPU, 349m on CUDA)")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--trace", type=Path, default=None, help="write a Chrome trace here")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from kollm.serve.engine import load_engine

    cuda = args.device.startswith("cuda")
    preset = args.preset or ("349m" if cuda else "tiny")
    if args.model_dir is None:
        from serve_throughput import build_model

        args.model_dir = Path(tempfile.mkdtemp(prefix="kollm-profile-")) / "model"
        build_model(args.model_dir, preset)
    engine = load_engine(
        args.model_dir, backend="transformers", device=args.device, kv_cache="static", max_batch_size=8
    )
    prompt = list(range(3, 3 + args.prompt_tokens))

    async def run() -> dict:
        while not engine.ready():
            await asyncio.sleep(0.1)
        await one(engine, prompt, args.max_tokens, "warm")  # compile caches, graphs, allocator
        plain_started = time.perf_counter()
        plain = sum([await one(engine, prompt, args.max_tokens, f"p{i}") for i in range(args.requests)])
        plain_s = time.perf_counter() - plain_started
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        try:  # the engine steps on its own thread: record that thread's operators too
            from torch._C._profiler import _ExperimentalConfig

            config = _ExperimentalConfig(profile_all_threads=True)
        except (ImportError, TypeError):
            config = None
        with profile(activities=activities, experimental_config=config) as prof:
            started = time.perf_counter()
            tokens = sum([await one(engine, prompt, args.max_tokens, f"r{i}") for i in range(args.requests)])
            wall = time.perf_counter() - started
        await engine.shutdown()
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") if cuda else 0.0
        kernels = sum(e.count for e in events if e.device_type.name == "CUDA") if cuda else 0
        api = {e.key: e.count for e in events if e.key.startswith("cuda")}
        if args.trace:
            prof.export_chrome_trace(str(args.trace))
        print(
            f"\nwithout the profiler: {plain / plain_s:,.1f} output tokens/s ({1e3 * plain_s / plain:.3f} ms a token)"
        )
        print(f"under the profiler:   {tokens / wall:,.1f} output tokens/s ({1e3 * wall / tokens:.3f} ms a token)")
        if cuda:
            print(
                f"device kernel time a token: {device_us / 1e3 / tokens:.3f} ms "
                f"({100 * device_us / 1e6 / wall:.0f} % of the wall time); kernels a token: {kernels / tokens:.1f}"
            )
            print("CUDA API calls a token: " + ", ".join(f"{k} {v / tokens:.2f}" for k, v in sorted(api.items())))
            print(events.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
        return {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "preset": preset,
            "tokens_per_s": plain / plain_s,
            "ms_per_token": 1e3 * plain_s / plain,
            "profiled_ms_per_token": 1e3 * wall / tokens,
            "device_kernel_ms_per_token": device_us / 1e3 / tokens,
            "kernels_per_token": kernels / tokens,
            "cuda_api_calls_per_token": {k: v / tokens for k, v in api.items()},
            "top_device": [
                {"op": e.key, "self_device_ms": e.self_device_time_total / 1e3, "count": e.count}
                for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.top]
            ],
            "top_host": [
                {"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "count": e.count}
                for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]
            ],
        }

    result = asyncio.run(run())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
