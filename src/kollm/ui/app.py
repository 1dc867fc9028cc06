"""The `kollm ui` web app: server-rendered pages (FastAPI + Jinja2) over one project's MLflow store and `.kollm/`.

Live regions (a run in progress, the rollout) are refreshed by a ten-line inline script that fetches their
HTML fragment with fetch() every second or two; there is no other script and no client-side framework.
State changes (promote, rollback, pause, resume, abort, rollout promote) need the API key the UI was started
with: the user types it once, the UI keeps an HttpOnly SameSite=Strict cookie derived from it. Without a key the
UI is read-only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from kollm.errors import ConfigError, KollmError, NotFound
from kollm.redact import mask_text
from kollm.rollout.state import RolloutConflict
from kollm.ui import data, svg

HERE = Path(__file__).parent
COOKIE = "kollm_ui"
PREFERRED_METRICS = ("perplexity", "chrf", "loss", "final_loss", "train_loss", "rows.train", "rows_train", "rows_kept")


class Forbidden(KollmError):
    """A state change without the API key."""


def session_token(api_key: str) -> str:
    return hmac.new(api_key.encode(), b"kollm-ui-session", hashlib.sha256).hexdigest()


def _duration(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:.2f}s" if s < 60 else f"{s / 60:.1f}m"


def _fmt_ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "—"


def _short(digest: str, n: int = 12) -> str:
    return digest.removeprefix("sha256:")[:n]


def _node_metric(node: data.StepNode) -> str:
    m = node.shown_metrics
    for k in PREFERRED_METRICS:
        if k in m:
            return f"{k} {data.fmt(m[k])}"
    if m:
        k, v = next(iter(m.items()))
        return f"{k} {data.fmt(v)}"
    return ""


def step_graph(steps: list[data.StepNode]) -> str:
    """The run's steps and the data sources they read, as an SVG DAG (edges from the input refs)."""
    nodes: list[svg.Node] = []
    edges: list[tuple[str, str]] = []
    seen_data: set[str] = set()
    for s in steps:
        for ref, digest in s.inputs.values():
            if ref.startswith("data.") and ref not in seen_data:
                seen_data.add(ref)
                lines = [ref.removeprefix("data."), "raw data"] + ([_short(digest)] if digest else [])
                nodes.append(
                    svg.Node(ref, lines, "DATA", f"/lineage?digest={quote(digest)}" if digest else None, digest)
                )
            edges.append((ref if ref.startswith("data.") else ref.split(".")[0], s.name))
        hit = "cache hit" if s.cache_hit else ("ran" if s.status == "FINISHED" else s.status.lower())
        lines = [s.name, f"{s.kind} · {_duration(s.duration_s)}", f"{hit} · {s.key[:8]}" if s.key else hit]
        metric = _node_metric(s)
        if metric:
            lines.append(metric)
        title = "\n".join(
            [f"{s.name} ({s.kind}) {s.status}", *(f"{k} = {data.fmt(v)}" for k, v in s.shown_metrics.items())]
        )
        nodes.append(svg.Node(s.name, lines, s.status, f"/steps/{s.run_id}" if s.run_id else None, title))
    return svg.dag(nodes, edges)


def create_app(project_dir: Path, *, api_key: str | None = None, gateway: str | None = None) -> FastAPI:
    """The UI for the project in `project_dir`. `api_key` enables state changes; `gateway` is the rollout gateway."""
    project = data.open_project(project_dir)
    store = data.Store(project)
    env = Environment(loader=PackageLoader("kollm.ui", "templates"), autoescape=select_autoescape(["html"]))
    env.filters.update(
        duration=_duration,
        short=_short,
        num=data.fmt,
        urlq=lambda s: quote(str(s), safe=""),
        pretty=lambda o: json.dumps(o, ensure_ascii=False, indent=2, default=str),
    )
    env.globals.update(
        project=project, writable=api_key is not None, gate_of=data.gate_of, metrics_of=data.metrics_of, fmt_ts=_fmt_ts
    )
    app = FastAPI(title="kollm ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    token = session_token(api_key) if api_key else None

    def unlocked(request: Request) -> bool:
        given = request.cookies.get(COOKIE, "")
        return token is not None and hmac.compare_digest(given.encode(), token.encode())

    def page(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        body = env.get_template(template).render(
            request=request, unlocked=unlocked(request), path=request.url.path, **ctx
        )
        return HTMLResponse(body, status_code=status)

    async def form(request: Request) -> dict[str, str]:
        raw = (await request.body()).decode("utf-8", errors="replace")
        return {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}

    def authorize(request: Request, fields: dict[str, str]) -> bool:
        """Raises Forbidden unless the request may change state (a typed key that matches, or the session cookie).
        Returns True when the key was typed, so the response sets the cookie."""
        if api_key is None:
            raise Forbidden(
                "this UI is read-only",
                hint="start it with `kollm ui --api-key KEY` (or $KOLLM_API_KEY) to promote, roll back or steer rollouts",
            )
        typed = fields.get("api_key", "")
        if typed and hmac.compare_digest(typed.encode(), api_key.encode()):
            return True
        if unlocked(request):
            return False
        raise Forbidden("wrong or missing API key", hint="type the API key the UI was started with")

    def done(url: str, set_cookie: bool) -> RedirectResponse:
        resp = RedirectResponse(url, status_code=303)
        if set_cookie and token:
            resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return resp

    @app.exception_handler(KollmError)
    async def kollm_error(request: Request, e: KollmError) -> HTMLResponse:
        code = (
            403
            if isinstance(e, Forbidden)
            else 404
            if isinstance(e, NotFound)
            else 400
            if isinstance(e, ConfigError)
            else 409
            if isinstance(e, RolloutConflict)
            else 503
        )
        hint = mask_text(e.hint) if e.hint else e.hint
        return page(request, "error.html", status=code, message=mask_text(e.message), hint=hint)

    # --- runs ---------------------------------------------------------------------------------------

    @app.get("/")
    def index() -> RedirectResponse:
        return RedirectResponse("/runs", status_code=307)

    @app.get("/runs", response_class=HTMLResponse)
    def runs(request: Request, fragment: bool = False) -> HTMLResponse:
        rows = data.list_runs(project)
        return page(
            request,
            "runs_live.html" if fragment else "runs.html",
            rows=rows,
            active=any(r.status == "RUNNING" for r in rows),
        )

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run(request: Request, run_id: str, fragment: bool = False) -> HTMLResponse:
        view = data.run_view(store, run_id)
        return page(
            request,
            "run_live.html" if fragment else "run.html",
            view=view,
            graph=step_graph(view.steps),
            chart=svg.chart(view.curves),
        )

    @app.get("/steps/{run_id}", response_class=HTMLResponse)
    def step(request: Request, run_id: str, fragment: bool = False) -> HTMLResponse:
        view = data.step_view(store, run_id)
        return page(request, "step_live.html" if fragment else "step.html", view=view, chart=svg.chart(view.curves))

    @app.get("/steps/{run_id}/artifact")
    def artifact(run_id: str, path: str) -> Response:
        body = data.artifact_bytes(store, run_id, path)
        media = (
            "text/html; charset=utf-8"
            if path.endswith(".html")
            else "application/json"
            if path.endswith(".json")
            else "text/plain; charset=utf-8"
        )
        # reports are self-contained pages: shown sandboxed, without scripts or access to this origin
        return Response(
            body,
            media_type=media,
            headers={
                "Content-Security-Policy": "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:"
            },
        )

    # --- registry -----------------------------------------------------------------------------------

    @app.get("/registry", response_class=HTMLResponse)
    def registry_index(request: Request) -> Response:
        names = data.registry_models(project)
        if names == [project.name]:
            return RedirectResponse(f"/registry/{quote(project.name)}", status_code=307)
        return page(request, "registry_index.html", names=names)

    @app.get("/registry/{name}", response_class=HTMLResponse)
    def registry_model(request: Request, name: str) -> HTMLResponse:
        return page(request, "registry.html", model=data.model_view(project, name))

    @app.get("/registry/{name}/{action}", response_class=HTMLResponse)
    def registry_confirm(request: Request, name: str, action: str, version: str | None = None) -> HTMLResponse:
        if action not in ("promote", "rollback"):
            raise NotFound(f"no action '{action}'", hint="promote or rollback")
        model = data.model_view(project, name)
        if action == "promote" and version is None:
            version = model.aliases.get("challenger")
            if version is None:
                raise NotFound(
                    f"model '{name}' has no challenger to promote", hint="pick a version on the registry page"
                )
        if action == "rollback" and "previous" not in model.aliases:
            raise NotFound(
                f"model '{name}' has no 'previous' version to roll back to",
                hint="a rollback needs an earlier promotion",
            )
        return page(request, "confirm_registry.html", model=model, action=action, version=version)

    @app.post("/registry/{name}/{action}")
    async def registry_action(request: Request, name: str, action: str) -> Response:
        from kollm import registry

        fields = await form(request)
        typed = authorize(request, fields)
        reason = fields.get("reason", "").strip() or f"{action} from kollm ui"
        if action == "promote":
            await run_in_threadpool(registry.promote, name, fields.get("version") or None, reason, project.dir)
        elif action == "rollback":
            await run_in_threadpool(registry.rollback, name, reason, project.dir)
        else:
            raise NotFound(f"no action '{action}'", hint="promote or rollback")
        return done(f"/registry/{quote(name)}", typed)

    # --- lineage ------------------------------------------------------------------------------------

    @app.get("/lineage", response_class=HTMLResponse)
    def lineage_forward(request: Request, digest: str = "") -> HTMLResponse:
        if not digest:
            return page(request, "lineage_search.html")
        return page(request, "lineage_forward.html", fwd=data.forward_lineage(store, digest.strip()))

    @app.get("/lineage/{name}/{version}", response_class=HTMLResponse)
    def lineage_back(request: Request, name: str, version: str) -> HTMLResponse:
        lin = data.version_lineage(store, name, version)
        return page(request, "lineage.html", lin=lin, graph=lineage_graph(lin))

    # --- live rollout -------------------------------------------------------------------------------

    @app.get("/rollout", response_class=HTMLResponse)
    def rollout(request: Request, fragment: bool = False) -> HTMLResponse:
        view = data.rollout_view(project, gateway, api_key)
        return page(request, "rollout_live.html" if fragment else "rollout.html", view=view)

    @app.get("/rollout/{cmd}", response_class=HTMLResponse)
    def rollout_confirm(request: Request, cmd: str) -> HTMLResponse:
        if cmd not in ("abort", "promote"):
            raise NotFound(f"no rollout command '{cmd}' to confirm", hint="abort or promote")
        return page(request, "confirm_rollout.html", cmd=cmd, view=data.rollout_view(project, gateway, api_key))

    @app.post("/rollout/{cmd}")
    async def rollout_action(request: Request, cmd: str) -> Response:
        from kollm.rollout import client as rollout_client

        if cmd not in ("pause", "resume", "abort", "promote"):
            raise NotFound(f"no rollout command '{cmd}'", hint="pause, resume, abort or promote")
        fields = await form(request)
        typed = authorize(request, fields)
        reason = fields.get("reason", "").strip() or None
        await run_in_threadpool(lambda: rollout_client.command(cmd, gateway=gateway, api_key=api_key, reason=reason))  # type: ignore[arg-type]
        return done("/rollout", typed)

    @app.post("/unlock")
    async def unlock(request: Request) -> Response:
        fields = await form(request)
        nxt = fields.get("next", "/")
        typed = authorize(request, fields)
        return done(nxt if nxt.startswith("/") and not nxt.startswith("//") else "/", typed)

    return app


def lineage_graph(lin: data.Lineage) -> str:
    """Raw data -> steps -> registered version, joined by the digests the step runs recorded."""
    steps = lin.steps
    produced = {d: s.name for s in steps for d in s.outputs.values()}
    nodes: list[svg.Node] = []
    edges: list[tuple[str, str]] = []
    for s in steps:
        for ref, digest in s.inputs.values():
            if digest in produced:
                edges.append((produced[digest], s.name))
            elif ref.startswith("data.") or digest:
                nid = f"data:{digest}"
                if nid not in {n.id for n in nodes}:
                    nodes.append(
                        svg.Node(
                            nid,
                            [ref.removeprefix("data."), "raw data", _short(digest)],
                            "DATA",
                            f"/lineage?digest={quote(digest)}",
                            digest,
                        )
                    )
                edges.append((nid, s.name))
        outs = [f"{n} {_short(d, 8)}" for n, d in s.outputs.items()][:2]
        nodes.append(svg.Node(s.name, [s.name, s.kind, *outs], s.status, f"/steps/{s.run_id}", s.name))
    v = lin.version
    vid = f"version:{v.version}"
    nodes.append(
        svg.Node(
            vid,
            [f"{v.name} v{v.version}", ", ".join(v.aliases) or "no alias", _short(lin.model_digest)],
            "FINISHED",
            None,
            v.uri,
        )
    )
    registering = [s.name for s in steps if s.kind == "register"] or [
        s.name for s in steps if lin.model_digest in s.outputs.values()
    ]
    edges += [(name, vid) for name in registering[:1]]
    return svg.dag(nodes, edges, label="lineage")
