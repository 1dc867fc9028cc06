"""Request-size limit, tokenizing off the event loop, clipped and rotated logs (HTTP layer over a scripted engine)."""

from __future__ import annotations

import json
import threading

from starlette.testclient import TestClient

from kollm.jsonlog import JsonLog, clip
from kollm.serve.router import create_app

from .fake_engine import FakeEngine


class ThreadRecordingEngine(FakeEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encode_threads: list[str] = []

    def encode_prompt(self, text: str) -> list[int]:
        self.encode_threads.append(threading.current_thread().name)
        return super().encode_prompt(text)


def make(engine=None, **kwargs):
    engine = engine or FakeEngine("응답", context_length=1_000_000)
    return TestClient(
        create_app(engine, model_name="m", model_version="1", **kwargs), raise_server_exceptions=False
    ), engine


def test_a_body_over_the_limit_is_a_413_naming_the_limit():
    client, engine = make(max_body_bytes=10_000)
    ok = {"model": "m", "prompt": "가" * 1000, "max_tokens": 2}
    assert client.post("/v1/completions", json=ok).status_code == 200
    big = {"model": "m", "prompt": "가" * 5000, "max_tokens": 2}
    r = client.post("/v1/completions", json=big)
    assert r.status_code == 413 and "10000 bytes" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "request_too_large" and r.headers["x-kollm-model-version"] == "1"

    def chunks():  # no content-length: the limit is counted as the body arrives
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "10000 bytes" in r.json()["error"]["message"]
    assert len(engine.calls) == 1  # neither big request reached the engine
    assert client.post("/v1/completions", json=ok).status_code == 200


def test_the_default_limit_is_4_mib():
    client, _ = make()
    r = client.post(
        "/v1/completions", content=b"x" * (4 * 1024 * 1024 + 1), headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "4194304 bytes (4 MiB)" in r.json()["error"]["message"]


def test_prompts_are_tokenized_off_the_event_loop():
    engine = ThreadRecordingEngine("응답", context_length=10_000)
    client, _ = make(engine)
    loop_thread = []

    @client.app.get("/loop-thread")
    async def where() -> dict:
        loop_thread.append(threading.current_thread().name)
        return {}

    client.get("/loop-thread")
    assert (
        client.post("/v1/completions", json={"model": "m", "prompt": ["안녕", "서울"], "max_tokens": 2}).status_code
        == 200
    )
    assert len(engine.encode_threads) == 2 and loop_thread[0] not in engine.encode_threads


def test_logged_user_is_clipped(tmp_path):
    client, _ = make(log_dir=tmp_path)
    user = "u" * 100_000
    assert (
        client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2, "user": user}).status_code
        == 200
    )
    assert client.get("/v1/" + "p" * 5000).status_code == 404
    line = json.loads((tmp_path / "inference" / "inference.jsonl").read_text().splitlines()[-1])
    assert line["user"] == "u" * 192 + "...[100000 chars]..." + "u" * 64
    api = [json.loads(x) for x in (tmp_path / "api" / "api.jsonl").read_text().splitlines()]
    assert max(len(e["path"]) for e in api) < 300
    assert (tmp_path / "inference" / "inference.jsonl").stat().st_size < 1000


def test_json_logs_rotate(tmp_path):
    path = tmp_path / "api.jsonl"
    log = JsonLog(path, "serve", max_bytes=1000, backups=2)
    for i in range(100):
        log.log("http_request", i=i, pad="x" * 50)
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["api.jsonl", "api.jsonl.1", "api.jsonl.2"]
    assert all(p.stat().st_size < 1200 for p in tmp_path.iterdir())  # rotated once past 1000 bytes (a line is ~150)
    newest = [json.loads(x)["i"] for x in path.read_text().splitlines()]
    older = [json.loads(x)["i"] for x in (tmp_path / "api.jsonl.1").read_text().splitlines()]
    assert newest[-1] == 99 and older[-1] == newest[0] - 1  # nothing lost between the current file and the last backup


def test_clip():
    assert clip("abc", 5) == "abc" and clip(None) is None and clip(3) == 3
    assert clip("가" * 10, 4) == "가가가...[10 chars]...가" and clip("가" * 10, 3) == "가가가...[10 chars]"


class CountingTokenizer:
    """The tiny model's real tokenizer, recording the length of every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self._tok, self.lengths = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.lengths.append(len(text))
        return self._tok(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_a_prompt_too_long_by_its_characters_is_refused_without_tokenizing_it(tiny_model_dir):
    """A prompt just under the 4 MiB body limit cost ~1 GB and 5 s of tokenizing before its 400: now its character
    count alone refuses it, and the tokenizer never sees it (completions and chat alike)."""
    from kollm.serve.engine import load_engine, max_chars_per_token

    engine = load_engine(tiny_model_dir, device="cpu", max_batch_size=2)
    counting = CountingTokenizer(engine.tokenizer)
    engine.tokenizer = counting
    bound = engine.context_length * max_chars_per_token(counting)
    huge = "가" * (3 * 1024 * 1024 // 3)  # 3 MiB of UTF-8
    assert len(huge) > bound
    with TestClient(create_app(engine, model_name="tiny")) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": huge, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert "characters" in r.json()["error"]["message"] and r.json()["error"]["param"] == "prompt"
        if engine.tokenizer.chat_template:
            msgs = [{"role": "user", "content": huge}]
            r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 1})
            assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert all(n < bound for n in counting.lengths), counting.lengths
        # a prompt within the bound is tokenized as before and still gets the exact token count
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "가 " * 600, "max_tokens": 1})
        assert r.status_code in (200, 400) and 1200 in counting.lengths, r.text


def test_a_client_that_leaves_stops_its_non_streamed_sequences(tmp_path):
    """n=16 and a long max_tokens, not streamed: when the client leaves, its 16 sequences stop decoding (they kept
    running to the end before, and later requests waited behind them)."""
    import socket
    import time

    from kollm.serve.engine import load_engine

    from tests.serve.conftest import start_server
    from tests.tiny import save_tiny

    folder = save_tiny(tmp_path / "long", context=8192, init_range=0.5)
    engine = load_engine(folder, device="cpu", max_batch_size=16)
    live = start_server(create_app(engine, model_name="tiny"))
    try:
        eos = engine.tokenizer.eos_token_id
        body = json.dumps(
            {"model": "tiny", "prompt": "안녕", "n": 16, "max_tokens": 8000, "logit_bias": {str(eos): -100}}
        ).encode()
        port = int(live.url.rsplit(":", 1)[1])
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        deadline = time.monotonic() + 60
        while engine.running() < 16:
            assert time.monotonic() < deadline, "the 16 sequences did not start"
            time.sleep(0.02)
        sock.close()  # the client leaves; 16 x 8000 tokens would take minutes here
        deadline = time.monotonic() + 30
        while engine.running() > 0:
            assert time.monotonic() < deadline, f"{engine.running()} sequences still decode after the client left"
            time.sleep(0.02)
    finally:
        live.stop()
