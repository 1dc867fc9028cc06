"""A model served on a free loopback port for the duration of a `with` block (an evaluation's LLM judge).

    with local_server("models:/judge@champion", project_dir=root, device="cpu") as (base_url, model_name):
        httpx.post(f"{base_url}/chat/completions", json={"model": model_name, ...})

The same server as `kollm serve` (kollm.serve.create_app over load_engine) in a thread of this process, bound to
127.0.0.1 on a port the OS picks, with no API key and no request logs; it is stopped, and the engine shut down,
when the block ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kollm.serve import ServeError, bind_socket, describe_model_uri, resolve


@contextmanager
def local_server(
    model_uri: str, *, project_dir: Path | None = None, ready_timeout: float = 600.0, **engine_options: Any
) -> Iterator[tuple[str, str]]:
    """Yields (base_url ending in /v1, the served model name). `engine_options` go to load_engine."""
    import uvicorn

    from kollm.serve.engine import load_engine
    from kollm.serve.router import create_app

    name, version = describe_model_uri(model_uri, project_dir)
    sock = bind_socket("127.0.0.1", 0)
    try:
        engine = load_engine(resolve(model_uri, project_dir), **engine_options)
        app = create_app(engine, model_name=name, model_version=version)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="kollm-local-server", daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + ready_timeout
            while not (server.started and engine.ready()):
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise ServeError(f"serving {model_uri} on 127.0.0.1 did not start")
                time.sleep(0.05)
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", name
        finally:
            server.should_exit = True
            thread.join(timeout=60)
    finally:
        sock.close()
