"""Many LoRA adapters on one base (issue 38): output tokens/s of the native engine serving N adapters mixed in one
batch, against the same engine serving the base alone, in the same run, same model, prompts and settings.

Cases (each a fresh TransformersEngine in this process, no HTTP; C concurrent closed-loop clients, greedy, exactly
--max-tokens output tokens per request):
  base              the base alone, --kv-cache (default auto: static on CUDA for Llama-shaped models, else dynamic)
  base_dynamic      the base alone with the dynamic KV cache
  adapters          N random LoRA adapters (rank --rank, all linear layers), requests spread round-robin over them,
                    --max-adapters slots (default N: no eviction), --kv-cache (auto: the static cache on CUDA, each
                    row's LoRA inside the step's CUDA graph, kollm.serve.multi_lora)
  adapters_dynamic  the same adapters on the dynamic KV cache (what --adapters used before the static path had them)

Printed: tokens/s per case and the ratios adapters/base and adapters/adapters_dynamic (the target: adapters/base
>= 0.8x with 8 adapters on the 349M base at concurrency 32).

    python benchmarks/multi_lora.py                                   # CPU, tiny model, dynamic cache (seconds)
    python benchmarks/multi_lora.py --kv-cache static                 # CPU, tiny model, the static path's code
    python benchmarks/multi_lora.py --device cuda --preset 349m --adapters 8 --concurrency 32 --out r.json

Not measured on a GPU yet (no GPU in the sessions that wrote it); on CPU it checks that every case runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_throughput import PRESETS, build_model, prompts  # noqa: E402


def make_adapters(base: Path, root: Path, n: int, rank: int) -> dict[str, Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for i in range(n):
        torch.manual_seed(1000 + i)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False),
        )
        model.save_pretrained(root / f"a{i}")
        out[f"a{i}"] = root / f"a{i}"
    return out


async def drive(engine, texts: list[str], names: list[str | None], concurrency: int, total: int, max_tokens: int):
    from kollm.serve.engine import SamplingParams

    done = 0
    tokens = 0
    ids = [engine.encode_prompt(t) for t in texts]

    async def client(c: int) -> None:
        nonlocal done, tokens
        while done < total:
            i = done
            done += 1
            params = SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True, adapter=names[i % len(names)]
            )
            async for chunk in engine.generate(ids[i % len(ids)], params, f"r{c}-{i}"):
                if chunk.finish_reason is not None:
                    tokens += chunk.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    return tokens / (time.perf_counter() - start)


def run_case(args, folder: Path, texts: list[str], adapters: dict[str, Path] | None, kv: str) -> float:
    from kollm.serve.engine import load_engine

    engine = load_engine(
        folder,
        backend="transformers",
        device=args.device,
        max_batch_size=args.concurrency,
        kv_cache=kv,
        adapters=adapters,
        max_adapters=args.max_adapters or len(adapters or {}) or 1,
    )
    names: list[str | None] = list(adapters) if adapters else [None]

    async def go() -> float:
        try:
            await drive(engine, texts, names, args.concurrency, args.concurrency, args.max_tokens)  # warm-up
            return await drive(engine, texts, names, args.concurrency, args.requests, args.max_tokens)
        finally:
            await engine.shutdown()

    return asyncio.run(go())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--max-adapters", type=int, default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=None, help="timed requests per case (default: 4 x concurrency)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--kv-cache", default="auto", choices=["auto", "static", "dynamic"], help="base and adapters cases")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.requests = args.requests or 4 * args.concurrency
    with tempfile.TemporaryDirectory(prefix="kollm-multi-lora-") as tmp:
        folder = Path(tmp) / "base"
        build_model(folder, args.preset)
        texts = prompts(folder, 64, args.prompt_tokens)
        adapters = make_adapters(folder, Path(tmp), args.adapters, args.rank)
        results = {
            "base": run_case(args, folder, texts, None, args.kv_cache),
            "base_dynamic": run_case(args, folder, texts, None, "dynamic"),
            "adapters": run_case(args, folder, texts, adapters, args.kv_cache),
            "adapters_dynamic": run_case(args, folder, texts, adapters, "dynamic"),
        }
    print(f"{'case':<18}{'tokens/s':>12}")
    for name, rate in results.items():
        print(f"{name:<18}{rate:>12.1f}")
    ratios = {
        "adapters/base": results["adapters"] / results["base"],
        "adapters/adapters_dynamic": results["adapters"] / results["adapters_dynamic"],
    }
    for name, r in ratios.items():
        print(f"{name:<28}{r:>6.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "tokens_per_s": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
