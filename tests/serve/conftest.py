"""Fixtures: a tiny model folder built here, and real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.tiny import save_tiny


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two cores shared by many processes: one intra-op thread avoids oversubscription (6x faster here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    # large random weights: varied, context-dependent greedy outputs (0.02 repeats one token)
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", init_range=0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"kollm serve exited with {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}"
            )
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("kollm serve did not become ready")


@dataclass
class LiveServer:
    url: str
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(app) -> LiveServer:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", server, thread)


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """kollm serving the tiny model as `tiny`, version 7, with logs in a temp folder."""
    from kollm.serve import create_app, load_engine

    logs = tmp_path_factory.mktemp("logs")
    engine = load_engine(tiny_model_dir, device="cpu", max_batch_size=32)
    live = start_server(create_app(engine, model_name="tiny", model_version="7", log_dir=logs))
    live.log_dir = logs
    deadline = time.time() + 20
    while not engine.ready() and time.time() < deadline:
        time.sleep(0.02)
    yield live
    live.stop()
