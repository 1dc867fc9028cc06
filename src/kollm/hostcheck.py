"""The Host allow-list of kollm's HTTP servers, against DNS rebinding: a web page on evil.example whose name is made
to resolve to 127.0.0.1 reaches a server on the user's machine with `Host: evil.example`, and its Origin then
matches that Host. A bottom module (it imports nothing from kollm), so every server can use it.

A server answers the Host names of the address it is bound to, the loopback names (127.0.0.1, localhost, [::1]),
and the names configured with `--allowed-host` or $KOLLM_ALLOWED_HOSTS (comma-separated; `*`: any). Bound to
every interface (0.0.0.0 or ::) it cannot know the names clients use (a load balancer's, a Kubernetes Service's),
so there the list is enforced only when names are configured. Any other Host gets 421 before an endpoint runs.
"""

from __future__ import annotations

import json
import os
from typing import Any, Awaitable, Callable, Iterable, MutableMapping

HOSTS_ENV = "KOLLM_ALLOWED_HOSTS"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD = frozenset({"0.0.0.0", "::", ""})

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


def host_name(value: str) -> str:
    """The name part of a Host header, lowercased: `[::1]:8000` -> `::1`, `Example.COM.:80` -> `example.com`."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        value = value.split(":")[0]
    return value.rstrip(".")


def allowed_hosts(bind: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names a server bound to `bind` answers; None: any (see the module's docstring)."""
    configured = [*extra, *os.environ.get(HOSTS_ENV, "").split(",")]
    names = {host_name(n) for n in configured if n.strip()}
    if "*" in names or (not names and host_name(bind) in WILDCARD):
        return None
    return frozenset(names | LOOPBACK | ({host_name(bind)} - WILDCARD))


class HostCheck:
    """ASGI middleware: a request (or websocket) whose Host is not in `allowed` gets 421 before `app` sees it."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str] | None):
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if self.allowed is None or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        if not host or host_name(host) in self.allowed:  # no Host: HTTP/1.0 from a script, never a browser
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps(
            {
                "error": {
                    "message": f"Host {host[:100]!r} is not served here (DNS rebinding protection)",
                    "type": "invalid_request_error",
                    "hint": f"use the address the server listens on, or start it with --allowed-host NAME (or ${HOSTS_ENV})",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 421,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
