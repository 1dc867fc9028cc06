"""`kollm serve --canary` for real: two registered versions of a tiny transformers model behind the gateway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kollm.pipeline.tracking import client_for
from kollm.rollout import client as rollout_client
from kollm.rollout.serving import build_canary_gateway

from .conftest import Load, Server, free_port, wait_for

from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny")
    return [save_tiny(root / f"tiny-{seed}", seed=seed) for seed in (1, 2)]


def register_tiny(registered, folders: list[Path]) -> None:
    """Versions 3 (champion) and 4 (challenger): real Hugging Face folders."""
    client = client_for(registered.tracking_uri)
    for folder in folders:
        client.create_model_version(registered.name, source=str(folder))
    client.set_registered_model_alias(registered.name, "champion", "3")
    client.set_registered_model_alias(registered.name, "challenger", "4")


@pytest.mark.slow(reason="a gateway over two real model servers through a whole rollout")
def test_tiny_models_promoted_through_the_gateway(registered, tmp_path, tiny_folders):
    import torch

    torch.set_num_threads(1)
    register_tiny(registered, tiny_folders)

    gw = build_canary_gateway(
        f"models:/{registered.name}@champion",
        f"models:/{registered.name}@challenger",
        project_dir=tmp_path,
        device="cpu",
        max_batch_size=8,
    )
    assert (gw.stable.version, gw.canary.version) == ("3", "4")
    with Server(gw) as srv, Load(srv.url, registered.name, threads=3) as load:
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
            30,
            "promotion",
        )
        time.sleep(0.5)
    assert load.result.failed == [], load.result.failed[:3]
    versions = load.result.versions()
    assert versions["3"] > 0 and versions["4"] > 0
    assert registered.alias("champion") == "4" and registered.alias("previous") == "3"


def _serve(name: str, project: Path, port: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-c",
        "from kollm.cli import main; main()",
        "serve",
        f"models:/{name}@champion",
        "--canary",
        f"models:/{name}@challenger",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--project",
        str(project),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"kollm serve exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("kollm serve did not come up")


@pytest.mark.slow(reason="a `kollm serve --canary` process killed and restarted mid-rollout")
def test_killed_gateway_process_resumes_the_rollout(registered, tmp_path, tiny_folders):
    """`kollm serve --canary` as a real process, killed with SIGKILL mid-rollout, resumes at the same step."""
    register_tiny(registered, tiny_folders)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(registered.name, tmp_path, port)
    try:
        with Load(url, registered.name, threads=2):
            rollout_client.start(
                registered.name, pause="1.5s", min_requests=1, analysis="success_rate>=0.95,p95_ms<=30000", gateway=url
            )
            wait_for(lambda: rollout_client.command("status", gateway=url)["rollout"]["step"] == 2, 60, "step 2")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc = _serve(registered.name, tmp_path, port)
        st = rollout_client.command("status", gateway=url)
        assert st["rollout"]["status"] == "progressing" and st["rollout"]["step"] >= 2
        assert st["gateway"]["canary_weight"] == st["rollout"]["spec"]["steps"][st["rollout"]["step_index"]]
        assert "resumed after a gateway restart" in st["rollout"]["message"]
        done = rollout_client.command("abort", reason="test over", gateway=url)
        assert done["gateway"]["canary_weight"] == 0
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert registered.alias("champion") == "3"
