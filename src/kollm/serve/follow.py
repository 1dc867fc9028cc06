"""Alias following: `kollm serve models:/NAME@ALIAS` keeps serving whatever version the alias points to.

Public API:
    AliasFollower(gateway, name=, alias=, load=, project_dir=, interval=)   polls the registry; `await .run()`
    parse_alias_uri(uri) -> (name, alias) | None                              models:/NAME@ALIAS, else None

Every `interval` seconds the follower asks the registry which version the alias points to. When it moved
(a promotion, a rollback, a manual `kollm registry promote`), it loads that version beside the one serving
(`load(version)` builds an Arm; both models are in memory during the swap), waits until the new engine is warm,
then makes the gateway send new requests to it; requests already running finish on the old version, which is
shut down once they have (Gateway.replace_stable). No request fails because of a swap, and every response
names the version that answered in `x-kollm-model-version`.

A registry that cannot be reached, or a version that fails to load, is logged and the current version keeps
serving; a version that failed to load is not tried again until the alias moves to another one.

The canary arm of a gateway follows its alias the same way (`kollm serve models:/N@champion --canary
models:/N@challenger`): `AliasFollower(..., arm="canary", swap=controller.replace_canary, busy=...)` loads a newly
registered challenger as the canary (at 0 % until a rollout starts), never while a rollout is in progress.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kollm.errors import KollmError
from kollm.serve.gateway import Arm, ArmName, Gateway

log = logging.getLogger("kollm.serve")

_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")


def parse_alias_uri(uri: str) -> tuple[str, str] | None:
    m = _ALIAS_URI.match(uri)
    return (m.group("name"), m.group("alias")) if m else None


def arm_loader(
    name: str, project_dir: Path | None, engine_options: dict, app_options: dict, faults: Any = None
) -> Callable[[str], Awaitable[Arm]]:
    """`load(version)`: version `version` of registered model `name` as a gateway Arm, its engine warm before it
    returns (kollm.serve.load_engine with `engine_options`, create_app with `app_options`; wrapped in a
    FaultyEngine when `faults`, a FaultSpec, is given)."""

    async def load(version: str) -> Arm:
        from kollm.serve import resolve
        from kollm.serve.engine import load_engine
        from kollm.serve.router import create_app

        path = await asyncio.to_thread(resolve, f"models:/{name}/{version}", project_dir)
        engine = await asyncio.to_thread(load_engine, path, **engine_options)
        while not engine.ready():  # warm before it takes traffic
            if not engine.alive():
                raise KollmError(f"version {version} failed to start its engine")
            await asyncio.sleep(0.05)
        if faults is not None:
            from kollm.serve.faults import FaultyEngine

            engine = FaultyEngine(engine, faults)
        return Arm(
            create_app(engine, model_version=version, **app_options),
            version=version,
            model_name=app_options["model_name"],
        )

    return load


class AliasFollower:
    def __init__(
        self,
        gateway: Gateway,
        *,
        name: str,
        alias: str,
        load: Callable[[str], Awaitable[Arm]],
        project_dir: Path | None = None,
        interval: float = 10.0,
        arm: ArmName = "stable",
        swap: Callable[[Arm], Awaitable[None]] | None = None,
        busy: Callable[[], bool] = lambda: False,
    ):
        self.gateway = gateway
        self.name, self.alias = name, alias
        self.load = load
        self.project_dir = project_dir
        self.interval = interval
        self.arm = arm  # which arm of the gateway follows the alias
        self.swap = swap or gateway.replace_stable
        self.busy = busy  # True: do not swap now (a rollout is in progress); checked again at the next poll
        self.swaps: list[tuple[str, str]] = []  # (from version, to version), in order
        self._failed: str | None = None  # the last version that failed to load

    def current(self) -> str:
        """The version the alias points to now (raises KollmError when the registry cannot say)."""
        from kollm.registry import show

        return str(show(self.name, self.alias, project_dir=self.project_dir).version)

    def serving(self) -> str | None:
        arm = self.gateway.stable if self.arm == "stable" else self.gateway.canary
        return None if arm is None else arm.version

    async def check(self) -> None:
        """One poll: swap to the alias's version if it moved."""
        serving = self.serving()
        try:
            version = await asyncio.to_thread(self.current)
        except KollmError as e:
            log.warning(
                "alias %s@%s: cannot read the registry (%s); still serving version %s",
                self.name,
                self.alias,
                e.message,
                serving,
            )
            return
        if (
            version in (serving, self._failed)
            or (self.arm == "canary" and version == self.gateway.stable.version)
            or self.busy()
        ):
            return
        log.info(
            "alias %s@%s moved from version %s to %s: loading it as the %s arm",
            self.name,
            self.alias,
            serving,
            version,
            self.arm,
        )
        try:
            arm = await self.load(version)
        except Exception as e:  # a broken upload, out of memory: keep serving what works
            self._failed = version
            log.error(
                "alias %s@%s: version %s failed to load (%s); still serving version %s",
                self.name,
                self.alias,
                version,
                e,
                serving,
            )
            return
        try:
            await self.swap(arm)
        except KollmError as e:  # a rollout started while the version loaded: try again at the next poll
            log.warning("alias %s@%s: version %s not swapped in (%s)", self.name, self.alias, version, e.message)
            return
        self._failed = None
        self.swaps.append((serving or "-", version))
        log.info(
            "alias %s@%s: now serving version %s on the %s arm (version %s drains and stops)",
            self.name,
            self.alias,
            version,
            self.arm,
            serving,
        )

    def attach(self) -> AliasFollower:
        """Poll while the gateway runs: started with its lifespan, cancelled at its shutdown."""
        tasks: list[asyncio.Task] = []

        async def start() -> None:
            tasks.append(asyncio.get_running_loop().create_task(self.run()))

        async def stop() -> None:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.gateway.on_startup.append(start)
        self.gateway.on_shutdown.append(stop)
        return self

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check()
