"""The `kollm ui` web app: server-rendered pages (FastAPI + Jinja2) over one project's MLflow store and `.kollm/`.

Live regions (a run in progress, the rollout) are refreshed by a ten-line inline script that fetches their
HTML fragment with fetch() every second or two; there is no other script and no client-side framework.
State changes (promote, rollback, pause, resume, abort, rollout promote) need the API key the UI was started
with: the user types it once, the UI keeps an HttpOnly SameSite=Strict session cookie (signed with the key, issued
at a time the server checks: it expires after SESSION_TTL_S). Every state-changing POST also needs
  - the session's CSRF token (a hidden form field, an HMAC of the session cookie) unless it carries the typed key,
  - a same-origin request: `Sec-Fetch-Site` same-origin/none and an `Origin` equal to the page's own origin, when
    the browser sends them (SameSite=Strict does not separate two ports of one host: a page on another local port
    is "same-site"),
and every request a `Host` that is the bound address or a loopback name (400 otherwise: DNS rebinding).
Without a key the UI is read-only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from kollm.errors import ConfigError, KollmError, NotFound
from kollm.eval.report import Curve
from kollm.redact import mask_text
from kollm.rollout.state import RolloutConflict
from kollm.ui import data, svg

HERE = Path(__file__).parent
COOKIE = "kollm_ui"
PREFERRED_METRICS = ("perplexity", "chrf", "loss", "final_loss", "train_loss", "rows.train", "rows_train", "rows_kept")


SESSION_TTL_S = 12 * 3600
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")


class Forbidden(KollmError):
    """A state change without the API key, a valid session and CSRF token, or from another origin."""


def _sign(api_key: str, msg: str) -> str:
    return hmac.new(api_key.encode(), msg.encode(), hashlib.sha256).hexdigest()


def new_session(api_key: str, now: float | None = None) -> str:
    """A session cookie value: `<issued unix time>.<nonce>.<HMAC of both under the key>`."""
    issued = str(int(time.time() if now is None else now))
    nonce = secrets.token_hex(8)
    return f"{issued}.{nonce}.{_sign(api_key, f'session|{issued}|{nonce}')}"


def session_valid(api_key: str, value: str, now: float | None = None) -> bool:
    """A cookie this server signed with `api_key`, issued less than SESSION_TTL_S ago."""
    parts = value.split(".")
    if len(parts) != 3 or not parts[0].isdigit():
        return False
    issued, nonce, mac = parts
    if not hmac.compare_digest(mac.encode(), _sign(api_key, f"session|{issued}|{nonce}").encode()):
        return False
    age = (time.time() if now is None else now) - int(issued)
    return -60 <= age < SESSION_TTL_S


def csrf_token(api_key: str, session: str) -> str:
    """The CSRF token of one session: forms carry it, a cookie alone (sent by any page) is not enough."""
    return _sign(api_key, f"csrf|{session}")


def allowed_hosts(bound: str | None) -> set[str]:
    """Host names the UI answers to: loopback names and the address it is bound to (for a wildcard bind, also
    this machine's names and addresses)."""
    names = set(LOOPBACK_NAMES)
    if bound is None:
        return names
    if bound in WILDCARD:
        hostname = socket.gethostname()
        names |= {hostname.lower(), socket.getfqdn().lower()}
        try:
            names |= {str(a[4][0]) for a in socket.getaddrinfo(hostname, None)}
        except OSError:
            pass
    else:
        names.add(bound.lower().strip("[]"))
    return names


def host_name(header: str) -> str:
    """The name part of a Host header: `127.0.0.1:8080` -> `127.0.0.1`, `[::1]:80` -> `::1`."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _duration(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s:.2f}s" if s < 60 else f"{s / 60:.1f}m"


def _fmt_ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "—"


def _filesize(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


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
    """The run's steps and the data sources they read, as an SVG DAG (edges from the input refs): drawn left to
    right, and top to bottom for phone width (CSS shows one), with the key to the node styles."""
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
        status = "CACHED" if s.cache_hit and s.status == "FINISHED" else s.status
        hit = {"CACHED": "cache hit", "FINISHED": "computed"}.get(status, status.lower())
        lines = [s.name, f"{s.kind} · {_duration(s.duration_s)}", f"{hit} · {s.key[:8]}" if s.key else hit]
        metric = _node_metric(s)
        if metric:
            lines.append(metric)
        title = "\n".join([f"{s.name} ({s.kind}) {hit}", *(f"{k} = {data.fmt(v)}" for k, v in s.shown_metrics.items())])
        nodes.append(svg.Node(s.name, lines, status, f"/steps/{s.run_id}" if s.run_id else None, title))
    return svg.dag(nodes, edges) + svg.dag(nodes, edges, vertical=True) + svg.legend(sorted({n.status for n in nodes}))


CHART_AXES = {  # metric -> (chart title, y axis title with unit)
    "loss": ("Training loss", "loss (nats/token)"),
    "eval_loss": ("Eval loss", "eval loss (nats/token)"),
    "learning_rate": ("Learning rate", "learning rate"),
    "grad_norm": ("Gradient norm", "grad norm (L2)"),
    "tokens_per_s": ("Throughput", "tokens/s"),
    "gpu_memory_gb": ("GPU memory", "memory (GB)"),
}


def training_charts(series: list[data.Series]) -> str:
    """One chart per logged metric, losses of different objectives (cross-entropy, DPO, ...) on separate axes."""
    groups: dict[tuple[str, str], list[data.Series]] = {}
    for x in series:
        groups.setdefault((x.metric, x.objective if "loss" in x.metric else ""), []).append(x)

    def rank(key: tuple[str, str]) -> tuple[int, str, str]:
        metric, objective = key
        return (0 if metric == "loss" else 1 if "loss" in metric else 2, metric, objective)

    out = []
    for metric, objective in sorted(groups, key=rank):
        title, unit = CHART_AXES.get(metric, (metric, metric))
        if objective:
            title = f"{title} ({objective})"
            if objective != "cross-entropy":
                unit = f"{objective} {unit.split(' (')[0]}"
        curves = [Curve(f"{x.step}: {x.metric}", x.points) for x in groups[(metric, objective)]]
        out.append(svg.chart(curves, title=title, y_label=unit))
    return "".join(out)


def create_app(
    project_dir: Path, *, api_key: str | None = None, gateway: str | None = None, host: str | None = None
) -> FastAPI:
    """The UI for the project in `project_dir`. `api_key` enables state changes; `gateway` is the rollout gateway;
    `host` the address it is bound to (requests for any other `Host` but a loopback name get a 400)."""
    project = data.open_project(project_dir)
    store = data.Store(project)
    env = Environment(loader=PackageLoader("kollm.ui", "templates"), autoescape=select_autoescape(["html"]))
    env.filters.update(
        duration=_duration,
        short=_short,
        filesize=_filesize,
        num=data.fmt,
        urlq=lambda s: quote(str(s), safe=""),
        pretty=lambda o: json.dumps(o, ensure_ascii=False, indent=2, default=str),
    )
    env.filters.update(emoji=data.emoji)
    env.globals.update(
        trouble_of=data.trouble_of,
        versus=data.versus,
        conditions=data.conditions,
        project=project,
        writable=api_key is not None,
        gate_of=data.gate_of,
        metrics_of=data.metrics_of,
        fmt_ts=_fmt_ts,
    )

    def warm_up() -> None:
        """What the first pages would otherwise wait for: the store and the runs list's queries (MLflow's import
        and set-up: seconds), the templates compiled, the model registry's store opened and the modules the
        registry and rollout pages import. Errors are left for the pages to show."""
        store.warm()
        for name in env.list_templates():
            env.get_template(name)
        try:
            from kollm.rollout import client  # noqa: F401  (the rollout page's)

            data.registry_models(project)
        except Exception:  # noqa: BLE001  (the page reports it)
            pass

    warm = threading.Thread(target=warm_up, name="kollm-ui-warm", daemon=True)
    warm.start()
    app = FastAPI(title="kollm ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.warm = warm  # serve_ui reports ready once it is done
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    hosts = allowed_hosts(host)

    @app.middleware("http")
    async def check_host(request: Request, call_next: Any) -> Response:
        name = host_name(request.headers.get("host", ""))
        if name not in hosts:
            return PlainTextResponse(
                f"400: this kollm ui does not answer to Host '{name}' (it answers to {', '.join(sorted(hosts))})",
                status_code=400,
            )
        response: Response = await call_next(request)
        return response

    def session_of(request: Request) -> str | None:
        given = request.cookies.get(COOKIE, "")
        return given if api_key is not None and given and session_valid(api_key, given) else None

    def unlocked(request: Request) -> bool:
        return session_of(request) is not None

    def page(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        session = session_of(request)
        body = env.get_template(template).render(
            request=request,
            unlocked=session is not None,
            csrf=csrf_token(api_key, session) if api_key and session else "",
            path=request.url.path,
            **ctx,
        )
        return HTMLResponse(body, status_code=status)

    async def form(request: Request) -> dict[str, str]:
        raw = (await request.body()).decode("utf-8", errors="replace")
        return {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}

    def same_origin(request: Request) -> None:
        """Refuses a POST a browser says came from another site or origin (another port of this host included)."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise Forbidden(
                f"refused a state change from another site (Sec-Fetch-Site: {site})",
                hint="use the buttons of this UI's own pages",
            )
        origin = request.headers.get("origin")
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin is not None and origin.lower() != own.lower():
            raise Forbidden(
                f"refused a state change from origin {origin} (this UI is {own})",
                hint="use the buttons of this UI's own pages",
            )

    def authorize(request: Request, fields: dict[str, str]) -> bool:
        """Raises Forbidden unless the request may change state: same origin, and either the typed key or a live
        session cookie with its CSRF token. Returns True when the key was typed, so the response sets the cookie."""
        if api_key is None:
            raise Forbidden(
                "this UI is read-only",
                hint="start it with `kollm ui --api-key KEY` (or $KOLLM_API_KEY) to promote, roll back or steer rollouts",
            )
        same_origin(request)
        typed = fields.get("api_key", "")
        if typed and hmac.compare_digest(typed.encode(), api_key.encode()):
            return True
        session = session_of(request)
        if session is None:
            expired = bool(request.cookies.get(COOKIE))
            raise Forbidden(
                "your session expired (sessions last 12 h) or is not valid" if expired else "wrong or missing API key",
                hint="type the API key the UI was started with",
            )
        if not hmac.compare_digest(fields.get("csrf", "").encode(), csrf_token(api_key, session).encode()):
            raise Forbidden("missing or wrong CSRF token", hint="reload the page and use its buttons")
        return False

    def done(url: str, set_cookie: bool) -> RedirectResponse:
        resp = RedirectResponse(url, status_code=303)
        if set_cookie and api_key:
            resp.set_cookie(
                COOKIE, new_session(api_key), max_age=SESSION_TTL_S, httponly=True, samesite="strict", path="/"
            )
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
    def runs(request: Request, fragment: bool = False, q: str = "") -> HTMLResponse:
        rows = data.list_runs(store, query=q)
        return page(
            request,
            "runs_live.html" if fragment else "runs.html",
            rows=rows,
            q=q,
            active=any(r.row.status == "RUNNING" for r in rows),
        )

    @app.get("/compare", response_class=HTMLResponse)
    def compare(request: Request) -> HTMLResponse:
        ids = request.query_params.getlist("run")
        if len(ids) != 2:
            raise ConfigError(
                f"pick two runs to compare, not {len(ids)}", hint="tick two runs on the runs page, then Compare"
            )
        a, b = data.compare_runs(store, ids[0], ids[1])
        return page(request, "compare.html", a=a, b=b)

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run(request: Request, run_id: str, fragment: bool = False) -> HTMLResponse:
        view = data.run_view(store, run_id)
        return page(
            request,
            "run_live.html" if fragment else "run.html",
            view=view,
            graph=step_graph(view.steps),
            charts=training_charts(view.series),
        )

    @app.get("/steps/{run_id}", response_class=HTMLResponse)
    def step(request: Request, run_id: str, fragment: bool = False) -> HTMLResponse:
        view = data.step_view(store, run_id)
        return page(
            request, "step_live.html" if fragment else "step.html", view=view, charts=training_charts(view.series)
        )

    @app.get("/steps/{run_id}/report", response_class=HTMLResponse)
    def report(request: Request, run_id: str, path: str) -> HTMLResponse:
        """A report inside this UI's page (navigation around it; the report itself sandboxed in a frame that is as
        wide as the screen)."""
        view = data.step_view(store, run_id)
        if path not in view.reports:
            raise NotFound(f"run {run_id} has no report '{path}'")
        return page(request, "report.html", view=view, report=path)

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

    @app.get("/steps/{run_id}/outputs/{name}", response_class=HTMLResponse)
    def output(request: Request, run_id: str, name: str) -> HTMLResponse:
        return page(request, "output.html", out=data.output_view(store, run_id, name))

    @app.get("/steps/{run_id}/outputs/{name}/file")
    def output_file(run_id: str, name: str, path: str) -> Response:
        body = data.output_file(store, run_id, name, path)
        # shown as text whatever it holds (an HTML report too: its own page is /steps/RUN/report)
        return Response(
            body,
            media_type="text/plain; charset=utf-8",
            headers={"Content-Security-Policy": "sandbox; default-src 'none'", "X-Content-Type-Options": "nosniff"},
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

    samples: deque[data.Sample] = deque(maxlen=900)  # the gateway's /metrics as polled, with no rollout going on
    saved_samples = data.ArmSamples(project)  # per rollout, kept on disk

    @app.get("/rollout", response_class=HTMLResponse)
    def rollout(request: Request, fragment: bool = False) -> HTMLResponse:
        view = data.rollout_view(project, gateway, api_key)
        r = view.rollout
        if r is not None:
            if view.serving and view.active:
                saved_samples.record(r, view.serving)
            charts = arm_charts(
                saved_samples.load(r), t0=float(r.get("started_at", 0)), x_label="seconds since the rollout started"
            )
        else:
            if view.serving:
                samples.append((time.time(), view.serving))
            charts = arm_charts(samples)
        return page(request, "rollout_live.html" if fragment else "rollout.html", view=view, arm_charts=charts)

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


def arm_charts(
    samples: Sequence[data.Sample], t0: float | None = None, x_label: str = "seconds since this page opened"
) -> str:
    """Requests per second and mean latency of each arm and version between consecutive samples of the gateway's
    /metrics (taken while the rollout page is open: every second). X: seconds since T0 (default: the first sample).
    An interval over which a counter went down (the gateway restarted) has no point."""
    rate: dict[str, list[tuple[float, float]]] = {}
    latency: dict[str, list[tuple[float, float]]] = {}
    if t0 is None:
        t0 = samples[0][0] if samples else 0.0
    for (t1, before), (t2, after) in zip(samples, list(samples)[1:]):
        old = {(r["arm"], r["version"]): r for r in before}
        for r in after:
            # an arm missing from the earlier sample had served nothing yet: its counters were 0
            prev = old.get((r["arm"], r["version"]), {"requests": 0, "count": 0.0, "seconds": 0.0})
            if t2 <= t1 or r["requests"] < prev["requests"]:
                continue
            label = f"{r['arm']} v{r['version']}"
            rate.setdefault(label, []).append((round(t2 - t0, 1), (r["requests"] - prev["requests"]) / (t2 - t1)))
            done = r["count"] - prev["count"]
            if done > 0:
                latency.setdefault(label, []).append(
                    (round(t2 - t0, 1), 1000 * (r["seconds"] - prev["seconds"]) / done)
                )
    out = []
    if rate:
        curves = [Curve(k, v) for k, v in sorted(rate.items())]
        out.append(svg.chart(curves, title="Requests per second", y_label="requests/s", x_label=x_label))
    if latency:
        curves = [Curve(k, v) for k, v in sorted(latency.items())]
        out.append(svg.chart(curves, title="Mean latency", y_label="latency (ms)", x_label=x_label))
    return "".join(out)


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
    return (
        svg.dag(nodes, edges, label="lineage")
        + svg.dag(nodes, edges, label="lineage", vertical=True)
        + svg.legend(sorted({n.status for n in nodes}))
    )
