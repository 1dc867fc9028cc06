"""OpenAI-compatible serving (`kollm serve MODEL_URI`).

Public API:
    serve(model_uri, *, host, port, api_key, project_dir, ...)   bind the port, resolve, load, and run the server until
                                                                  SIGINT/SIGTERM (following a models:/NAME@ALIAS URI)
    ServeError                                                    could not start serving (exit code 5)
    bind_socket(host, port) -> socket                             the listening socket, or a ServeError
    describe_model_uri(model_uri, project_dir) -> (name, version) the served model name and version for a URI
    resolve(model_uri, project_dir) -> Path                        the local model folder (registry URIs via kollm.registry)
    create_app(engine, *, model_name, model_version, api_key, log_dir, shutdown_engine) -> FastAPI   (kollm.serve.router)
    load_engine(model_path, *, backend, device, dtype, max_batch_size, context_length, engine_args) -> Engine    (kollm.serve.engine)

Layout (as vLLM's): protocol.py (OpenAI pydantic models), router.py (HTTP only), engine.py (Engine protocol,
continuous-batching transformers backend), vllm_engine.py (vLLM's AsyncLLM behind the protocol), metrics.py
(Prometheus), gateway.py (canary routing, stable-arm replacement), follow.py (alias following), logs.py (rotated JSON logs).

A Ray Serve deployment wraps the same app: `serve.ingress(create_app(load_engine(path), model_name=...))`.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kollm.errors import ConfigError, KollmError

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
    return path.resolve() if (path / "config.json").is_file() or (path / "adapter_config.json").is_file() else None


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


class ServeError(KollmError):
    """`kollm serve` could not start serving (the port is in use, the address is not available). Exit code 5."""

    exit_code = 5


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket for host:port, bound before the model is loaded so that a busy port fails at once."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ServeError(
            f"--host {host}: not an address of this machine ({e.strerror})",
            hint="use 127.0.0.1, 0.0.0.0 or this machine's name",
        ) from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait for TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ServeError(
                f"port {port} on {host} is already in use",
                hint="stop the other server (`ss -ltnp` shows it) or pass --port N",
            ) from None
        raise ServeError(
            f"cannot listen on {host}:{port}: {e.strerror}", hint="pass another --host or --port"
        ) from None
    return sock


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
    follow_interval: float = 10.0,
    max_body_bytes: int | None = None,
    log_level: str = "info",
    inject_faults: str | None = None,
    engine_args: dict | None = None,
    embedding_model: str | None = None,
    kv_cache: str = "auto",
    allowed_hosts: list[str] | None = None,
    adapters: dict[str, str] | None = None,
    max_adapters: int = 8,
    adapters_from_lineage: bool = False,
    prefix_cache: bool = True,
    speculative: str | None = None,
    draft_model: Path | None = None,
) -> None:
    """Serve `model_uri` on host:port until SIGINT/SIGTERM, then finish in-flight requests (up to graceful_timeout s).

    The port is bound first, so a busy port is a ServeError (exit code 5) before any model is loaded. The API key
    defaults to $KOLLM_API_KEY (none: no auth). Logs go to <project_dir or cwd>/.kollm/logs/{api,inference}/.
    A `models:/NAME@ALIAS` URI is followed: the registry is polled every `follow_interval` seconds (0: never) and
    a new version the alias points to replaces the served one without failing a request (kollm.serve.follow).
    `inject_faults` ("error_rate=0.3,latency_ms=200") is a testing aid: see kollm.serve.faults. `embedding_model`
    logs each prompt's embedding for drift checks (kollm.monitor.embeddings). A request whose Host is not the bound
    address, a loopback name or one of `allowed_hosts` gets 421 (kollm.hostcheck). `adapters` ({model name: URI}
    of LoRA adapters of this base) are served beside it, each under its own model name (kollm.serve.multi_lora);
    `adapters_from_lineage` adds every registered adapter whose recorded base digest is this base's, under its
    registered model name (kollm.adapter.registered_adapters_of; an explicit `adapters` name wins).
    """
    import uvicorn

    from kollm.hostcheck import HostCheck
    from kollm.hostcheck import allowed_hosts as hosts_for
    from kollm.serve.engine import load_engine as _load_engine
    from kollm.serve.follow import parse_alias_uri
    from kollm.serve.router import MAX_BODY_BYTES
    from kollm.serve.router import create_app as _create_app

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    log = logging.getLogger("kollm.serve")
    faults = None
    if inject_faults:
        from kollm.serve.faults import FaultyEngine, parse_faults

        faults = parse_faults(inject_faults)
    if follow_interval < 0:
        raise ConfigError(f"--follow-interval {follow_interval}: give seconds >= 0 (0: do not follow the alias)")
    sock = bind_socket(host, port)
    try:
        name, version = describe_model_uri(model_uri, project_dir)
        path = resolve(model_uri, project_dir)
        served = served_model_name or name
        root = Path(project_dir) if project_dir is not None else Path.cwd()
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        # keyword arguments of load_engine and create_app, kept for the versions an alias follower loads later
        engine_options: dict[str, Any] = dict(
            backend=backend,
            device=device,
            dtype=dtype,
            max_batch_size=max_batch_size,
            context_length=context_length,
            engine_args=engine_args,
            kv_cache=kv_cache,
            prefix_cache=prefix_cache,
            speculative=speculative,
            draft_model=draft_model,
        )
        if adapters_from_lineage:
            adapters = _lineage_adapters(path, served, project_dir) | dict(adapters or {})
            log.info("adapters of this base by lineage: %s", ", ".join(adapters))
        if adapters:
            if served in adapters:
                raise ConfigError(
                    f"--adapters {served}: the base is served under that name; name the adapter otherwise"
                )
            engine_options.update(
                adapters={n: resolve(uri, project_dir) for n, uri in adapters.items()}, max_adapters=max_adapters
            )
        app_options: dict[str, Any] = dict(
            model_name=served,
            adapters=tuple(adapters or ()),
            api_key=key,
            log_dir=root / ".kollm" / "logs",
            max_body_bytes=max_body_bytes or MAX_BODY_BYTES,
        )
        if embedding_model:
            from kollm.monitor.embeddings import Embedder

            app_options["embedder"] = Embedder(embedding_model)
        engine = _load_engine(path, **engine_options)
        if faults is not None:
            engine = FaultyEngine(engine, faults)
        app = _create_app(engine, model_version=version, **app_options)
        alias = parse_alias_uri(model_uri)
        if alias is not None and follow_interval > 0:
            app = _following(app, version, alias, project_dir, follow_interval, engine_options, app_options, faults)
        where = f"http://{host}:{sock.getsockname()[1]}/v1"
        following = (
            f", following {alias[0]}@{alias[1]} every {follow_interval:g}s"
            if alias is not None and follow_interval > 0
            else ""
        )
        log.info("serving %s (version %s) from %s on %s%s", served, version, path, where, following)
        config = uvicorn.Config(
            HostCheck(app, hosts_for(host, allowed_hosts or ())),
            host=host,
            port=port,
            log_level=log_level,
            access_log=False,
            # uvicorn annotates int but only hands the value to asyncio.wait_for, which takes float seconds
            timeout_graceful_shutdown=graceful_timeout,  # type: ignore[arg-type]
            lifespan="on",
        )
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise ServeError("the server failed to start; see the log above")


def _lineage_adapters(base: Path, served: str, project_dir: Path | None) -> dict[str, str]:
    """{registered name: models:/NAME/VERSION} of the registered adapters trained on `base` (none: a ConfigError)."""
    from kollm.adapter import folder_digest_cached, is_adapter, registered_adapters_of

    if is_adapter(base):
        raise ConfigError(
            f"--adapters-from-lineage: {base} is itself a LoRA adapter; serve the adapters on their base model"
        )
    digest = folder_digest_cached(base, project_dir)
    found = {n: uri for n, uri in registered_adapters_of(digest, project_dir).items() if n != served}
    if not found:
        raise ConfigError(
            f"--adapters-from-lineage: no registered LoRA adapter was trained on this base ({digest})",
            hint="register an adapter (a LoRA step's output) or pass --adapters NAME=URI",
        )
    return found


def _following(
    app,
    version: str,
    alias: tuple[str, str],
    project_dir: Path | None,
    interval: float,
    engine_options: dict,
    app_options: dict,
    faults=None,
):
    """A gateway serving `app` that swaps in the version `alias` points to whenever it moves."""
    from kollm.serve.follow import AliasFollower, arm_loader
    from kollm.serve.gateway import Arm, Gateway

    name, alias_name = alias
    load = arm_loader(name, project_dir, engine_options, app_options, faults)
    gateway = Gateway(Arm(app, version=version, model_name=app_options["model_name"]))
    AliasFollower(gateway, name=name, alias=alias_name, load=load, project_dir=project_dir, interval=interval).attach()
    return gateway
