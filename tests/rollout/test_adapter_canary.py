"""`kollm serve models:/ADAPTER@champion --canary models:/ADAPTER@challenger` where both versions are LoRA adapters
of one base: one engine holds the base once with both adapters, each arm answers as its own merged model, and the
rollout promotes or rolls back as for whole models."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kollm.pipeline.tracking import client_for
from kollm.rollout import client as rollout_client
from kollm.rollout.serving import build_canary_gateway
from kollm.serve.faults import parse_faults

from .conftest import Load, Server, wait_for

from tests.tiny import save_tiny

PROMPT = "서울은 대한민국의"
TOKENS = 5


@pytest.fixture(scope="module")
def lora_versions(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny base and two strong random LoRA adapters of it (PEFT folders naming the base's folder)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora-canary")
    base = save_tiny(root / "base", init_range=0.5)
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        model.save_pretrained(root / f"adapter-{seed}")
        out.append(root / f"adapter-{seed}")
    return base, out


@pytest.fixture(scope="module")
def merged_answers(lora_versions) -> list[str]:
    """Each adapter's greedy answer to PROMPT by PEFT's merged model."""
    from peft import PeftModel

    base, adapters = lora_versions
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    out = []
    for folder in adapters:
        merged = PeftModel.from_pretrained(copy.deepcopy(model), str(folder)).merge_and_unload().eval()
        seq = tok(PROMPT)["input_ids"]
        n = len(seq)
        with torch.no_grad():
            for _ in range(TOKENS):
                seq.append(int(merged(torch.tensor([seq])).logits[0, -1].argmax()))
        out.append(tok.decode(seq[n:]))
    assert out[0] != out[1]  # the two adapters answer differently
    return out


def _register(registered, adapters: list[Path]) -> None:
    """Versions 3 (champion) and 4 (challenger): the two adapters."""
    client = client_for(registered.tracking_uri)
    for folder in adapters:
        client.create_model_version(registered.name, source=str(folder))
    client.set_registered_model_alias(registered.name, "champion", "3")
    client.set_registered_model_alias(registered.name, "challenger", "4")


def _ask(url: str, name: str, arm: str) -> tuple[str, str]:
    r = httpx.post(
        f"{url}/v1/completions",
        json={"model": name, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True},
        headers={"x-kollm-canary": arm},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.headers["x-kollm-model-version"], r.json()["choices"][0]["text"]


def _gateway(registered, project_dir, **options):
    """The canary gateway of the registered adapter model: champion against challenger, on CPU."""
    return build_canary_gateway(
        f"models:/{registered.name}@champion",
        f"models:/{registered.name}@challenger",
        project_dir=project_dir,
        device="cpu",
        max_batch_size=8,
        **options,
    )


def test_adapter_canary_on_one_base_is_promoted(registered, tmp_path, lora_versions, merged_answers):
    torch.set_num_threads(1)
    _register(registered, lora_versions[1])
    gw = _gateway(registered, tmp_path, follow_interval=0)
    assert gw.canary is not None and (gw.stable.version, gw.canary.version) == ("3", "4")
    engine = gw.stable.app.state.engine  # type: ignore[attr-defined]
    assert gw.canary.app.state.engine is engine  # type: ignore[attr-defined]  # one base in memory
    assert sorted(engine.adapters.adapters) == [f"{registered.name}/3", f"{registered.name}/4"]
    with Server(gw) as srv:
        # each arm answers under the registered name as its own adapter's merged model
        assert _ask(srv.url, registered.name, "never") == ("3", merged_answers[0])
        assert _ask(srv.url, registered.name, "always") == ("4", merged_answers[1])
        with Load(srv.url, registered.name, threads=3) as load:
            rollout_client.start(
                registered.name,
                steps="50",
                pause="1.5s",
                min_requests=2,
                analysis="success_rate>=0.95,p95_ms<=20000",
                gateway=srv.url,
            )
            wait_for(
                lambda: rollout_client.command("status", gateway=srv.url)["rollout"]["status"] == "promoted",
                60,
                "promotion",
            )
            time.sleep(0.3)
        # promoted: adapter 4 is the stable arm on the same engine, still running (the old arm's retirement
        # leaves the shared engine alone)
        assert gw.stable.version == "4" and gw.stable.app.state.engine is engine  # type: ignore[attr-defined]
        assert _ask(srv.url, registered.name, "never") == ("4", merged_answers[1])
        scrape = httpx.get(srv.url + "/metrics").text
    assert load.result.failed == [], load.result.failed[:3]
    assert load.result.versions()["3"] > 0 and load.result.versions()["4"] > 0
    assert registered.alias("champion") == "4" and registered.alias("previous") == "3"
    for v in ("3", "4"):  # per-adapter metrics name each version's adapter
        assert f'kollm_adapter_requests_total{{adapter="{registered.name}/{v}",model_version="{v}"}}' in scrape


def test_failing_adapter_canary_is_rolled_back(registered, tmp_path, lora_versions, merged_answers):
    torch.set_num_threads(1)
    _register(registered, lora_versions[1])
    gw = _gateway(registered, tmp_path, follow_interval=0, canary_faults=parse_faults("error_rate=1"))
    with Server(gw) as srv, Load(srv.url, registered.name, threads=3) as load:
        rollout_client.start(registered.name, steps="50", pause="1s", min_requests=2, failure_limit=1, gateway=srv.url)
        wait_for(
            lambda: rollout_client.command("status", gateway=srv.url)["rollout"]["status"] == "rolled_back",
            60,
            "rollback",
        )
        assert _ask(srv.url, registered.name, "never") == ("3", merged_answers[0])
    assert load.result.failed == [], load.result.failed[:3]
    assert load.result.canary_errors > 0
    assert registered.alias("champion") == "3"


def test_a_later_adapter_challenger_joins_the_same_engine(registered, tmp_path, lora_versions, merged_answers):
    """Following the challenger alias: a new adapter version of the same base is added to the running engine."""
    torch.set_num_threads(1)
    _register(registered, lora_versions[1])
    gw = _gateway(registered, tmp_path, follow_interval=0.2)
    engine = gw.stable.app.state.engine  # type: ignore[attr-defined]
    with Server(gw) as srv:
        client = client_for(registered.tracking_uri)
        client.create_model_version(registered.name, source=str(lora_versions[1][0]))  # version 5: adapter 1 again
        client.set_registered_model_alias(registered.name, "challenger", "5")
        wait_for(lambda: gw.canary is not None and gw.canary.version == "5", 30, "the new challenger")
        assert gw.canary is not None and gw.canary.app.state.engine is engine  # type: ignore[attr-defined]
        assert f"{registered.name}/5" in engine.adapters.adapters
        assert _ask(srv.url, registered.name, "always") == ("5", merged_answers[0])
