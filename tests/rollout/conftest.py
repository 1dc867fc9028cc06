"""Real pieces for rollout tests: uvicorn on 127.0.0.1, MLflow on SQLite, a webhook receiver, an openai load."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest
import uvicorn

from kollm.pipeline.tracking import client_for
from kollm.serve import create_app
from tests.serve.fake_engine import versioned


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real uvicorn server in a thread."""

    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.time() + 15
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    uri = f"sqlite:///{db}"
    client_for(uri).search_registered_models()  # create the tables once
    return uri


@dataclass
class Registered:
    name: str
    tracking_uri: str

    def alias(self, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(client_for(self.tracking_uri).get_model_version_by_alias(self.name, alias).version)
        except MlflowException:
            return None

    def tags(self, version: str) -> dict[str, str]:
        return dict(client_for(self.tracking_uri).get_model_version(self.name, version).tags)


@pytest.fixture
def registered(tracking_uri, tmp_path) -> Registered:
    """A registered model with version 1 = champion and version 2 = challenger (real MLflow on SQLite); the
    project folder tmp_path (its kollm.yaml) uses that tracking URI."""
    (tmp_path / "kollm.yaml").write_text(
        f"project: kodemo\ntracking:\n  uri: {tracking_uri}\nsteps:\n  - kind: python\n", encoding="utf-8"
    )
    name = f"kodemo-{uuid.uuid4().hex[:8]}"
    client = client_for(tracking_uri)
    client.create_registered_model(name)
    for v in ("1", "2"):
        src = tmp_path / f"model-v{v}"
        src.mkdir()
        client.create_model_version(name, source=str(src))
    client.set_registered_model_alias(name, "champion", "1")
    client.set_registered_model_alias(name, "challenger", "2")
    return Registered(name, tracking_uri)


class WebhookReceiver:
    """A tiny HTTP server on 127.0.0.1 that records the JSON bodies posted to it."""

    def __init__(self):
        self.received: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("content-length", 0))
                outer.received.append(json.loads(self.rfile.read(n)))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks/kollm"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def webhook():
    with WebhookReceiver() as w:
        yield w


@dataclass
class LoadResult:
    failed: list[str] = field(default_factory=list)
    served: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time the request was sent, version)
    canary_errors: int = 0  # failures answered by the canary arm itself (its own behaviour, not a swap)

    @property
    def ok(self) -> int:
        return len(self.served)

    def versions(self, sent_after: float = float("-inf")) -> Counter:
        """How many successful requests each version answered, of those sent after `sent_after` (monotonic)."""
        return Counter(version for sent, version in self.served if sent > sent_after)


class Load:
    """Concurrent chat requests through the real openai client, each with a `user`, until stopped."""

    def __init__(self, base_url: str, model: str, *, threads: int = 4, api_key: str = "unused", users: int = 50):
        self.base_url, self.model, self.threads, self.api_key, self.users = base_url, model, threads, api_key, users
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(threads)]

    def _work(self, i: int) -> None:
        client = openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key, max_retries=0, timeout=30)
        n = 0
        while not self._stop.is_set():
            user = f"user-{(i * 1000 + n) % self.users}"
            n += 1
            sent = time.monotonic()
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=self.model, messages=[{"role": "user", "content": "안녕하세요"}], max_tokens=4, user=user
                )
                raw.parse()
                with self._lock:
                    self.result.served.append((sent, raw.headers["x-kollm-model-version"]))
            except openai.APIStatusError as e:
                with self._lock:
                    if e.response.headers.get("x-kollm-arm") == "canary":
                        self.result.canary_errors += 1
                    else:
                        self.result.failed.append(
                            f"{e.status_code} {e.response.headers.get('x-kollm-arm')}: {e.message}"
                        )
            except Exception as e:  # connection errors, timeouts: a request failed
                with self._lock:
                    self.result.failed.append(f"{type(e).__name__}: {e}")

    def __enter__(self) -> "Load":
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(timeout=60)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def state_file(project: Path, name: str) -> Path:
    return project / ".kollm" / "rollouts" / f"{name}.json"


def serving_app(version: str, *, name: str, fail_ratio: float = 0.0, delay_s: float = 0.0, api_key: str | None = None):
    """The real kollm serving app (kollm.serve.create_app) around the tests' FakeEngine answering "v<version> 답변"."""
    engine = versioned(version, fail_ratio=fail_ratio, request_delay=delay_s)
    return create_app(engine, model_name=name, model_version=version, api_key=api_key)
