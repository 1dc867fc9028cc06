"""Fixtures for the vLLM backend: a tiny model vLLM's CPU kernels accept, and `kollm serve --backend vllm` on 127.0.0.1.

The server tests run where vLLM imports (`make test-vllm` builds .venv-vllm with vLLM's CPU build and runs them);
elsewhere they skip with that reason. One vLLM start costs about a minute on two cores (engine process, model
load, KV cache), so each module starts one server and shares it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kollm.serve.vllm_engine import vllm_importable
from tests.tiny import tiny_tokenizer

needs_vllm = pytest.mark.skipif(
    not vllm_importable(),
    reason="vLLM is not importable in this environment; `make test-vllm` builds .venv-vllm with vLLM's CPU build and runs these tests",
)
KOLLM = str(Path(sys.executable).parent / "kollm")
# enforce_eager: no torch.compile warm-up (minutes on two cores); 0.1 of RAM for the KV cache on CPU; float32 as
# transformers computes the reference answers (vLLM's CPU build would pick bfloat16)
FAST_VLLM = ["--engine-arg", "enforce_eager=true", "--engine-arg", "gpu_memory_utilization=0.1", "--dtype", "float32"]


def save_vllm_tiny(path: Path, *, seed: int = 0, context: int = 256) -> Path:
    """tests/tiny.py's tokenizer with a Llama whose head size (32) vLLM's CPU attention supports (tiny.py's is 8)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(context)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=context,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        initializer_range=0.5,  # large random weights: varied, context-dependent greedy outputs
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=[tok.eos_token_id], pad_token_id=tok.pad_token_id)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class KollmServer:
    url: str
    proc: subprocess.Popen
    log: Path
    cwd: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 90) -> int | None:
        """SIGTERM, as a process manager stops it; the exit status (uvicorn re-raises the signal: -15 after a clean exit)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the server and vLLM's engine process, all started here
                self.proc.wait(10)
        return self.proc.returncode


def start_kollm(model: Path, cwd: Path, *args: str, timeout: float = 600) -> KollmServer:
    """`kollm serve MODEL --backend vllm` in its own process group, waited on until /ready answers 200."""
    port = free_port()
    log = cwd / f"serve-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [KOLLM, "serve", str(model), "--backend", "vllm", "--port", str(port), *FAST_VLLM, *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "VLLM_NO_USAGE_STATS": "1"},
        )
    server = KollmServer(f"http://127.0.0.1:{port}", proc, log, cwd)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"kollm serve --backend vllm exited with {proc.returncode}:\n{server.output()[-6000:]}"
            )
        try:
            if httpx.get(server.url + "/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.stop()
    raise AssertionError(f"kollm serve --backend vllm was not ready after {timeout:.0f} s:\n{server.output()[-6000:]}")


@pytest.fixture(scope="session")
def vllm_tiny_dir(tmp_path_factory) -> Path:
    return save_vllm_tiny(tmp_path_factory.mktemp("vllm-tiny") / "model")
