"""`kollm watch`: retrain when it is time, when the data changed, when traffic drifted, or when the registry says so;
then hand a challenger that passed the gate to a canary rollout on the running gateway.

One cycle (`kollm watch --once`, for cron or a Kubeflow recurring run; `kollm watch` repeats it):

 1. Take the watcher lock (.kollm/watch/lock; a second watcher exits at once: one retrain at a time).
 2. Detect triggers: a cron `--schedule` time passed since the last check; the digest of the project's local data
    sources (kollm.yaml `data:`) changed; `kollm monitor drift` found a feature over `--drift-threshold`; an
    HMAC-verified MLflow registry webhook arrived (`--webhook-port`, queued in .kollm/watch/inbox.jsonl).
    Triggers are saved to .kollm/watch/state.json before anything runs, and every trigger pending when a run
    starts is handled by that one run (they coalesce).
 3. When the gateway has a rollout in progress, wait: the triggers stay pending for the next cycle.
 4. Run the pipeline (kollm.run: unchanged steps come from the cache). A failed quality gate ends the cycle.
 5. A new challenger (the registry's `challenger` alias moved to a version not handled before) is rolled out on
    the gateway (`kollm rollout start`, kollm.rollout.client) and the cycle waits for promotion or rollback.
 6. The outcome goes to the alert webhook (kollm.monitor.alerts) and to MLflow (experiment kollm-monitor, a run
    tagged kollm.monitor=watch).

Crash safety: the run in progress is saved in the state (`running`). A watcher that died mid-run resumes that
same run on its next cycle (the pipeline cache skips what finished) instead of detecting its triggers again; a
run that crashed the watcher 3 times is given up and reported.

Public API:
    WatchSettings, WatchState, Trigger, Outcome
    run_cycle(settings) -> Outcome          one cycle (what --once does)
    watch(settings, interval_s)             cycles until interrupted, with the webhook receiver when configured
    cron_due(expr, after, until) -> bool    5-field cron: did a scheduled minute pass in (after, until]?
    data_digest(project_dir) -> (digest, unwatched sources)
    verify_mlflow_signature(secret, headers, body) -> bool
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from kollm.errors import ConfigError, GateFailed, KollmError
from kollm.redact import mask_text

log = logging.getLogger("kollm.watch")

MAX_ATTEMPTS = 3
ROLLOUT_DONE = ("promoted", "rolled_back", "aborted")
TriggerKind = Literal["schedule", "data", "drift", "webhook", "manual"]
OutcomeKind = Literal[
    "idle",
    "baseline",
    "waiting",
    "busy",
    "promoted",
    "rolled_back",
    "aborted",
    "gate_failed",
    "failed",
    "no_new_challenger",
    "challenger_rolled_back",
    "registered",
    "gateway_not_serving_challenger",
    "rollout_timeout",
]


# ---------------------------------------------------------------- settings and state


@dataclass
class WatchSettings:
    project_dir: Path
    schedule: str | None = None  # cron, e.g. "0 3 * * *" (UTC)
    watch_data: bool = True
    drift_threshold: float | None = None  # PSI; None: no drift trigger
    drift_window: str = "24h"
    drift_min_requests: int = 30
    drift_every_s: float = 3600.0
    gateway: str | None = None  # URL of `kollm serve ... --canary ...`; None: register only, no rollout
    api_key: str | None = None
    model_name: str | None = None  # default: the project name
    rollout_steps: str = "20,40,60,80"
    rollout_pause: str = "2m"
    rollout_analysis: str = "success_rate>=0.95,p95_ms<=2000"
    rollout_failure_limit: int = 2
    rollout_min_requests: int = 10
    rollout_timeout_s: float = 6 * 3600
    canary_load_timeout_s: float = 600.0  # for the gateway to load a new challenger (its alias poll + model load)
    alert_webhook: str | None = None
    webhook_secret: str | None = None
    webhook_host: str = "127.0.0.1"
    webhook_port: int | None = None
    poll_s: float = 2.0
    force: bool = False  # roll out a challenger even when it was rolled back before

    @property
    def state_dir(self) -> Path:
        return Path(self.project_dir) / ".kollm" / "watch"


class Trigger(BaseModel):
    kind: TriggerKind
    detail: str
    at: float = Field(default_factory=time.time)
    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])


class Running(BaseModel):
    triggers: list[Trigger]
    started_at: float
    attempts: int = 1


class WatchState(BaseModel):
    data_digest: str | None = None
    last_schedule_check: float | None = None
    last_drift_check: float | None = None
    pending: list[Trigger] = []
    running: Running | None = None
    handled_challengers: list[str] = []
    history: list[dict[str, Any]] = []


@dataclass
class Outcome:
    kind: OutcomeKind
    message: str
    triggers: list[Trigger] = field(default_factory=list)
    version: str | None = None
    steps_run: list[str] = field(default_factory=list)
    steps_cached: list[str] = field(default_factory=list)
    alert_delivered: bool | None = None
    mlflow_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "triggers": [t.model_dump() for t in self.triggers],
            "version": self.version,
            "steps_run": self.steps_run,
            "steps_cached": self.steps_cached,
            "alert_delivered": self.alert_delivered,
            "mlflow_run_id": self.mlflow_run_id,
        }


class StateStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / "state.json"
        self.inbox = self.folder / "inbox.jsonl"

    def load(self) -> WatchState:
        if not self.path.exists():
            return WatchState()
        return WatchState.model_validate_json(self.path.read_text(encoding="utf-8"))

    def save(self, state: WatchState) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".state.{os.getpid()}.tmp")
        tmp.write_text(state.model_dump_json(indent=2), encoding="utf-8")
        os.replace(tmp, self.path)

    def push(self, trigger: Trigger) -> None:
        """Queue a trigger from another thread or process (the webhook receiver); drained by the next cycle."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.inbox, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(trigger.model_dump_json() + "\n")

    def drain(self) -> list[Trigger]:
        if not self.inbox.exists():
            return []
        with open(self.inbox, "r+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            lines = f.read().splitlines()
            f.seek(0)
            f.truncate()
        return [Trigger.model_validate_json(line) for line in lines if line.strip()]


@contextmanager
def watcher_lock(folder: Path) -> Iterator[bool]:
    """Yields True while holding the exclusive watcher lock, False when another process holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            f.write(str(os.getpid()))
            f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- triggers


def _cron_field(text: str, lo: int, hi: int) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        body, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if body == "*":
            start, end = lo, hi
        elif "-" in body:
            a, b = body.split("-", 1)
            start, end = int(a), int(b)
        else:
            start = end = int(body)
        if not (lo <= start <= end <= hi) or step < 1:
            raise ValueError(part)
        values |= set(range(start, end + 1, step))
    return values


@dataclass(frozen=True)
class Cron:
    minute: set[int]
    hour: set[int]
    day: set[int]
    month: set[int]
    weekday: set[int]  # 0 = Sunday
    day_or_weekday: bool  # both day and weekday restricted: either may match (cron's rule)

    def matches(self, t: datetime) -> bool:
        if t.minute not in self.minute or t.hour not in self.hour or t.month not in self.month:
            return False
        day_ok, weekday_ok = t.day in self.day, (t.isoweekday() % 7) in self.weekday
        return (day_ok or weekday_ok) if self.day_or_weekday else (day_ok and weekday_ok)


def parse_cron(expr: str) -> Cron:
    """Five fields: minute hour day-of-month month day-of-week (0 or 7 = Sunday); *, a-b, */n and lists."""
    fields = expr.split()
    if len(fields) != 5:
        raise ConfigError(
            f"--schedule {expr!r}: expected 5 cron fields (minute hour day month weekday), e.g. '0 3 * * *'"
        )
    try:
        minute, hour, day, month, weekday = (
            _cron_field(f, lo, hi) for f, (lo, hi) in zip(fields, ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7)))
        )
    except ValueError as e:
        raise ConfigError(f"--schedule {expr!r}: bad field {e}; use numbers in range, *, a-b, */n or lists") from None
    return Cron(minute, hour, day, month, {d % 7 for d in weekday}, fields[2] != "*" and fields[4] != "*")


def cron_due(expr: str, after: float, until: float) -> bool:
    """Did a minute that `expr` schedules (UTC) start in (after, until]? Looks back at most 8 days."""
    cron = parse_cron(expr)
    end = datetime.fromtimestamp(until, timezone.utc).replace(second=0, microsecond=0)
    start = max(after, until - 8 * 86400)
    t = end
    while t.timestamp() > start:
        if cron.matches(t):
            return True
        t -= timedelta(minutes=1)
    return False


def data_digest(project_dir: Path) -> tuple[str, list[str]]:
    """sha256 over the names and bytes of every local file of the project's data sources; also the names of the
    sources that are not local (URLs), which this digest cannot watch."""
    import glob

    import kollm

    pipe = kollm.load(project_dir)
    h = hashlib.sha256()
    unwatched = []
    for name, source in sorted(pipe.cfg.data.items()):
        if source.dvc is not None:  # the md5 DVC recorded at the revision: a revision with new bytes is new data
            from kollm.pipeline.dvc_source import lookup

            h.update(f"source {name}\ndvc {lookup(name, source.dvc, pipe.project_dir).md5}\n".encode())
            continue
        assert source.path is not None
        if "://" in source.path and not source.path.startswith("file://"):
            unwatched.append(name)
            continue
        base = Path(source.path.removeprefix("file://"))
        base = base if base.is_absolute() else pipe.project_dir / base
        matches = sorted(Path(p) for p in glob.glob(str(base))) if any(c in str(base) for c in "*?[") else [base]
        files = sorted(
            f for m in matches for f in ([m] if m.is_file() else m.rglob("*") if m.is_dir() else []) if f.is_file()
        )
        h.update(f"source {name}\n".encode())
        for f in files:
            h.update(f"{f.relative_to(pipe.project_dir) if f.is_relative_to(pipe.project_dir) else f}\n".encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return "sha256:" + h.hexdigest(), unwatched


def detect(settings: WatchSettings, state: WatchState, now: float) -> list[Trigger]:
    """New triggers since the last cycle; updates the state's bookkeeping (digest, last checks)."""
    found: list[Trigger] = []
    if settings.schedule:
        if state.last_schedule_check is not None and cron_due(settings.schedule, state.last_schedule_check, now):
            found.append(Trigger(kind="schedule", detail=f"schedule {settings.schedule!r}", at=now))
        state.last_schedule_check = now
    if settings.watch_data:
        digest, _ = data_digest(settings.project_dir)
        if state.data_digest is not None and digest != state.data_digest:
            found.append(
                Trigger(kind="data", detail=f"data changed: {state.data_digest[:19]} -> {digest[:19]}", at=now)
            )
        state.data_digest = digest
    if settings.drift_threshold is not None and (
        state.last_drift_check is None or now - state.last_drift_check >= settings.drift_every_s
    ):
        from kollm.monitor.drift import check_drift

        state.last_drift_check = now
        try:
            result = check_drift(
                settings.project_dir,
                window=settings.drift_window,
                threshold=settings.drift_threshold,
                min_requests=settings.drift_min_requests,
            )
        except KollmError as e:
            log.info("drift check skipped: %s", e.message)
        else:
            if result.drifted:
                worst = max(result.drifted, key=lambda n: result.features[n].psi)
                found.append(
                    Trigger(
                        kind="drift",
                        detail=f"drift on {', '.join(result.drifted)} (PSI {result.features[worst].psi:.2f} on {worst})",
                        at=now,
                    )
                )
    return found


# ---------------------------------------------------------------- the cycle


def _model_name(settings: WatchSettings) -> str:
    if settings.model_name:
        return settings.model_name
    import kollm

    return kollm.load(settings.project_dir).cfg.project


def _alias_version(name: str, alias: str, project_dir: Path) -> str | None:
    from kollm import registry

    try:
        return registry.show(name, alias, project_dir).version
    except KollmError:
        return None


def rolled_back(name: str, version: str, project_dir: Path) -> str | None:
    """How `version` was rolled back before (by a canary rollout or `kollm registry rollback`), else None."""
    from kollm import registry

    tags = registry.show(name, version, project_dir).tags
    if tags.get("kollm.rollout.result") == "rolled_back":
        return (
            f"its canary rollout was rolled back ({tags.get('kollm.rollout.failed_analysis') or 'no reason recorded'})"
        )
    if "kollm.rolled_back_at" in tags:
        return f"it was rolled back at {tags['kollm.rolled_back_at']} ({tags.get('kollm.rolled_back_reason') or '-'})"
    return None


def _rollout_active(settings: WatchSettings) -> str | None:
    """A message when the gateway has a rollout in progress, else None."""
    if not settings.gateway:
        return None
    from kollm.rollout.client import command

    st = command("status", gateway=settings.gateway, api_key=settings.api_key).get("rollout")
    if st is not None and st["status"] not in ROLLOUT_DONE:
        return f"a rollout of version {st['canary_version']} is {st['status']} on {settings.gateway}"
    return None


def roll_out(settings: WatchSettings, name: str, version: str) -> Outcome:
    """Start the canary rollout of `version` on the gateway and wait for promotion or rollback."""
    from kollm.rollout.client import command, start

    assert settings.gateway
    deadline = time.time() + settings.canary_load_timeout_s
    while (gw := command("status", gateway=settings.gateway, api_key=settings.api_key)["gateway"])[
        "canary_version"
    ] != version:
        if time.time() >= deadline:  # the gateway follows the challenger alias: it loads the new version by itself
            return Outcome(
                "gateway_not_serving_challenger",
                f"challenger version {version} passed the gate, but the gateway at {settings.gateway} still serves canary "
                f"{gw['canary_version']} after {settings.canary_load_timeout_s:g}s; serve it with "
                f"`kollm serve models:/{name}@champion --canary models:/{name}@challenger` (which follows the alias)",
                version=version,
            )
        time.sleep(settings.poll_s)
    start(
        name,
        steps=settings.rollout_steps,
        pause=settings.rollout_pause,
        analysis=settings.rollout_analysis,
        failure_limit=settings.rollout_failure_limit,
        min_requests=settings.rollout_min_requests,
        alert_webhook=settings.alert_webhook,
        gateway=settings.gateway,
        api_key=settings.api_key,
    )
    deadline = time.time() + settings.rollout_timeout_s
    while time.time() < deadline:
        st = command("status", gateway=settings.gateway, api_key=settings.api_key)["rollout"]
        if st is not None and st["status"] in ROLLOUT_DONE:
            return Outcome(st["status"], f"version {version}: {st['message']}", version=version)
        time.sleep(settings.poll_s)
    return Outcome(
        "rollout_timeout",
        f"the rollout of version {version} did not finish in {settings.rollout_timeout_s:g}s",
        version=version,
    )


def retrain(settings: WatchSettings, state: WatchState) -> Outcome:
    """Run the pipeline; roll out a new challenger that passed the gate."""
    import kollm

    name = _model_name(settings)
    try:
        result = kollm.run(settings.project_dir)
    except GateFailed as e:
        return Outcome("gate_failed", f"the quality gate rejected the new model: {e.message}")
    except KollmError as e:
        return Outcome("failed", f"the pipeline failed: {e.message}")
    run = [n for n, rec in result.steps.items() if not rec.cache_hit]
    cached = [n for n, rec in result.steps.items() if rec.cache_hit]
    challenger = _alias_version(name, "challenger", settings.project_dir)
    champion = _alias_version(name, "champion", settings.project_dir)
    if challenger is None or challenger == champion or challenger in state.handled_challengers:
        outcome = Outcome(
            "no_new_challenger",
            f"pipeline run {result.run_id}: no new challenger of {name} (challenger {challenger}, champion {champion})",
        )
    elif not settings.force and (why := rolled_back(name, challenger, settings.project_dir)):
        outcome = Outcome(
            "challenger_rolled_back",
            f"pipeline run {result.run_id}: challenger version {challenger} of {name} is not rolled out again: {why}; "
            "retrain a new version, or pass --force to roll this one out anyway",
            version=challenger,
        )
    else:
        state.handled_challengers.append(challenger)
        if settings.gateway:
            outcome = roll_out(settings, name, challenger)
        else:
            outcome = Outcome(
                "registered",
                f"{name} version {challenger} passed the gate and is the challenger (no --gateway: not rolled out)",
                version=challenger,
            )
    outcome.steps_run, outcome.steps_cached = run, cached
    return outcome


def run_cycle(settings: WatchSettings, *, now: float | None = None, manual: bool = False) -> Outcome:
    """One watch cycle (see the module docstring). `manual` adds a trigger (`kollm watch --once --now`)."""
    store = StateStore(settings.state_dir)
    with watcher_lock(settings.state_dir) as held:
        if not held:
            return Outcome(
                "busy",
                "another kollm watch holds the lock (one retrain at a time); its next cycle sees the same changes",
            )
        state = store.load()
        now = time.time() if now is None else now
        first = state.data_digest is None and state.last_schedule_check is None and not state.history
        resumed = state.running is not None
        if not resumed:
            state.pending += store.drain() + detect(settings, state, now)
            if manual:
                state.pending.append(Trigger(kind="manual", detail="kollm watch --now", at=now))
            store.save(state)  # the triggers are safe before anything runs
            if not state.pending:
                return Outcome(
                    "baseline" if first else "idle",
                    "recorded the data digest and schedule; nothing to do yet" if first else "nothing to do",
                )
        busy = _rollout_active(settings)
        if busy:
            waiting = state.running.triggers if state.running is not None else state.pending
            return Outcome("waiting", f"{busy}; {len(waiting)} trigger(s) wait for it", triggers=waiting)
        if state.running is not None:
            state.running.attempts += 1
            if state.running.attempts > MAX_ATTEMPTS:
                outcome = Outcome(
                    "failed",
                    f"gave up after {MAX_ATTEMPTS} attempts that did not finish",
                    triggers=state.running.triggers,
                )
                state.running = None
                return _finish(settings, store, state, outcome)
            log.info(
                "resuming the run of %d trigger(s) that a previous watcher did not finish", len(state.running.triggers)
            )
        else:
            state.running = Running(triggers=state.pending, started_at=now)
            state.pending = []
        store.save(state)
        triggers = state.running.triggers
        try:
            outcome = retrain(settings, state)
        except KollmError as e:
            outcome = Outcome("failed", e.message)
        outcome.triggers = triggers
        state.running = None
        return _finish(settings, store, state, outcome)


def _finish(settings: WatchSettings, store: StateStore, state: WatchState, outcome: Outcome) -> Outcome:
    from kollm.monitor.alerts import send_alert, webhook_url

    text = f"kollm watch: {outcome.kind.replace('_', ' ')}: {outcome.message} (triggers: {'; '.join(t.detail for t in outcome.triggers) or '-'})"
    outcome.alert_delivered = asyncio.run(send_alert(webhook_url(settings.alert_webhook), text)).delivered
    try:
        outcome.mlflow_run_id = _log_outcome(settings, outcome)
    except Exception as e:  # noqa: BLE001 - the outcome is also in the state file and the alert; tracking must not lose it
        log.error("could not log the watch outcome to MLflow: %s", e)
    state.history = [*state.history[-49:], {"at": time.time(), **outcome.to_json()}]
    store.save(state)
    return outcome


def _log_outcome(settings: WatchSettings, outcome: Outcome) -> str:
    from mlflow.entities import Metric, RunTag

    from kollm.monitor.drift import MONITOR_EXPERIMENT
    from kollm.pipeline.tracking import artifact_location
    from kollm.registry import client

    c = client(settings.project_dir)
    exp = c.get_experiment_by_name(MONITOR_EXPERIMENT)
    exp_id = (
        exp.experiment_id
        if exp is not None
        else c.create_experiment(
            MONITOR_EXPERIMENT, artifact_location=artifact_location(c.tracking_uri, settings.project_dir)
        )
    )
    run = c.create_run(exp_id, run_name=f"watch {outcome.kind}", tags={"kollm.monitor": "watch"})
    tags = [
        RunTag("kollm.watch.outcome", outcome.kind),
        RunTag("kollm.watch.message", outcome.message[:4000]),
        RunTag("kollm.watch.triggers", ",".join(sorted({t.kind for t in outcome.triggers})) or "none"),
    ]
    if outcome.version:
        tags.append(RunTag("kollm.watch.version", outcome.version))
    ms = int(time.time() * 1000)
    c.log_batch(
        run.info.run_id,
        metrics=[
            Metric("watch.steps_run", len(outcome.steps_run), ms, 0),
            Metric("watch.triggers", len(outcome.triggers), ms, 0),
        ],
        tags=tags,
    )
    c.set_terminated(
        run.info.run_id, "FAILED" if outcome.kind in ("failed", "gate_failed", "rolled_back", "aborted") else "FINISHED"
    )
    return run.info.run_id


# ---------------------------------------------------------------- the MLflow webhook receiver


def verify_mlflow_signature(
    secret: str, headers: dict[str, str], body: bytes, *, max_age_s: float = 300, now: float | None = None
) -> bool:
    """Check an MLflow webhook delivery: `X-MLflow-Signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`
    with the shared secret, and a timestamp no older than max_age_s (against replays)."""
    h = {k.lower(): v for k, v in headers.items()}
    delivery, stamp, signature = (
        h.get("x-mlflow-delivery-id"),
        h.get("x-mlflow-timestamp"),
        h.get("x-mlflow-signature", ""),
    )
    if not delivery or not stamp or not signature.startswith("v1,"):
        return False
    try:
        age = (time.time() if now is None else now) - int(stamp)
    except ValueError:
        return False
    if abs(age) > max_age_s:
        return False
    expected = hmac.new(secret.encode(), f"{delivery}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return hmac.compare_digest(base64.b64encode(expected).decode(), signature[3:])


MAX_WEBHOOK_BODY = 1024 * 1024  # an MLflow registry event is a few hundred bytes
WEBHOOK_READ_TIMEOUT_S = 10.0  # a client that stops sending mid-request is dropped after this
WEBHOOK_MAX_AGE_S = 300.0  # a delivery's timestamp may be this old; its id is remembered this long


class DeliveryLog:
    """The delivery ids seen within the replay window, in `<state dir>/webhook-deliveries.jsonl`, so a delivery
    replayed after the watcher restarts is refused as well. Shared by threads and processes under a file lock."""

    def __init__(self, folder: Path, window_s: float = WEBHOOK_MAX_AGE_S):
        self.path = Path(folder) / "webhook-deliveries.jsonl"
        self.window_s = window_s

    def first_time(self, delivery: str, now: float | None = None) -> bool:
        """Records `delivery`; False when it was seen within the window (a replay)."""
        now = time.time() if now is None else now
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            kept = []
            for line in f.read().splitlines():
                try:
                    entry = json.loads(line)
                    if now - float(entry["at"]) <= self.window_s:
                        kept.append(entry)
                except (ValueError, KeyError, TypeError):
                    continue  # a torn line: forgotten
            if any(e.get("id") == delivery for e in kept):
                return False
            kept.append({"id": delivery, "at": now})
            f.seek(0)
            f.truncate()
            f.write("".join(json.dumps(e) + "\n" for e in kept))
            return True


def webhook_server(settings: WatchSettings, store: StateStore, model_name: str) -> ThreadingHTTPServer:
    """POST / (any path): a verified MLflow registry event becomes a `webhook` trigger in the inbox. Events about
    the watched model itself (the versions this watcher registers) are acknowledged and ignored. A body over
    MAX_WEBHOOK_BODY gets 413 and a missing or invalid Content-Length 400/411, before any of it is read; a client
    that stalls is dropped after WEBHOOK_READ_TIMEOUT_S; replays are refused across restarts (DeliveryLog)."""
    assert settings.webhook_secret and settings.webhook_port is not None
    secret, deliveries = settings.webhook_secret, DeliveryLog(store.folder)

    class Handler(BaseHTTPRequestHandler):
        timeout = WEBHOOK_READ_TIMEOUT_S  # socket timeout for the request line, headers and body

        def do_POST(self) -> None:  # noqa: N802
            length = self.headers.get("content-length")
            if length is None:
                return self._answer(411, {"error": "Content-Length is required"}, close=True)
            if not length.strip().isdigit():
                return self._answer(400, {"error": f"invalid Content-Length {length[:40]!r}"}, close=True)
            if int(length) > MAX_WEBHOOK_BODY:
                return self._answer(413, {"error": f"body over {MAX_WEBHOOK_BODY} bytes"}, close=True)
            try:
                body = self.rfile.read(int(length))
            except TimeoutError:
                self.close_connection = True
                return
            if len(body) < int(length):  # the client closed early
                self.close_connection = True
                return
            if not verify_mlflow_signature(secret, dict(self.headers.items()), body, max_age_s=WEBHOOK_MAX_AGE_S):
                return self._answer(401, {"error": "bad or missing X-MLflow-Signature, or a stale X-MLflow-Timestamp"})
            if not deliveries.first_time(self.headers.get("x-mlflow-delivery-id", "")):
                return self._answer(200, {"status": "duplicate delivery ignored"})
            try:
                event = json.loads(body)
                data = event.get("data", {})
                what = f"{event['entity']}.{event['action']}"
            except (ValueError, KeyError, AttributeError):
                return self._answer(400, {"error": "not an MLflow webhook payload"})
            if data.get("name") == model_name:
                return self._answer(200, {"status": f"ignored: an event about {model_name} itself"})
            detail = f"registry webhook {what} {data.get('name', '')} {data.get('version', '')}".strip()
            store.push(Trigger(kind="webhook", detail=detail))
            self._answer(202, {"status": "queued", "trigger": detail})

        def _answer(self, code: int, payload: dict[str, Any], close: bool = False) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            if close:  # the unread body must not be taken for the next request
                self.send_header("connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: Any) -> None:
            log.info("webhook: " + format, *args)

    return ThreadingHTTPServer((settings.webhook_host, settings.webhook_port), Handler)


class Outage:
    """A cycle that fails (the gateway or the registry unreachable, ...) is retried with backoff (from
    min(interval, 2 s), doubling, up to max(interval, 5 min)); the outage is logged and alerted once when it starts
    and once when it ends, not on every try."""

    def __init__(self, settings: WatchSettings, interval_s: float):
        self.settings, self.interval_s = settings, interval_s
        self.failures, self.delay = 0, min(interval_s, 2.0)

    def _alert(self, text: str) -> None:
        from kollm.monitor.alerts import send_alert, webhook_url

        asyncio.run(send_alert(webhook_url(self.settings.alert_webhook), text))

    def failed(self, e: Exception) -> float:
        """Seconds to wait before the next try."""
        self.failures += 1
        if self.failures == 1:
            message = mask_text(e.message if isinstance(e, KollmError) else f"{type(e).__name__}: {e}")
            log.error("watch cycle failed: %s; retrying with backoff (logged again when it recovers)", message)
            self._alert(f"kollm watch: cycles fail: {message}; retrying with backoff")
        else:
            self.delay = min(self.delay * 2, max(self.interval_s, 300.0))
        return self.delay

    def recovered(self) -> None:
        if self.failures:
            log.info("watch cycles work again after %d failed tries", self.failures)
            self._alert(f"kollm watch: recovered after {self.failures} failed tries")
        self.failures, self.delay = 0, min(self.interval_s, 2.0)


def watch(settings: WatchSettings, *, interval_s: float = 60.0, stop: threading.Event | None = None) -> None:
    """Run cycles every interval_s until `stop` is set (or Ctrl-C), with the webhook receiver when configured."""
    stop = stop or threading.Event()
    server = None
    if settings.webhook_port is not None:
        if not settings.webhook_secret:
            raise ConfigError(
                "--webhook-port needs --webhook-secret (or $KOLLM_WEBHOOK_SECRET): deliveries are HMAC-verified"
            )
        server = webhook_server(settings, StateStore(settings.state_dir), _model_name(settings))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        log.info("MLflow webhook receiver on http://%s:%d/", settings.webhook_host, server.server_address[1])
    outage = Outage(settings, interval_s)
    try:
        while not stop.is_set():
            try:
                outcome = run_cycle(settings)
            except Exception as e:  # noqa: BLE001 - the gateway or the registry is down: retry, the receiver stays up
                stop.wait(outage.failed(e))
                continue
            outage.recovered()
            log.info("watch cycle: %s: %s", outcome.kind, outcome.message)
            stop.wait(interval_s)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
