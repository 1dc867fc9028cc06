"""Serving throughput: `kollm serve` (continuous batching) against one-request-at-a-time transformers `generate`.

Both servers are real HTTP servers on 127.0.0.1, started one after the other in this run from the same model
folder, and driven by the same closed-loop load generator (C clients, each sending its next request when the
last one returns) with the same prompts and settings: greedy decoding, exactly --max-tokens output tokens
per request (kollm `ignore_eos`, the baseline `min_new_tokens`). The baseline is the usual first server people
write: a plain FastAPI handler that runs `model.generate` for one request at a time under a lock.

A second baseline, at concurrency 1 only: a bare `model.generate` loop in the benchmark's own process (no HTTP,
no server), with the same thread settings, alternating with kollm requests in paired rounds (--bare-rounds) so
both see the same load on a shared machine. It is the floor a server adds its overhead to; kollm's target is to
match it (ratio >= 1x) despite serving over HTTP.

A third baseline, on CUDA (--static-generate, the default there): transformers' own fast path in-process,
`generate` on a batch of C prompts at once with a static cache (`cache_implementation="static"`, which
transformers compiles), one timed batch per concurrency level after a warm-up batch. No HTTP, no streaming,
no arrivals: an upper reference for what batching the same model can give.

Printed: output tokens/s and p50/p95 request latency at each concurrency, kollm/baseline ratios, and
kollm/bare-generate at concurrency 1.

    python benchmarks/serve_throughput.py                                      # CPU, tiny model (~1 min)
    python benchmarks/serve_throughput.py --device cuda --preset 349m --out results.json   # one GPU
    python benchmarks/serve_throughput.py --preset 40m --max-tokens 64 --prompt-tokens 64 --threads 0   # CPU, 40M, torch's threads

Self-contained: builds a random-init Llama-shaped model and a byte-level BPE tokenizer itself (no hub, no MLflow);
needs torch, transformers, tokenizers, fastapi (and its opentelemetry-api), uvicorn, pydantic, httpx and prometheus-client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PRESETS = {
    # name: (hidden, layers, heads, kv heads, mlp, vocab, context)
    "tiny": (32, 2, 4, 2, 64, 320, 512),
    "40m": (512, 8, 8, 8, 1536, 16000, 2048),
    "349m": (1024, 24, 16, 8, 2816, 32000, 2048),
}

CORPUS = [
    "안녕하세요. 오늘 서울의 날씨는 맑고 따뜻합니다. 한국어 언어 모델을 학습하고 서빙하는 방법을 알아봅시다.",
    "대한민국의 수도는 서울이며, 부산과 인천은 큰 항구 도시입니다. 지하철과 버스가 잘 연결되어 있습니다.",
    "The quick brown fox jumps over the lazy dog. Serving many requests at once needs batching.",
    "kollm serves models with an OpenAI compatible API, with metrics, logs and canary rollouts.",
    "김치찌개와 된장찌개는 한국의 대표적인 음식입니다. 밥과 함께 먹으면 맛있습니다.",
    "연속 배칭은 요청이 끝나는 즉시 새 요청을 배치에 넣어 GPU를 쉬지 않게 합니다.",
]


# --- the model ------------------------------------------------------------------------------------------


def build_model(folder: Path, preset: str) -> int:
    """A random-init Llama-shaped model and a byte-level BPE tokenizer (padded with filler tokens to the vocab)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, layers, heads, kv_heads, mlp, vocab, context = PRESETS[preset]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab, 2000),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 50, trainer=trainer)
    if tok.get_vocab_size() < vocab:  # every id the model can emit must decode
        tok.add_tokens([f"<filler_{i}>" for i in range(vocab - tok.get_vocab_size())])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=context
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=preset == "tiny",
        initializer_range=0.5 if preset == "tiny" else 0.02,
    )
    torch.manual_seed(0)
    dtype = torch.float32 if preset != "349m" else torch.bfloat16
    with torch.device("cuda" if torch.cuda.is_available() and preset == "349m" else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=[fast.eos_token_id], pad_token_id=fast.pad_token_id)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def prompts(folder: Path, n: int, prompt_tokens: int) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = " ".join(CORPUS * 20)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = []
    for i in range(n):  # different windows of the corpus, each about prompt_tokens long
        start = (i * 7) % max(1, len(ids) - prompt_tokens)
        out.append(tok.decode(ids[start : start + prompt_tokens]))
    return out


# --- the two servers (each runs in its own process) -------------------------------------------------------


def run_kollm_server(args) -> None:
    from kollm.serve import serve

    serve(
        str(args.model_dir),
        host="127.0.0.1",
        port=args.port,
        project_dir=Path(args.model_dir).parent,
        served_model_name="bench",
        backend="transformers",
        device=args.device,
        max_batch_size=args.max_batch_size,
        log_level="warning",
        kv_cache=args.kv_cache,
    )


def run_baseline_server(args) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(device).eval()
    app = FastAPI()
    lock = asyncio.Lock()

    def generate(body: dict) -> dict:
        enc = tok(body["prompt"], return_tensors="pt").to(device)
        n = body["max_tokens"]
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=n,
                min_new_tokens=n if body.get("ignore_eos") else 0,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, enc["input_ids"].shape[1] :]
        return {
            "choices": [{"index": 0, "text": tok.decode(new, skip_special_tokens=True), "finish_reason": "length"}],
            "usage": {
                "prompt_tokens": enc["input_ids"].shape[1],
                "completion_tokens": len(new),
                "total_tokens": enc["input_ids"].shape[1] + len(new),
            },
        }

    @app.post("/v1/completions")
    async def completions(body: dict) -> dict:
        async with lock:  # one request at a time: what a plain generate() handler does
            return await asyncio.to_thread(generate, body)

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready"}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


class BareLoop:
    """The bare generate loop, in the benchmark's own process (no HTTP, no server): one prompt at a time."""

    def __init__(self, args):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch, self.device, self.n = torch, args.device, args.max_tokens
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.tok = AutoTokenizer.from_pretrained(args.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(self.device).eval()

    def one(self, text: str) -> float:
        enc = self.tok(text, return_tensors="pt").to(self.device)
        start = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=self.n, min_new_tokens=self.n, do_sample=False, pad_token_id=self.tok.pad_token_id
            )
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()
        assert out.shape[1] - enc["input_ids"].shape[1] == self.n
        return time.perf_counter() - start


def static_generate(args, texts: list[str], levels: list[int]) -> list[LevelResult]:
    """transformers' static-cache `generate` on a batch of C prompts per level (left-padded), in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
    cuda = args.device.startswith("cuda")
    model = (
        AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
        .to(args.device)
        .eval()
    )
    n = args.max_tokens
    out = []
    for c in levels:
        enc = tok(texts[:c], return_tensors="pt", padding=True).to(args.device)

        def run() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                ids = model.generate(
                    **enc,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    cache_implementation="static",
                )
            if cuda:
                torch.cuda.synchronize()
            assert ids.shape[1] - enc["input_ids"].shape[1] == n
            return time.perf_counter() - start

        warm = run()  # compiles for this batch shape
        seconds = min(run() for _ in range(2))
        r = LevelResult(c, c, seconds, c * n, c * n / seconds, seconds, seconds, 0)
        print(
            f"  {'hf-static':9s}c={c:<3d} batch of {c:<3d} {r.tokens_per_s:9.1f} tok/s  ({seconds:.2f}s; first batch with compilation {warm:.1f}s)",
            flush=True,
        )
        out.append(r)
    return out


def paired_c1(
    port: int, bare: BareLoop, texts: list[str], rounds: int, max_tokens: int
) -> tuple[LevelResult, LevelResult]:
    """Concurrency 1, kollm over HTTP and the bare loop alternating (2 requests each per round), so that both
    see the same machine load; returns (kollm, bare) totals."""
    k_lat: list[float] = []
    b_lat: list[float] = []
    bare.one(texts[0])
    for r in range(rounds):
        k = asyncio.run(drive(port, texts[2 * r :], 1, 2, max_tokens))
        k_lat += [k.seconds / 2] * 2
        b_lat += [bare.one(texts[(2 * r + i) % len(texts)]) for i in range(2)]
    n = max_tokens * len(k_lat)

    def result(lat: list[float]) -> LevelResult:
        return LevelResult(1, len(lat), sum(lat), n, n / sum(lat), statistics.median(lat), percentile(lat, 0.95), 0)

    return result(k_lat), result(b_lat)


# --- the load generator -----------------------------------------------------------------------------------


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    seconds: float
    output_tokens: int
    tokens_per_s: float
    p50_s: float
    p95_s: float
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Connection:
    """A minimal HTTP/1.1 keep-alive client: httpx spends milliseconds of CPU per request, which on a small CPU
    box would throttle the load generator rather than the server under test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        status_line, *lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)}
        if headers.get("transfer-encoding") == "chunked":
            data = bytearray()
            while size := int((await self.reader.readuntil(b"\r\n")).strip(), 16):
                data += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readuntil(b"\r\n")
            return int(status_line.split()[1]), bytes(data)
        return int(status_line.split()[1]), await self.reader.readexactly(int(headers.get("content-length", "0")))


async def drive(port: int, texts: list[str], concurrency: int, total: int, max_tokens: int) -> LevelResult:
    latencies: list[float] = []
    tokens = 0
    errors = 0
    next_index = 0

    async def client() -> None:
        nonlocal tokens, errors, next_index
        conn = Connection(*await asyncio.open_connection("127.0.0.1", port))
        try:
            while next_index < total:
                i = next_index
                next_index += 1
                body = {
                    "model": "bench",
                    "prompt": texts[i % len(texts)],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                start = time.perf_counter()
                status, data = await conn.post("/v1/completions", json.dumps(body).encode())
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    errors += 1
                    continue
                tokens += json.loads(data)["usage"]["completion_tokens"]
        finally:
            conn.writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    seconds = time.perf_counter() - start
    return LevelResult(
        concurrency,
        total,
        seconds,
        tokens,
        tokens / seconds,
        statistics.median(latencies),
        percentile(latencies, 0.95),
        errors,
    )


def measure(
    kind: str, args, texts: list[str], levels: list[int], bare: BareLoop | None = None
) -> tuple[list[LevelResult], tuple | None]:
    import httpx

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = [
        sys.executable,
        __file__,
        "--_server",
        kind,
        "--model-dir",
        str(args.model_dir),
        "--port",
        str(port),
        "--device",
        args.device,
        "--max-batch-size",
        str(args.max_batch_size),
        "--kv-cache",
        args.kv_cache,
    ] + (["--threads", str(args.threads)] if args.threads else [])
    log = open(Path(args.model_dir).parent / f"{kind}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the {kind} server exited with {proc.returncode}; see {log.name}")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit(f"the {kind} server did not become ready; see {log.name}")
            time.sleep(0.2)
        asyncio.run(drive(port, texts, 2, 4, args.max_tokens))  # warm-up: kernels, allocator, tokenizer
        results = []
        for c in levels:
            total = args.requests or max(2 * c, 8)
            r = asyncio.run(drive(port, texts, c, total, args.max_tokens))
            print(
                f"  {kind:8s} c={c:<3d} {r.requests:4d} req  {r.tokens_per_s:9.1f} tok/s  p50 {r.p50_s:7.3f}s  p95 {r.p95_s:7.3f}s  errors {r.errors}",
                flush=True,
            )
            results.append(r)
        pair = None
        if bare is not None:
            pair = paired_c1(port, bare, texts, args.bare_rounds, args.max_tokens)
            for name, r in zip(("kollm", "bare"), pair):
                print(
                    f"  {name:8s} c=1   {r.requests:4d} req  {r.tokens_per_s:9.1f} tok/s  p50 {r.p50_s:7.3f}s  (paired rounds{', generate without HTTP' if name == 'bare' else ''})",
                    flush=True,
                )
        return results, pair
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--preset", default=None, choices=sorted(PRESETS), help="model size (default: tiny on CPU, 349m on CUDA)"
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument(
        "--max-tokens", type=int, default=None, help="output tokens per request (default: 32 tiny, 128 349m)"
    )
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default: 32 tiny, 64 349m)")
    p.add_argument("--requests", type=int, default=None, help="requests per concurrency level (default: max(2*C, 8))")
    p.add_argument(
        "--max-batch-size", type=int, default=None, help="kollm's batch limit (default: the largest concurrency)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads in each server and the bare loop (default: 1 on CPU, which is fastest on a shared machine; 0: torch's default, all cores)",
    )
    p.add_argument("--model-dir", type=Path, default=None, help="reuse a model folder instead of building one")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument(
        "--bare-rounds",
        type=int,
        default=4,
        help="paired rounds of kollm vs a bare generate loop at concurrency 1 (0: skip)",
    )
    p.add_argument(
        "--kv-cache",
        default="auto",
        choices=["auto", "static", "dynamic"],
        help="kollm's KV cache (auto: static on CUDA)",
    )
    p.add_argument(
        "--no-server-baseline", action="store_true", help="skip the one-request-at-a-time server (slow on a GPU)"
    )
    p.add_argument(
        "--static-generate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure transformers' static-cache generate in batches (default: on CUDA)",
    )
    p.add_argument("--_server", choices=["kollm", "baseline"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._server:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        (run_kollm_server if args._server == "kollm" else run_baseline_server)(args)
        return

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    preset = args.preset or ("349m" if args.device.startswith("cuda") else "tiny")
    args.max_tokens = args.max_tokens or (32 if preset == "tiny" else 128)
    args.prompt_tokens = args.prompt_tokens or (32 if preset == "tiny" else 64)
    args.max_batch_size = args.max_batch_size or max(args.concurrency)
    if args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    args.threads = args.threads or None  # 0: torch's default in every process
    if args.threads:
        torch.set_num_threads(args.threads)  # the bare loop runs here
    work = Path(tempfile.mkdtemp(prefix="kollm-bench-"))
    params = None
    if args.model_dir is None:
        args.model_dir = work / "model"
        started = time.perf_counter()
        params = build_model(args.model_dir, preset)
        print(
            f"built a random {preset} model ({params / 1e6:.2f}M parameters) in {time.perf_counter() - started:.1f}s at {args.model_dir}"
        )
    elif not (args.model_dir / "config.json").is_file():
        raise SystemExit(
            f"--model-dir {args.model_dir}: not a model folder (no config.json); leave it out to build a random model"
        )
    texts = prompts(args.model_dir, 64, args.prompt_tokens)
    device_name = (
        torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or platform.machine()
    )
    print(
        f"device {args.device} ({device_name}), {args.max_tokens} output tokens per request, prompts of ~{args.prompt_tokens} tokens, greedy"
    )

    bare = BareLoop(args) if args.bare_rounds else None
    kollm, pair = measure("kollm", args, texts, args.concurrency, bare)
    if bare is not None:
        del bare.model
    hf_static = None
    if args.static_generate if args.static_generate is not None else args.device.startswith("cuda"):
        hf_static = static_generate(args, texts, args.concurrency)
    if args.no_server_baseline:
        nan = float("nan")
        baseline = [LevelResult(c, 0, nan, 0, nan, nan, nan, 0) for c in args.concurrency]
    else:
        baseline, _ = measure("baseline", args, texts, args.concurrency)

    header = f"{'concurrency':>11} | {'baseline tok/s':>14} | {'kollm tok/s':>11} | {'tok/s ratio':>11} | {'baseline p50/p95 s':>18} | {'kollm p50/p95 s':>15} | {'p95 ratio':>9}"
    print("\n" + header + "\n" + "-" * len(header))
    rows = []
    for b, k in zip(baseline, kollm):
        speedup = k.tokens_per_s / b.tokens_per_s if b.tokens_per_s else float("nan")
        p95_ratio = b.p95_s / k.p95_s if k.p95_s else float("nan")
        print(
            f"{k.concurrency:>11} | {b.tokens_per_s:>14.1f} | {k.tokens_per_s:>11.1f} | {speedup:>10.2f}x | {b.p50_s:>8.3f} / {b.p95_s:<7.3f} | {k.p50_s:>6.3f} / {k.p95_s:<6.3f} | {p95_ratio:>8.2f}x"
        )
        rows.append(
            {
                "concurrency": k.concurrency,
                "baseline": asdict(b),
                "kollm": asdict(k),
                "tokens_per_s_ratio": speedup,
                "p95_latency_ratio_baseline_over_kollm": p95_ratio,
            }
        )
    if hf_static is not None:
        print("\nkollm over HTTP vs transformers' static-cache generate (in-process batches, no HTTP):")
        for s, k, row in zip(hf_static, kollm, rows):
            row["hf_static_generate"] = asdict(s)
            row["kollm_over_hf_static"] = k.tokens_per_s / s.tokens_per_s
            print(
                f"  c={k.concurrency:<3d} kollm {k.tokens_per_s:9.1f} tok/s, static generate {s.tokens_per_s:9.1f} tok/s: {k.tokens_per_s / s.tokens_per_s:.2f}x"
            )
    errors = sum(r.errors for r in kollm + baseline)
    bare_ratio = None
    if pair is not None:
        k1, b1 = pair
        bare_ratio = k1.tokens_per_s / b1.tokens_per_s
        print(
            f"\nconcurrency 1, {args.bare_rounds} paired rounds: kollm over HTTP {k1.tokens_per_s:.1f} tok/s, bare generate loop "
            f"(no HTTP) {b1.tokens_per_s:.1f} tok/s: {bare_ratio:.2f}x (target >= 1x)"
        )
    print(
        f"\nerrors: {errors}. tok/s ratio = kollm / baseline (higher is better); p95 ratio = baseline p95 / kollm p95 (higher is better)."
    )
    if args.out:
        result = {
            "benchmark": "serve_throughput",
            "device": args.device,
            "device_name": device_name,
            "preset": preset,
            "parameters": params,
            "max_tokens": args.max_tokens,
            "prompt_tokens": args.prompt_tokens,
            "max_batch_size": args.max_batch_size,
            "threads": args.threads,
            "kv_cache": args.kv_cache,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "levels": rows,
            "errors": errors,
            "paired_c1": None if pair is None else {"kollm": asdict(pair[0]), "bare_generate": asdict(pair[1])},
            "kollm_over_bare_c1": bare_ratio,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
