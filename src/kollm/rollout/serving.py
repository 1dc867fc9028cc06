"""`kollm serve STABLE_URI --canary CANARY_URI`: one process serving the champion and the challenger behind the
canary gateway, with the rollout controller and its admin endpoints.

    kollm serve models:/NAME@champion --canary models:/NAME@challenger
    kollm rollout start NAME            # in another shell: 20 -> 40 -> 60 -> 80 % -> promote, or roll back

Both models are served under the same `model` name (the stable one's), so clients need not know about the
canary; `x-kollm-model-version` on each response says which version answered.

When both versions are LoRA adapters of one base (same content digest), one engine holds the base once with both
adapters (kollm.serve.multi_lora); each arm is an app over that engine whose requests run with its version's
adapter, so a canary and its batch-mates share decode steps. A challenger registered later under a followed alias
joins the same engine when it is an adapter of that base too (native engine).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from kollm.errors import ConfigError, NotFound
from kollm.rollout.api import attach_rollout
from kollm.serve.gateway import Arm, Gateway

if TYPE_CHECKING:
    from kollm.serve.faults import FaultSpec

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
    follow_interval: float = 10.0,
    canary_faults: FaultSpec | None = None,
    **engine_options,
) -> Gateway:
    """Load both models (kollm.serve.load_engine), wrap each in kollm.serve.create_app, and put them behind a
    Gateway with a rollout controller. `engine_options` go to load_engine (backend, device, dtype, ...).

    A canary alias URI (models:/NAME@challenger) is followed every `follow_interval` seconds (0: never): a version
    registered under it later is loaded as the next canary between rollouts, so `kollm watch --gateway` can roll out
    what it retrained on this running gateway. Followed, the alias may also be missing or name the stable version
    at start: the gateway then serves the stable arm alone until a challenger is registered. `canary_faults` (a
    testing aid, kollm.serve.faults) wraps every canary's engine."""
    from kollm.serve import create_app, describe_model_uri, load_engine, resolve
    from kollm.serve.faults import FaultyEngine
    from kollm.serve.follow import AliasFollower, arm_loader, parse_alias_uri

    name = _registry_name(canary_uri, "--canary")
    stable_name = _registry_name(stable_uri, "MODEL_URI")
    if stable_name != name:
        raise ConfigError(
            f"--canary {canary_uri!r} is a version of {name!r} but the stable model is {stable_name!r}; "
            "a rollout promotes within one registered model"
        )
    if follow_interval < 0:
        raise ConfigError(f"--follow-interval {follow_interval}: give seconds >= 0 (0: do not follow the canary alias)")
    alias = parse_alias_uri(canary_uri)
    follow = alias is not None and follow_interval > 0
    _, stable_version = describe_model_uri(stable_uri, project_dir)
    try:
        _, canary_version = describe_model_uri(canary_uri, project_dir)
    except NotFound:
        if not follow:
            raise
        canary_version = None  # no challenger registered yet
    if stable_version == canary_version and not follow:
        raise ConfigError(
            f"{stable_uri} and {canary_uri} are both version {stable_version}; register a new version as challenger first"
        )
    root = Path(project_dir) if project_dir is not None else Path.cwd()
    served = served_model_name or name
    app_options: dict[str, Any] = dict(model_name=served, api_key=api_key, log_dir=root / ".kollm" / "logs")

    def arm(path: Path, version: str, faults: FaultSpec | None = None) -> Arm:
        engine = load_engine(path, **engine_options)
        if faults is not None:
            engine = FaultyEngine(engine, faults)
        return Arm(create_app(engine, model_version=version, **app_options), version=version, model_name=served)

    has_canary = canary_version is not None and canary_version != stable_version
    paths = {stable_version: resolve(stable_uri, project_dir)}
    if has_canary:
        assert canary_version is not None
        paths[canary_version] = resolve(canary_uri, project_dir)
    load = arm_loader(name, project_dir, engine_options, app_options, canary_faults)
    base = _shared_base(list(paths.values()), project_dir)
    shared: SharedBase | None = None
    if base is not None:
        shared = SharedBase(base, name, paths, project_dir, engine_options, app_options)
        stable = shared.arm(stable_version)
        canary = shared.arm(canary_version, canary_faults) if has_canary and canary_version else None
        load = shared.loader(load, canary_faults)
    else:
        canary = arm(paths[canary_version], canary_version, canary_faults) if has_canary and canary_version else None
        stable = arm(paths[stable_version], stable_version)
    gateway = Gateway(stable, canary)
    controller = attach_rollout(gateway, project_dir=project_dir, model_name=name, api_key=api_key)
    if follow:
        assert alias is not None
        AliasFollower(
            gateway,
            name=name,
            alias=alias[1],
            load=load,
            project_dir=project_dir,
            interval=follow_interval,
            arm="canary",
            swap=controller.replace_canary,
            busy=lambda: controller.state is not None and controller.state.active,
        ).attach()
    if shared is not None:  # the arms' apps leave the shared engine running; it stops with the gateway
        gateway.on_shutdown.append(shared.engine.shutdown)
    return gateway


def _shared_base(paths: list[Path], project_dir: Path | None) -> Path | None:
    """The base folder when every path is a LoRA adapter and all were trained on one base (by content digest);
    None otherwise (the versions are then served as models of their own)."""
    from kollm.adapter import find_base, folder_digest_cached, is_adapter

    if not all(is_adapter(p) for p in paths):
        return None
    bases = [find_base(p, project_dir) for p in paths]
    return bases[0] if len({folder_digest_cached(b, project_dir) for b in bases}) == 1 else None


class SharedBase:
    """One engine holding a base once and, per registered version of an adapter, that adapter (engine adapter name
    NAME/VERSION); `arm(version)` is a gateway arm whose requests for the model name run with that adapter."""

    def __init__(
        self,
        base: Path,
        name: str,
        adapters: dict[str, Path],  # version -> adapter folder
        project_dir: Path | None,
        engine_options: dict[str, Any],
        app_options: dict[str, Any],
    ):
        from kollm.adapter import folder_digest_cached
        from kollm.serve import load_engine

        self.base, self.name, self.project_dir = base, name, project_dir
        self.digest = folder_digest_cached(base, project_dir)
        self.app_options = app_options
        # two slots: the stable and the canary adapter; an older challenger is evicted least recently used
        self.engine = load_engine(
            base, adapters={self.key(v): f for v, f in adapters.items()}, max_adapters=2, **engine_options
        )
        log.info("one base %s for the adapters of %s versions %s", base, name, ", ".join(adapters))

    def key(self, version: str) -> str:
        return f"{self.name}/{version}"

    def arm(self, version: str, faults: FaultSpec | None = None) -> Arm:
        from kollm.serve import create_app
        from kollm.serve.faults import FaultyEngine

        engine = FaultyEngine(self.engine, faults) if faults is not None else self.engine
        app = create_app(
            engine, model_version=version, base_adapter=self.key(version), shutdown_engine=False, **self.app_options
        )
        return Arm(app, version=version, model_name=self.app_options["model_name"])

    def loader(
        self, fallback: Callable[[str], Awaitable[Arm]], faults: FaultSpec | None
    ) -> Callable[[str], Awaitable[Arm]]:
        """`load(version)` for the canary alias follower: an adapter of this base joins the shared engine (native
        engine); anything else loads as its own model (`fallback`)."""
        from kollm.adapter import find_base, folder_digest_cached, is_adapter
        from kollm.serve import resolve
        from kollm.serve.engine import TransformersEngine

        async def load(version: str) -> Arm:
            path = await asyncio.to_thread(resolve, f"models:/{self.name}/{version}", self.project_dir)
            if is_adapter(path) and isinstance(self.engine, TransformersEngine) and self.engine.adapters is not None:
                base = await asyncio.to_thread(find_base, path, self.project_dir)
                if await asyncio.to_thread(folder_digest_cached, base, self.project_dir) == self.digest:
                    if self.key(version) not in self.engine.adapters.adapters:
                        self.engine.adapters.add(self.key(version), path)
                    return self.arm(version, faults)
            return await fallback(version)

        return load


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
    follow_interval: float = 10.0,
    inject_faults: str | None = None,
    allowed_hosts: list[str] | None = None,
    **engine_options,
) -> None:
    """Serve the gateway on host:port until SIGINT/SIGTERM (in-flight requests finish first). `inject_faults`
    ("error_rate=0.5"; a testing aid) applies to the canary arm only. A request whose Host is not the bound
    address, a loopback name or one of `allowed_hosts` gets 421 (kollm.hostcheck), /admin/rollout/ included."""
    import uvicorn

    from kollm.hostcheck import HostCheck
    from kollm.hostcheck import allowed_hosts as hosts_for

    from kollm.serve import API_KEY_ENV

    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    faults = None
    if inject_faults:
        from kollm.serve.faults import parse_faults

        faults = parse_faults(inject_faults)
    gateway = build_canary_gateway(
        stable_uri,
        canary_uri,
        project_dir=project_dir,
        api_key=key,
        served_model_name=served_model_name,
        follow_interval=follow_interval,
        canary_faults=faults,
        **engine_options,
    )
    log.info(
        "gateway on http://%s:%d/v1: stable version %s, canary version %s at 0%% until `kollm rollout start %s`%s",
        host,
        port,
        gateway.stable.version,
        gateway.canary.version if gateway.canary else "- (none registered yet)",
        _registry_name(canary_uri, "--canary"),
        f"; following {canary_uri} every {follow_interval:g}s" if follow_interval > 0 else "",
    )
    config = uvicorn.Config(
        HostCheck(gateway, hosts_for(host, allowed_hosts or ())),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        # uvicorn annotates int but only hands the value to asyncio.wait_for, which takes float seconds
        timeout_graceful_shutdown=graceful_timeout,  # type: ignore[arg-type]
        lifespan="on",
    )
    uvicorn.Server(config).run()
