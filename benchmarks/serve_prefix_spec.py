"""Prefix caching and prompt-lookup speculative decoding in kollm's native engine: each on against off, in one run.

One TransformersEngine (static KV cache) serves every workload in-process (no HTTP: these are engine claims);
between workloads its prefix cache and its speculator are switched off and on again (the engine object's
`_prefix` / `_speculator`), so both sides share the same model, CUDA graphs and warm-up. Each pair of sides runs
in alternating rounds (--rounds) so that both see the same load on a shared machine. Prompts are token ids.

Workloads (issue #35's targets in brackets):
  shared     a --system-tokens shared system prompt + a distinct 32-token question, at concurrency --concurrency,
             one warm-up request first (the system prompt is then cached, as in a long-running server):
             time to first token p50, cache on vs off [>= 3x lower with the cache]
  unshared   distinct prompts of the same length at the same concurrency: output tokens/s and TTFT p50, cache on
             vs off [no slowdown above 3 %]
  copy       an extraction workload at concurrency 1: a document, then its first tokens again, so the natural
             continuation copies the document: output tokens/s, speculation on vs off, with the draft acceptance
             [>= 1.5x with speculation] (a random-init model does not copy: give --model-dir with a trained model,
             or --train-copy STEPS to first train the built model to continue a repeated document, as a trained
             model does in extraction; its copy accuracy is printed)
  nomatch    distinct random tokens at concurrency 1 (drafts rarely found): output tokens/s, speculation on vs off
             [at most 5 % slower]

    python benchmarks/serve_prefix_spec.py --preset tiny --system-tokens 256 --requests 8 --concurrency 8   # CPU smoke
    python benchmarks/serve_prefix_spec.py --device cuda --preset 349m --out benchmarks/results/serve_prefix_spec.json
    python benchmarks/serve_prefix_spec.py --device cuda --model-dir /path/to/llama-folder

Greedy decoding, exactly --max-tokens output tokens per request (ignore_eos). Printed: a table of each workload's
two sides and their ratio; --out writes it as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


@dataclass
class Side:
    workload: str
    side: str  # "on" or "off"
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def drive(engine, prompts: list[list[int]], concurrency: int, max_tokens: int) -> tuple[int, float, list[float]]:
    """Closed loop: `concurrency` clients, each sending its next prompt when the last one finished. Returns
    (output tokens, seconds, each request's time to first token)."""
    from kollm.serve.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    queue = list(enumerate(prompts))
    ttfts: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while queue:
            i, ids = queue.pop(0)
            started = time.perf_counter()
            first = None
            async for chunk in engine.generate(ids, params, f"b{i}"):
                if first is None:
                    first = time.perf_counter() - started
                if chunk.finish_reason is not None:
                    tokens += chunk.completion_tokens
            ttfts.append(first or 0.0)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return tokens, time.perf_counter() - started, ttfts


def side(workload: str, name: str, runs: list[tuple[int, float, list[float]]]) -> Side:
    tokens = sum(r[0] for r in runs)
    seconds = sum(r[1] for r in runs)
    ttfts = [t for r in runs for t in r[2]]
    return Side(
        workload,
        name,
        len(ttfts),
        tokens,
        seconds,
        tokens / seconds,
        1000 * statistics.median(ttfts),
        1000 * percentile(ttfts, 0.95),
    )


def train_copy(folder: Path, steps: int, device: str, doc: int = 400, rows: int = 16) -> float:
    """Train the model in `folder` for `steps` AdamW steps on rows [document, 4 random tokens, the document again]
    (loss on the repeat), so that its greedy continuation of a repeated document's first tokens copies the rest,
    as the copy workload asks; save it back. Returns the next-token accuracy on the repeats of fresh rows."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        d = torch.randint(3, vocab, (rows, doc), generator=gen)
        ids = torch.cat([d, torch.randint(3, vocab, (rows, 4), generator=gen), d], dim=1).to(device)
        labels = ids.clone()
        labels[:, : doc + 4] = -100
        return ids, labels

    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    started = time.perf_counter()
    for step in range(steps):
        ids, labels = batch()
        with autocast:
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            print(f"train-copy step {step}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad(), autocast:
        ids, labels = batch()
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
        mask = labels[:, 1:] != -100
        accuracy = (pred == labels[:, 1:])[mask].float().mean().item()
    print(f"train-copy: next-token accuracy on the repeats {accuracy:.3f}", flush=True)
    model.to(torch.bfloat16 if device.startswith("cuda") else torch.float32).save_pretrained(folder)
    return accuracy


def captured(engine) -> dict[str, int]:
    """The engine's prefix-hit prefill and verify CUDA graphs: how many, and how many were captured after warm-up."""
    extender = engine._prefix.extender if engine._prefix is not None else None
    verifier = engine._verifier
    return {
        "prefix": len(extender.graphs) if extender is not None else 0,
        "prefix_late": extender.late if extender is not None else 0,
        "verify": len(verifier.graphs) if verifier is not None else 0,
        "verify_late": verifier.late if verifier is not None else 0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--preset", default=None, help="serve_throughput's model presets (default: tiny on CPU, 349m on CUDA)"
    )
    p.add_argument("--model-dir", type=Path, default=None, help="a Llama-family model folder instead of a built one")
    p.add_argument("--system-tokens", type=int, default=1000, help="the shared system prompt's length")
    p.add_argument("--concurrency", type=int, default=32, help="clients of the shared and unshared workloads")
    p.add_argument("--requests", type=int, default=64, help="requests per side and round of those workloads")
    p.add_argument("--copy-requests", type=int, default=4, help="requests per side and round at concurrency 1")
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens per request (default 16 tiny, 128)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of each pair of sides")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--workloads", nargs="+", default=["shared", "unshared", "copy", "nomatch"])
    p.add_argument(
        "--train-copy", type=int, default=0, help="first train the model STEPS steps to copy (see copy above)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()

    import torch

    from kollm.serve.engine import load_engine
    from kollm.serve.speculative import Speculator

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    preset = args.preset or ("349m" if args.device.startswith("cuda") else "tiny")
    max_tokens = args.max_tokens or (16 if preset == "tiny" and args.model_dir is None else 128)
    model = preset if args.model_dir is None else str(args.model_dir)
    if args.model_dir is None:
        from serve_throughput import build_model

        args.model_dir = Path(tempfile.mkdtemp(prefix="kollm-bench-")) / "model"
        build_model(args.model_dir, preset)
    copy_accuracy = train_copy(args.model_dir, args.train_copy, args.device) if args.train_copy else None
    engine = load_engine(
        args.model_dir,
        backend="transformers",
        device=args.device,
        kv_cache="static",
        max_batch_size=args.concurrency,
        prefix_cache=True,
        speculative="ngram",
    )
    vocab = engine.vocab_size  # type: ignore[attr-defined]
    rng = random.Random(0)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]  # 0-2: the built tokenizer's special tokens

    async def run() -> list[Side]:
        while not engine.ready():
            await asyncio.sleep(0.1)
        prefix = engine._prefix  # type: ignore[attr-defined]
        out: list[Side] = []

        def switch(prefix_on: bool, spec_on: bool) -> None:
            engine._prefix = prefix if prefix_on else None  # type: ignore[attr-defined]
            engine._speculator = Speculator() if spec_on else None  # type: ignore[attr-defined]

        system = tokens(args.system_tokens)
        for workload in args.workloads:
            runs: dict[str, list] = {"on": [], "off": []}
            accepted = proposed = pauses = 0
            for _ in range(args.rounds):
                for name in ("on", "off"):
                    on = name == "on"
                    if workload in ("shared", "unshared"):
                        switch(on, False)
                        if workload == "shared":
                            batch = [system + tokens(32) for _ in range(args.requests)]
                            await drive(engine, [system + tokens(32)], 1, 1)  # the system prompt is cached (on)
                        else:
                            batch = [tokens(args.system_tokens + 32) for _ in range(args.requests)]
                        runs[name].append(await drive(engine, batch, args.concurrency, max_tokens))
                    else:
                        switch(False, on)
                        if workload == "copy":
                            docs = [tokens(min(400, args.system_tokens)) for _ in range(args.copy_requests)]
                            batch = [d + tokens(4) + d[:8] for d in docs]
                        else:
                            batch = [tokens(64) for _ in range(args.copy_requests)]
                        runs[name].append(await drive(engine, batch, 1, max_tokens))
                        if on and engine._speculator is not None:  # type: ignore[attr-defined]
                            accepted += engine._speculator.accepted  # type: ignore[attr-defined]
                            proposed += engine._speculator.proposed  # type: ignore[attr-defined]
                            pauses += engine._speculator.pauses  # type: ignore[attr-defined]
            pair = [side(workload, name, runs[name]) for name in ("on", "off")]
            out += pair
            on_, off = pair
            extra = (
                f", drafts accepted {accepted}/{proposed}, drafting paused {pauses}x (verifying did not pay)"
                if workload in ("copy", "nomatch")
                else ""
            )
            print(
                f"{workload:9s} on: {on_.tokens_per_s:9.1f} tok/s, TTFT p50 {on_.ttft_p50_ms:8.1f} ms | "
                f"off: {off.tokens_per_s:9.1f} tok/s, TTFT p50 {off.ttft_p50_ms:8.1f} ms | "
                f"tok/s on/off {on_.tokens_per_s / off.tokens_per_s:5.2f}x, "
                f"TTFT off/on {off.ttft_p50_ms / max(on_.ttft_p50_ms, 1e-9):5.2f}x{extra}",
                flush=True,
            )
        switch(True, False)
        await engine.shutdown()
        graphs.update(captured(engine))
        print(
            "CUDA graphs captured at warm-up: prefix-hit prefill {prefix}, verify {verify}; after warm-up (on "
            "requests' paths): {prefix_late} and {verify_late}".format(**graphs),
            flush=True,
        )
        return out

    graphs: dict[str, int] = {}

    results = asyncio.run(run())
    if args.out:
        meta = {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
            "model": model,
            "copy_accuracy": copy_accuracy,
            "graphs": graphs,
            "args": {k: str(v) for k, v in vars(args).items()},
        }
        args.out.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=2))


if __name__ == "__main__":
    main()
