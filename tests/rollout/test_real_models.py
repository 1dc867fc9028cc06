"""`kollm serve --canary` for real: two registered versions of a tiny transformers model behind the gateway."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from kollm.pipeline.tracking import client_for
from kollm.rollout import client as rollout_client
from kollm.rollout.serving import build_canary_gateway

from .conftest import Load, Server, wait_for

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))
from tiny_model import build_tiny_model  # noqa: E402


@pytest.mark.slow
def test_tiny_models_promoted_through_the_gateway(registered, tmp_path):
    import torch

    torch.set_num_threads(1)
    client = client_for(registered.tracking_uri)
    for seed in (1, 2):  # versions 3 and 4: real Hugging Face folders
        folder = build_tiny_model(tmp_path / f"tiny-{seed}", seed=seed)
        client.create_model_version(registered.name, source=str(folder))
    client.set_registered_model_alias(registered.name, "champion", "3")
    client.set_registered_model_alias(registered.name, "challenger", "4")

    gw = build_canary_gateway(f"models:/{registered.name}@champion", f"models:/{registered.name}@challenger",
                              project_dir=tmp_path, device="cpu", max_batch_size=8)
    assert (gw.stable.version, gw.canary.version) == ("3", "4")
    with Server(gw) as srv, Load(srv.url, registered.name, threads=3) as load:
        rollout_client.start(registered.name, steps="50", pause="1.5s", min_requests=2,
                             analysis="success_rate>=0.95,p95_ms<=20000", gateway=srv.url)
        wait_for(lambda: rollout_client.command("status", gateway=srv.url)["rollout"]["status"] == "promoted", 30, "promotion")
        time.sleep(0.5)
    assert load.result.failed == [], load.result.failed[:3]
    assert load.result.versions["3"] > 0 and load.result.versions["4"] > 0
    assert registered.alias("champion") == "4" and registered.alias("previous") == "3"
