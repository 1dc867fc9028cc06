"""`kollm ui`: a web dashboard over one project's runs, registry, lineage and live rollout.

    serve_ui(project_dir, host="127.0.0.1", port=8080, api_key=None, gateway=None)   # blocks; Ctrl-C stops it
    create_app(project_dir, api_key=None, gateway=None) -> FastAPI                  # kollm.ui.app

Without an API key the UI is read-only and binds to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from kollm.errors import ConfigError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_bind(host: str, api_key: str | None) -> None:
    """A read-only UI (no key) listens on loopback only: anyone who can reach it could read every run."""
    if api_key is None and host not in LOOPBACK:
        raise ConfigError(
            f"--host {host}: without an API key the UI is read-only and listens on 127.0.0.1 only; "
            "pass --api-key KEY (or set KOLLM_API_KEY) to serve it on other addresses"
        )


def serve_ui(
    project_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    gateway: str | None = None,
) -> None:
    import uvicorn

    from kollm.serve import API_KEY_ENV
    from kollm.ui.app import create_app

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(host, api_key)
    app = create_app(project_dir, api_key=api_key, gateway=gateway, host=host)
    ready = f"kollm ui for {project_dir} on http://{host}:{port}  ({'actions need the API key' if api_key else 'read-only'})"

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            # ready once it listens and the store is open (MLflow's import and set-up: seconds, done meanwhile)
            await asyncio.to_thread(app.state.warm.join, 120)
            print(ready, flush=True)

    Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
