"""The rollout controller: an asyncio task inside the serve process that walks the canary through its steps.

Each step sets the canary weight on the gateway and holds it for `pause_s`; at the end of that window the
canary's own requests in the window (recorded by the gateway) are analysed (kollm.rollout.analysis), plus the
quality probe and the canary judge (kollm.rollout.judging: judge_win_rate) when they are configured.
  - pass: next step; after the last step the canary is promoted: the registry's `champion` alias moves to its
    version (`previous` keeps the old one) and the gateway swaps it in as the stable arm at 100 %.
  - fail: the failure is counted; at `failure_limit` the canary weight drops to 0 at once, the champion stays,
    the version is tagged with the failed analysis and an alert goes to the webhook. Below the limit the step
    is held and analysed again.
  - inconclusive (too little traffic): the step is held and analysed again.
State is saved to .kollm/rollouts/<name>.json after every change, so a restarted gateway resumes at the same step.
Time comes from an injectable clock (kollm.rollout.clock): the real one by default, a ManualClock in tests, which
then decide when each window ends.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import httpx
from prometheus_client import Counter, Gauge

from kollm.errors import NotFound
from kollm.monitor.alerts import send_alert, webhook_url
from kollm.rollout import registry_ops
from kollm.rollout.analysis import AnalysisResult, JudgeWindow, ProbeResult, analyse, parse_analysis
from kollm.rollout.clock import SYSTEM_CLOCK, Clock
from kollm.rollout.state import (
    ACTIVE,
    Alert,
    RolloutConflict,
    RolloutSpec,
    RolloutState,
    RolloutStore,
    Status,
    StepRecord,
)
from kollm.serve.gateway import Arm, Gateway

log = logging.getLogger("kollm.rollout")

STATUSES = ("none", *get_args(Status))  # the kollm_rollout_status gauge's labels ("none": no rollout started)


@dataclass(frozen=True)
class RegistryTarget:
    """Where the rollout's aliases live: the project (its tracking/registry URI) and the registered model name."""

    project_dir: Path | None
    model_name: str


class RolloutController:
    """Owns the rollout of one canary behind one gateway. All mutations happen on the event loop.

    `clock` gives the time (window starts and ends, the state's timestamps) and the wait between two checks of
    whether the current window is over (every `tick_s` seconds of that clock); default: the real time."""

    def __init__(
        self,
        gateway: Gateway,
        store: RolloutStore,
        registry: RegistryTarget,
        *,
        api_key: str | None = None,
        tick_s: float = 0.05,
        clock: Clock | None = None,
    ):
        self.gateway = gateway
        self.store = store
        self.registry = registry
        self.api_key = api_key
        self.tick_s = tick_s
        self.clock: Clock = clock if clock is not None else SYSTEM_CLOCK
        self.state: RolloutState | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        m = gateway.metrics
        self._m_weight = Gauge(
            "kollm_rollout_canary_weight_percent", "Canary traffic weight in percent.", ["rollout"], registry=m
        )
        self._m_step = Gauge(
            "kollm_rollout_step", "Current rollout step (1-based; 0 before start).", ["rollout"], registry=m
        )
        self._m_status = Gauge(
            "kollm_rollout_status",
            "1 for the rollout's current status, 0 for the others.",
            ["rollout", "status"],
            registry=m,
        )
        self._m_analysis = Counter(
            "kollm_rollout_analysis", "Analysis windows by verdict.", ["rollout", "verdict"], registry=m
        )
        self._m_value = Gauge(
            "kollm_rollout_analysis_value", "The last analysed value of each metric.", ["rollout", "metric"], registry=m
        )
        self._m_failures = Gauge(
            "kollm_rollout_failures", "Failed analyses so far in this rollout.", ["rollout"], registry=m
        )
        gateway.on_startup.append(self.startup)
        gateway.on_shutdown.append(self.shutdown)

    @property
    def name(self) -> str:
        return self.registry.model_name

    # ---- lifecycle ----------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Resume a rollout of this canary version that was in progress when the gateway stopped."""
        saved = self.store.load(self.name)
        canary = self.gateway.canary
        if saved is not None and saved.active and canary is not None and saved.canary_version == canary.version:
            self.state = saved
            self.gateway.set_weight(saved.spec.steps[saved.step])
            saved.weight = self.gateway.weight
            saved.window_started_at = self.clock.now()
            if saved.status == "progressing":
                canary.sample_prompts(saved.spec.judge.pairs if saved.spec.judge else 0)
                canary.take_window()  # a paused rollout keeps no samples until it is resumed
            where = f"step {saved.step + 1}/{len(saved.spec.steps)}, canary weight {saved.weight:g}%"
            saved.message = (
                f"resumed after a gateway restart at {where}"
                if saved.status == "progressing"
                else f"gateway restarted; still paused at {where}"
            )
            self.store.save(saved)
            log.info("rollout %s: %s", self.name, saved.message)
        elif (
            saved is not None
            and saved.status == "rolled_back"
            and canary is not None
            and saved.canary_version == canary.version
        ):
            self.state = saved  # keep the rolled-back canary at 0 %
        self._publish()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await self.clock.sleep(self.tick_s)
            st = self.state
            if st is None or not self._window_over(st):
                continue
            try:
                async with self._lock:
                    if self.state is st and self._window_over(st):  # not paused, resumed or ended meanwhile
                        await self._end_window(st)
            except Exception:  # never let one bad window kill the controller
                log.exception("rollout %s: analysis failed", self.name)
                st.message = "analysis error (see the gateway log); retrying next window"
                st.window_started_at = self.clock.now()
                self.store.save(st)

    def _window_over(self, st: RolloutState) -> bool:
        return st.status == "progressing" and self.clock.now() >= st.window_started_at + st.spec.pause_s

    # ---- commands (called by the admin API) ------------------------------------------------------------

    async def start(self, name: str, spec: RolloutSpec) -> RolloutState:
        async with self._lock:
            if name != self.name:
                raise NotFound(
                    f"this gateway serves a canary of {self.name!r}, not {name!r}",
                    hint=f"run `kollm rollout start {self.name}`",
                )
            canary = self.gateway.canary
            if canary is None:
                raise RolloutConflict(
                    "no canary is loaded (it was promoted already); serve a new challenger to roll it out"
                )
            if self.state is not None and self.state.active:
                raise RolloutConflict(
                    f"a rollout of {name} version {self.state.canary_version} is {self.state.status}",
                    hint="`kollm rollout abort` it first, or `kollm rollout status`",
                )
            if spec.alert_webhook is None:
                spec = spec.model_copy(update={"alert_webhook": webhook_url()})
            if spec.judge is not None:
                spec.judge.api_key()  # a judge key variable missing in this process: refused now, not every window
            now = self.clock.now()
            st = RolloutState(
                name=name,
                stable_version=self.gateway.stable.version,
                canary_version=canary.version,
                spec=spec,
                started_at=now,
                window_started_at=now,
            )
            self.state = st
            self._enter_step(st, 0, "started")
            return st

    async def replace_canary(self, arm: Arm) -> None:
        """Serve `arm` as the canary (the challenger alias moved), between rollouts only."""
        async with self._lock:
            if self.state is not None and self.state.active:
                raise RolloutConflict(f"a rollout of version {self.state.canary_version} is {self.state.status}")
            await self.gateway.replace_canary(arm)
            self.state = None  # the last rollout's outcome belongs to the canary it judged
            self._publish()

    async def pause(self) -> RolloutState:
        async with self._lock:
            st = self._require("progressing", "pause")
            st.status = "paused"
            self._close_window()
            st.message = f"paused at step {st.step + 1} (weight {st.weight:g}%)"
            self._save(st)
            return st

    async def resume(self) -> RolloutState:
        async with self._lock:
            st = self._require("paused", "resume")
            st.status = "progressing"
            self._enter_step(st, st.step, "resumed")
            return st

    async def abort(self, reason: str = "aborted by user") -> RolloutState:
        async with self._lock:
            st = self._require(ACTIVE, "abort")
            self.gateway.set_weight(0)
            self._close_window()
            st.status, st.weight, st.message, st.ended_at = "aborted", 0.0, reason, self.clock.now()
            self._save(st)
            await self._tag(st, {"kollm.rollout.result": "aborted", "kollm.rollout.reason": reason})
            self._alert(
                st,
                f":warning: kollm rollout of {st.name} version {st.canary_version} aborted: {reason}. "
                f"Champion stays version {st.stable_version}.",
            )
            return st

    async def promote(self) -> RolloutState:
        """Promote now, skipping the remaining steps (`kollm rollout promote`)."""
        async with self._lock:
            st = self._require(ACTIVE, "promote")
            await self._promote(st, "promoted by user (remaining steps skipped)")
            return st

    def status(self) -> RolloutState | None:
        return self.state

    # ---- internals ---------------------------------------------------------------------------------------

    def _require(self, allowed: str | tuple[str, ...], command: str) -> RolloutState:
        allowed = (allowed,) if isinstance(allowed, str) else allowed
        st = self.state
        if st is None:
            raise RolloutConflict(
                f"cannot {command}: no rollout has been started", hint=f"`kollm rollout start {self.name}`"
            )
        if st.status not in allowed:
            raise RolloutConflict(
                f"cannot {command}: the rollout of {st.name} version {st.canary_version} is {st.status}"
            )
        return st

    def _enter_step(self, st: RolloutState, index: int, why: str) -> None:
        st.step = index
        self.gateway.set_weight(st.spec.steps[index])
        st.weight = self.gateway.weight
        st.window_started_at = self.clock.now()
        assert self.gateway.canary is not None
        self.gateway.canary.sample_prompts(st.spec.judge.pairs if st.spec.judge else 0)
        self.gateway.canary.take_window()  # the window starts empty
        self.gateway.canary.take_prompts()
        st.message = f"{why}: step {index + 1}/{len(st.spec.steps)}, canary weight {st.weight:g}%"
        self._save(st)
        log.info("rollout %s: %s", st.name, st.message)

    async def _end_window(self, st: RolloutState) -> None:
        canary = self.gateway.canary
        assert canary is not None
        samples, pending_ms = canary.take_window()
        bodies, seen = canary.take_prompts()
        probe = await self._run_probe(st) if st.spec.probe else None
        judged: JudgeWindow | None = None
        verdicts: list[dict] = []
        if st.spec.judge is not None:
            from kollm.rollout.judging import judge_window

            judged, verdicts = await judge_window(
                st.spec.judge,
                bodies,
                seen,
                stable=self.gateway.stable,
                canary=canary,
                model_name=st.name,
                api_key=self.api_key,
            )
        result = analyse(
            parse_analysis(st.spec.analysis),
            samples,
            min_requests=st.spec.min_requests,
            pending_ms=pending_ms,
            probe=probe,
            judge=judged,
        )
        notes = []
        if probe is not None and probe.failures:
            notes.append("probe: " + "; ".join(probe.failures[:5]))
        if judged is not None:
            notes.append(
                f"judge: {judged.wins} won, {judged.ties} tied, {judged.losses} lost of {judged.pairs} pairs "
                f"({judged.sampled} of {judged.seen} canary chat requests sampled, {judged.calls} judge calls, "
                f"{judged.parse_failures + judged.request_failures} failed)"
            )
        st.history.append(StepRecord(st.step + 1, st.weight, self.clock.now(), result, "; ".join(notes), verdicts))
        self._m_analysis.labels(st.name, result.verdict).inc()
        for metric, value in result.values.items():
            self._m_value.labels(st.name, metric).set(value)
        log.info("rollout %s step %d: %s (%s)", st.name, st.step + 1, result.verdict, result.reason)
        if result.verdict == "pass":
            if st.step + 1 < len(st.spec.steps):
                self._enter_step(st, st.step + 1, "analysis passed")
            else:
                await self._promote(st, "all steps passed analysis")
        elif result.verdict == "fail":
            st.failures += 1
            if st.failures >= st.spec.failure_limit:
                await self._rollback(st, result)
            else:
                self._enter_step(
                    st, st.step, f"analysis failed ({st.failures}/{st.spec.failure_limit}: {result.reason}); holding"
                )
        else:
            self._enter_step(st, st.step, f"inconclusive ({result.reason}); holding")

    async def _rollback(self, st: RolloutState, result: AnalysisResult) -> None:
        self.gateway.set_weight(0)  # at once, before any slow call
        self._close_window()
        st.status, st.weight, st.ended_at = "rolled_back", 0.0, self.clock.now()
        st.message = f"rolled back after {st.failures} failed analyses; last: {result.reason}"
        self._save(st)
        await self._tag(
            st,
            {
                "kollm.rollout.result": "rolled_back",
                "kollm.rollout.failed_analysis": result.reason,
                "kollm.rollout.analysis": st.spec.analysis,
            },
        )
        self._alert(
            st,
            f":rotating_light: kollm rollout of {st.name} version {st.canary_version} ROLLED BACK at step "
            f"{st.step + 1}/{len(st.spec.steps)} (weight was {st.spec.steps[st.step]:g}%): {result.reason}. "
            f"Champion stays version {st.stable_version}.",
        )

    async def _promote(self, st: RolloutState, why: str) -> None:
        self._close_window()  # no more analysis: as the stable arm (or paused) it must not keep every request
        try:
            await asyncio.to_thread(
                registry_ops.promote, self.registry.project_dir, st.name, st.canary_version, f"kollm rollout: {why}"
            )
        except Exception as e:  # the registry is the source of truth: do not swap traffic it does not agree with
            st.status = "paused"
            st.message = f"promotion failed in the registry ({e}); fix it and run `kollm rollout promote`"
            self._save(st)
            log.error("rollout %s: %s", st.name, st.message)
            return
        self.gateway.promote_canary()
        st.status, st.weight, st.message, st.ended_at = "promoted", 100.0, why, self.clock.now()
        self._save(st)
        await self._tag(st, {"kollm.rollout.result": "promoted"})
        self._alert(
            st,
            f":white_check_mark: kollm rollout of {st.name}: version {st.canary_version} promoted to champion "
            f"({why}); previous is version {st.stable_version}.",
        )

    async def _tag(self, st: RolloutState, tags: dict[str, str]) -> None:
        try:
            await asyncio.to_thread(
                registry_ops.tag_version, self.registry.project_dir, st.name, st.canary_version, tags
            )
        except Exception as e:
            log.error("rollout %s: could not tag version %s: %s", st.name, st.canary_version, e)
            st.message += f" (tagging the version failed: {e})"
            self._save(st)

    def _alert(self, st: RolloutState, text: str) -> None:
        """Send in the background: a slow webhook must not hold the controller."""

        async def deliver() -> None:
            outcome = await send_alert(st.spec.alert_webhook, text)
            st.alerts.append(Alert(self.clock.now(), text, outcome.delivered, outcome.error))
            self.store.save(st)

        task = asyncio.get_running_loop().create_task(deliver())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _run_probe(self, st: RolloutState) -> ProbeResult:
        canary = self.gateway.canary
        assert canary is not None
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        passed, failures = 0, []
        transport = httpx.ASGITransport(app=canary.app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://canary", headers=headers, timeout=60
        ) as client:
            for p in st.spec.probe:
                body = {
                    "model": canary.model_name or st.name,
                    "messages": [{"role": "user", "content": p.prompt}],
                    "max_tokens": st.spec.probe_max_tokens,
                    "temperature": 0,
                }
                try:
                    r = await client.post("/v1/chat/completions", json=body)
                    text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else ""
                except Exception as e:
                    failures.append(f"{p.prompt[:40]!r}: {type(e).__name__}: {e}")
                    continue
                if r.status_code != 200:
                    failures.append(f"{p.prompt[:40]!r}: HTTP {r.status_code}")
                elif not text.strip():
                    failures.append(f"{p.prompt[:40]!r}: empty reply")
                elif p.expect is not None and p.expect not in text:
                    failures.append(f"{p.prompt[:40]!r}: reply lacks {p.expect!r}")
                else:
                    passed += 1
        return ProbeResult(passed, len(st.spec.probe), failures)

    def _close_window(self) -> None:
        if self.gateway.canary is not None:
            self.gateway.canary.close_window()

    def _save(self, st: RolloutState) -> None:
        self.store.save(st)
        self._publish()

    def _publish(self) -> None:
        st = self.state
        self._m_weight.labels(self.name).set(self.gateway.weight)
        self._m_step.labels(self.name).set(0 if st is None else st.step + 1)
        self._m_failures.labels(self.name).set(0 if st is None else st.failures)
        current = "none" if st is None else st.status
        for s in STATUSES:
            self._m_status.labels(self.name, s).set(1 if s == current else 0)


def rollout_store(project_dir: Path | None) -> RolloutStore:
    """Rollout state lives in <project>/.kollm/rollouts/ (the current folder without a project)."""
    return RolloutStore(Path(project_dir or Path.cwd()) / ".kollm" / "rollouts")
