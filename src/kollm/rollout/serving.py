"""`kollm serve STABLE_URI --canary CANARY_URI`: one process serving the champion and the challenger behind the
canary gateway, with the rollout controller and its admin endpoints.

    kollm serve models:/NAME@champion --canary models:/NAME@challenger
    kollm rollout start NAME            # in another shell: 20 -> 40 -> 60 -> 80 % -> promote, or roll back

Both models are served under the same `model` name (the stable one's), so clients need not know about the
canary; `x-kollm-model-version` on each response says which version answered.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from kollm.errors import ConfigError
from kollm.rollout.api import attach_rollout
from kollm.serve.gateway import Arm, Gateway

log = logging.getLogger("kollm.rollout")


_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(@[^/@]+|/\d+)/?$")


def _registry_name(uri: str, what: str) -> str:
    m = _REGISTRY_URI.match(uri)
    if not m:
        raise ConfigError(
            f"{what} {uri!r}: a canary rollout moves registry aliases, so give a registry URI: "
            "models:/NAME@ALIAS or models:/NAME/VERSION (e.g. --canary models:/NAME@challenger)"
        )
    return m.group("name")


def build_canary_gateway(
    stable_uri: str,
    canary_uri: str,
    *,
    project_dir: Path | None = None,
    api_key: str | None = None,
    served_model_name: str | None = None,
    **engine_options,
) -> Gateway:
    """Load both models (kollm.serve.load_engine), wrap each in kollm.serve.create_app, and put them behind a
    Gateway with a rollout controller. `engine_options` go to load_engine (backend, device, dtype, ...)."""
    from kollm.serve import create_app, describe_model_uri, load_engine, resolve

    name = _registry_name(canary_uri, "--canary")
    stable_name = _registry_name(stable_uri, "MODEL_URI")
    if stable_name != name:
        raise ConfigError(
            f"--canary {canary_uri!r} is a version of {name!r} but the stable model is {stable_name!r}; "
            "a rollout promotes within one registered model"
        )
    _, stable_version = describe_model_uri(stable_uri, project_dir)
    _, canary_version = describe_model_uri(canary_uri, project_dir)
    if stable_version == canary_version:
        raise ConfigError(
            f"{stable_uri} and {canary_uri} are both version {stable_version}; register a new version as challenger first"
        )
    root = Path(project_dir) if project_dir is not None else Path.cwd()
    served = served_model_name or name
    arms = []
    for uri, version in ((stable_uri, stable_version), (canary_uri, canary_version)):
        engine = load_engine(resolve(uri, project_dir), **engine_options)
        app = create_app(engine, model_name=served, model_version=version, api_key=api_key, log_dir=root / ".kollm" / "logs")
        arms.append(Arm(app, version=version, model_name=served))
    gateway = Gateway(arms[0], arms[1])
    attach_rollout(gateway, project_dir=project_dir, model_name=name, api_key=api_key)
    return gateway


def serve_canary(
    stable_uri: str,
    canary_uri: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    project_dir: Path | None = None,
    served_model_name: str | None = None,
    graceful_timeout: float = 30.0,
    log_level: str = "info",
    **engine_options,
) -> None:
    """Serve the gateway on host:port until SIGINT/SIGTERM (in-flight requests finish first)."""
    import uvicorn

    from kollm.serve import API_KEY_ENV

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    gateway = build_canary_gateway(
        stable_uri, canary_uri, project_dir=project_dir, api_key=key, served_model_name=served_model_name, **engine_options
    )
    log.info(
        "gateway on http://%s:%d/v1: stable version %s, canary version %s at 0%% until `kollm rollout start %s`",
        host, port, gateway.stable.version, gateway.canary.version if gateway.canary else "-", _registry_name(canary_uri, "--canary"),
    )
    config = uvicorn.Config(
        gateway, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=graceful_timeout, lifespan="on"
    )
    uvicorn.Server(config).run()
