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
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from kollm.errors import KollmError
from kollm.serve.gateway import Arm, Gateway

log = logging.getLogger("kollm.serve")

_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")


def parse_alias_uri(uri: str) -> tuple[str, str] | None:
    m = _ALIAS_URI.match(uri)
    return (m.group("name"), m.group("alias")) if m else None


class AliasFollower:
    def __init__(self, gateway: Gateway, *, name: str, alias: str, load: Callable[[str], Awaitable[Arm]],
                 project_dir: Path | None = None, interval: float = 10.0):
        self.gateway = gateway
        self.name, self.alias = name, alias
        self.load = load
        self.project_dir = project_dir
        self.interval = interval
        self.swaps: list[tuple[str, str]] = []  # (from version, to version), in order
        self._failed: str | None = None  # the last version that failed to load

    def current(self) -> str:
        """The version the alias points to now (raises KollmError when the registry cannot say)."""
        from kollm.registry import show

        return str(show(self.name, self.alias, project_dir=self.project_dir).version)

    async def check(self) -> None:
        """One poll: swap to the alias's version if it moved."""
        try:
            version = await asyncio.to_thread(self.current)
        except KollmError as e:
            log.warning("alias %s@%s: cannot read the registry (%s); still serving version %s", self.name, self.alias, e.message, self.gateway.stable.version)
            return
        serving = self.gateway.stable.version
        if version == serving or version == self._failed:
            return
        log.info("alias %s@%s moved from version %s to %s: loading it", self.name, self.alias, serving, version)
        try:
            arm = await self.load(version)
        except Exception as e:  # a broken upload, out of memory: keep serving what works
            self._failed = version
            log.error("alias %s@%s: version %s failed to load (%s); still serving version %s", self.name, self.alias, version, e, serving)
            return
        await self.gateway.replace_stable(arm)
        self._failed = None
        self.swaps.append((serving, version))
        log.info("alias %s@%s: now serving version %s (version %s drains and stops)", self.name, self.alias, version, serving)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check()
