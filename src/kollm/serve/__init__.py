"""OpenAI-compatible serving (`kollm serve MODEL_URI`).

Public API:
    serve(model_uri, *, host, port, api_key, project_dir, ...)   resolve, load, and run the server until SIGINT/SIGTERM
    describe_model_uri(model_uri, project_dir) -> (name, version) the served model name and version for a URI
    resolve(model_uri, project_dir) -> Path                        the local model folder (registry URIs via kollm.registry)
    create_app(engine, *, model_name, model_version, api_key, log_dir, shutdown_engine) -> FastAPI   (kollm.serve.router)
    load_engine(model_path, *, backend, device, dtype, max_batch_size, context_length, engine_args) -> Engine    (kollm.serve.engine)

Layout (as vLLM's): protocol.py (OpenAI pydantic models), router.py (HTTP only), engine.py (Engine protocol,
continuous-batching transformers backend), vllm_engine.py (vLLM's AsyncLLM behind the protocol), metrics.py (Prometheus), gateway.py (canary routing).

A Ray Serve deployment wraps the same app: `serve.ingress(create_app(load_engine(path), model_name=...))`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from kollm.serve.engine import Backend, Engine

API_KEY_ENV = "KOLLM_API_KEY"


def create_app(engine: Engine, **kwargs) -> FastAPI:
    """See kollm.serve.router.create_app."""
    from kollm.serve.router import create_app as _create_app

    return _create_app(engine, **kwargs)


def load_engine(model_path: Path, **kwargs) -> Engine:
    """See kollm.serve.engine.load_engine."""
    from kollm.serve.engine import load_engine as _load_engine

    return _load_engine(model_path, **kwargs)


def _local_folder(model_uri: str, project_dir: Path | None) -> Path | None:
    if model_uri.startswith(("models:/", "runs:/")):
        return None
    path = Path(model_uri.removeprefix("file://")).expanduser()
    if not path.is_absolute() and project_dir is not None:
        path = Path(project_dir) / path
    return path.resolve() if (path / "config.json").is_file() else None


def describe_model_uri(model_uri: str, project_dir: Path | None = None) -> tuple[str, str]:
    """The name clients send as `model` and the version reported in `x-kollm-model-version` and metrics.

    models:/NAME@ALIAS -> (NAME, the version the alias points to now); models:/NAME/3 -> (NAME, "3");
    runs:/RUN_ID/PATH -> (last part of PATH, "run-<RUN_ID[:8]>"); a local folder -> (folder name, "local").
    """
    if model_uri.startswith("models:/"):
        from kollm.registry import show

        rest = model_uri.removeprefix("models:/").rstrip("/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return name, show(name, alias, project_dir=project_dir).version
        name, _, version = rest.partition("/")
        return name, version
    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri.removeprefix("runs:/").partition("/")
        return (path.rstrip("/").rsplit("/", 1)[-1] or run_id), f"run-{run_id[:8]}"
    return Path(model_uri.removeprefix("file://").rstrip("/")).name or "model", "local"


def resolve(model_uri: str, project_dir: Path | None = None) -> Path:
    """The local model folder for a URI (registry URIs go through kollm.registry.resolve_model_uri)."""
    local = _local_folder(model_uri, project_dir)
    if local is not None:
        return local
    from kollm.registry import resolve_model_uri

    return resolve_model_uri(model_uri, project_dir)


def serve(
    model_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    project_dir: Path | None = None,
    served_model_name: str | None = None,
    backend: Backend = "auto",
    device: str = "auto",
    dtype: str = "auto",
    max_batch_size: int = 32,
    context_length: int | None = None,
    graceful_timeout: float = 30.0,
    log_level: str = "info",
    engine_args: dict | None = None,
) -> None:
    """Serve `model_uri` on host:port until SIGINT/SIGTERM, then finish in-flight requests (up to graceful_timeout s).

    The API key defaults to $KOLLM_API_KEY (none: no auth). Logs go to <project_dir or cwd>/.kollm/logs/{api,inference}/.
    """
    import uvicorn

    from kollm.serve.engine import load_engine as _load_engine
    from kollm.serve.router import create_app as _create_app

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name, version = describe_model_uri(model_uri, project_dir)
    path = resolve(model_uri, project_dir)
    engine = _load_engine(
        path, backend=backend, device=device, dtype=dtype, max_batch_size=max_batch_size, context_length=context_length, engine_args=engine_args
    )
    root = Path(project_dir) if project_dir is not None else Path.cwd()
    app = _create_app(
        engine,
        model_name=served_model_name or name,
        model_version=version,
        api_key=api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None,
        log_dir=root / ".kollm" / "logs",
    )
    logging.getLogger("kollm.serve").info("serving %s (version %s) from %s on http://%s:%d/v1", served_model_name or name, version, path, host, port)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=graceful_timeout, lifespan="on"
    )
    uvicorn.Server(config).run()
