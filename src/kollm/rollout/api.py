"""HTTP admin endpoints of the rollout controller, served by the gateway under /admin/rollout/.

  POST /admin/rollout/start    body: {"name": NAME, "steps": [...], "pause_s": ..., "analysis": "...", ...}
  GET  /admin/rollout/status
  POST /admin/rollout/pause | resume | abort | promote

With an API key set on the server, every call needs `Authorization: Bearer KEY`. Against cross-site request
forgery (a web page POSTing to a gateway on the user's machine or network, which needs no key when none is
set): every POST must say `Content-Type: application/json` (which a browser cannot send cross-site without a
CORS preflight, and none is ever granted), and a request whose `Origin` is not the gateway itself, or that a
browser marks `Sec-Fetch-Site: cross-site`, is refused with 403. Errors answer {"error": {"message": ...,
"hint": ...}} with 400 (bad settings), 401, 403, 404 (wrong model name), 409 (the command does not fit the
rollout's status) or 415 (not JSON).
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from kollm.errors import ConfigError, KollmError, NotFound
from kollm.rollout.clock import Clock
from kollm.rollout.controller import RegistryTarget, RolloutController, rollout_store
from kollm.rollout.state import RolloutConflict, RolloutSpec
from kollm.serve.gateway import Gateway


class AbortRequest(BaseModel):
    reason: str = Field("aborted by user", description="Why; recorded on the version and sent with the alert.")


def status_json(controller: RolloutController) -> dict[str, Any]:
    gw = controller.gateway
    st = controller.status()
    return {
        "rollout": None if st is None else st.to_json(),
        "gateway": {
            "model": controller.name,
            "stable_version": gw.stable.version,
            "canary_version": None if gw.canary is None else gw.canary.version,
            "canary_weight": gw.weight,
            "inflight": {"stable": gw.stable.inflight, "canary": 0 if gw.canary is None else gw.canary.inflight},
        },
    }


def admin_app(controller: RolloutController, *, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="kollm rollout admin", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        refused = _cross_site(request)
        if refused is not None:
            return refused
        if api_key:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or wrong API key", "pass --api-key or set KOLLM_API_KEY")
        return await call_next(request)

    @app.exception_handler(KollmError)
    async def kollm_error(request: Request, e: KollmError) -> JSONResponse:
        code = (
            400
            if isinstance(e, ConfigError)
            else 404
            if isinstance(e, NotFound)
            else 409
            if isinstance(e, RolloutConflict)
            else 500
        )
        return _error(code, e.message, e.hint)

    @app.post("/admin/rollout/start")
    async def start(request: Request) -> dict[str, Any]:
        try:
            raw = await request.json()
        except ValueError:
            raise ConfigError("request body is not JSON") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ConfigError('request body needs "name": the registered model name')
        name = raw.pop("name")
        spec = RolloutSpec.build(**raw)
        await controller.start(name, spec)
        return status_json(controller)

    @app.get("/admin/rollout/status")
    async def status() -> dict[str, Any]:
        return status_json(controller)

    @app.post("/admin/rollout/pause")
    async def pause() -> dict[str, Any]:
        await controller.pause()
        return status_json(controller)

    @app.post("/admin/rollout/resume")
    async def resume() -> dict[str, Any]:
        await controller.resume()
        return status_json(controller)

    @app.post("/admin/rollout/abort")
    async def abort(request: Request) -> dict[str, Any]:
        body = await request.body()
        try:
            reason = AbortRequest.model_validate_json(body).reason if body else "aborted by user"
        except ValidationError:
            raise ConfigError('abort body must be JSON like {"reason": "..."}') from None
        await controller.abort(reason)
        return status_json(controller)

    @app.post("/admin/rollout/promote")
    async def promote() -> dict[str, Any]:
        await controller.promote()
        return status_json(controller)

    return app


def _cross_site(request: Request) -> JSONResponse | None:
    """A 403 for a request a browser sent from another site, a 415 for a POST that is not JSON; else None."""
    origin = request.headers.get("origin")
    if origin is not None and (
        origin == "null" or urlsplit(origin).netloc.lower() != request.headers.get("host", "").lower()
    ):
        return _error(
            403,
            f"cross-origin request refused (Origin {origin[:100]!r})",
            "call the admin endpoints from `kollm rollout` or a script, not a web page",
        )
    if request.headers.get("sec-fetch-site") == "cross-site":
        return _error(
            403,
            "cross-site request refused",
            "call the admin endpoints from `kollm rollout` or a script, not a web page",
        )
    if (
        request.method == "POST"
        and request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json"
    ):
        return _error(
            415,
            "admin POSTs must send Content-Type: application/json",
            'send a JSON body, e.g. {} (curl -H "Content-Type: application/json" -d "{}")',
        )
    return None


def _error(code: int, message: str, hint: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "hint": hint}}, status_code=code)


def attach_rollout(
    gateway: Gateway,
    *,
    project_dir: Path | None,
    model_name: str,
    api_key: str | None = None,
    tick_s: float = 0.05,
    clock: Clock | None = None,
) -> RolloutController:
    """Give a gateway that has a canary its rollout controller (state in <project>/.kollm/rollouts/) and the
    /admin/rollout/ endpoints. `clock`: the controller's time (kollm.rollout.clock; default the real time, a
    ManualClock in tests)."""
    controller = RolloutController(
        gateway,
        rollout_store(project_dir),
        RegistryTarget(project_dir, model_name),
        api_key=api_key,
        tick_s=tick_s,
        clock=clock,
    )
    gateway.admin_app = admin_app(controller, api_key=api_key)
    return controller
