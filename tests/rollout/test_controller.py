"""The rollout controller on a ManualClock: the test decides when each analysis window ends, sends a known number
of successful, failing or slow requests into it, and asserts the exact verdicts and the outcome.

The gateway, the serving apps, the admin API, the state file and the MLflow registry are the real ones; requests
go to the gateway in process (httpx.ASGITransport), and `x-kollm-canary: always|never` picks the arm, so the count
in each window is exact. Nothing waits on the wall clock: the controller only sees time move when the test calls
`clock.advance`, which returns once the controller has handled it. (test_rollout.py runs rollouts end to end, on
real uvicorn under load, where how many requests fit into a window is up to the machine.)
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import httpx

from kollm.rollout.api import attach_rollout
from kollm.rollout.clock import SYSTEM_CLOCK, ManualClock
from kollm.rollout.state import RolloutState
from kollm.serve import create_app
from kollm.serve.gateway import Arm, Gateway, _Lifespan

from tests.serve.fake_engine import versioned

from .conftest import state_file

T0 = 1_700_000_000.0
PAUSE = 2.0  # seconds of the manual clock each step holds
TICK = 0.25  # the controller checks its window every TICK (binary fractions: clock sums are exact)
CHAT = "/v1/chat/completions"


class Rig:
    """A gateway (stable version 1, canary version 2, fake engines behind the real serving app) with its rollout
    controller on a manual clock, and an in-process HTTP client to it."""

    def __init__(self, registered, project: Path, clock: ManualClock, *, api_key: str | None = None):
        self.name, self.project, self.clock = registered.name, project, clock
        self.engines = {"1": versioned("1"), "2": versioned("2")}
        arms = [
            Arm(create_app(e, model_name=self.name, model_version=v), version=v, model_name=self.name)
            for v, e in self.engines.items()
        ]
        self.gw = Gateway(*arms)
        self.controller = attach_rollout(self.gw, project_dir=project, model_name=self.name, tick_s=TICK, clock=clock)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.gw), base_url="http://gateway", timeout=60)

    @property
    def state(self) -> RolloutState:
        assert self.controller.state is not None
        return self.controller.state

    def verdicts(self) -> list[str]:
        return [h.result.verdict for h in self.state.history] if self.controller.state else []

    def saved(self) -> dict[str, Any]:
        return json.loads(state_file(self.project, self.name).read_text())

    async def admin(self, command: str, **body: Any) -> dict[str, Any]:
        r = await self.http.post(f"/admin/rollout/{command}", json=body)
        assert r.status_code == 200, r.text
        return r.json()

    async def start(self, **spec: Any) -> dict[str, Any]:
        return await self.admin("start", name=self.name, **{"pause_s": PAUSE, **spec})

    async def send(
        self, n: int, *, arm: str = "canary", fail: bool = False, delay_s: float = 0.0
    ) -> list[tuple[int, str]]:
        """`n` concurrent chat requests forced to one arm (arm="weight": routed by the weight, by `user`); the
        engine behind that arm fails each of them (fail) or takes `delay_s` real seconds. (status, version) each."""
        headers = {"x-kollm-canary": {"canary": "always", "stable": "never"}[arm]} if arm != "weight" else {}
        engines = [self.engines["2"]] if arm == "canary" else list(self.engines.values())
        for e in engines:
            e.fail_ratio, e.request_delay = (1.0 if fail else 0.0), delay_s
        try:
            rs = await asyncio.gather(
                *(
                    self.http.post(
                        CHAT,
                        headers=headers,
                        json={
                            "model": self.name,
                            "messages": [{"role": "user", "content": "안녕하세요"}],
                            "max_tokens": 4,
                            "user": f"user-{i}",
                        },
                    )
                    for i in range(n)
                )
            )
        finally:
            for e in engines:
                e.fail_ratio, e.request_delay = 0.0, 0.0
        return [(r.status_code, r.headers["x-kollm-model-version"]) for r in rs]

    async def window(self) -> None:
        """Let the current window's PAUSE pass on the clock; returns once the controller has judged it."""
        await self.clock.advance(PAUSE)


@asynccontextmanager
async def running(registered, project: Path, clock: ManualClock | None = None) -> AsyncIterator[Rig]:
    """The rig with the gateway's lifespan started (the controller resumes a saved rollout and starts its loop);
    shut down on exit (background alerts are delivered by then)."""
    rig = Rig(registered, project, clock or ManualClock(T0))
    lifespan = _Lifespan(rig.gw)
    await lifespan.startup()
    while (
        rig.clock.sleepers == 0
    ):  # the controller's loop has started and waits on the clock (event-loop turns, no time)
        await asyncio.sleep(0)
    try:
        yield rig
    finally:
        await rig.http.aclose()
        await lifespan.shutdown()


def test_window_ends_exactly_when_the_clock_reaches_pause(registered, tmp_path, webhook):
    async def scenario() -> None:
        async with running(registered, tmp_path) as rig:
            await rig.clock.advance(10)  # time passing before a rollout starts: nothing to judge
            st = (await rig.start(steps=[25, 50, 75], min_requests=5, alert_webhook=webhook.url))["rollout"]
            assert st["window_started_at"] == st["started_at"] == T0 + 10 and st["weight"] == 25
            assert [s for s, _ in await rig.send(5)] == [200] * 5
            assert [v for _, v in await rig.send(7, arm="stable")] == ["1"] * 7  # the stable arm's are not analysed
            await rig.clock.advance(PAUSE - TICK)
            assert rig.verdicts() == [] and rig.gw.weight == 25  # not over yet on the controller's clock
            await rig.clock.advance(TICK)
            assert rig.verdicts() == ["pass"] and rig.gw.weight == 50
            first = rig.state.history[0]
            assert (first.step, first.weight, first.at, first.result.requests) == (1, 25, T0 + 10 + PAUSE, 5)
            assert rig.state.window_started_at == T0 + 10 + PAUSE

            await rig.send(6)
            await rig.window()
            await rig.send(5)
            await rig.window()
            assert rig.verdicts() == ["pass", "pass", "pass"]
            assert [h.result.requests for h in rig.state.history] == [5, 6, 5]
            assert [h.weight for h in rig.state.history] == [25, 50, 75]
            assert rig.state.status == "promoted" and rig.state.ended_at == T0 + 10 + 3 * PAUSE
            assert rig.gw.stable.version == "2" and rig.gw.canary is None
            assert {v for _, v in await rig.send(10, arm="weight")} == {"2"}
            assert rig.gw.stable.take_window()[0] == []  # the promoted arm keeps no samples
            metrics = (await rig.http.get("/metrics")).text
        n = registered.name
        assert f'kollm_rollout_analysis_total{{rollout="{n}",verdict="pass"}} 3.0' in metrics
        assert f'kollm_rollout_status{{rollout="{n}",status="promoted"}} 1.0' in metrics
        saved = rig.saved()
        assert saved["status"] == "promoted" and [h["at"] for h in saved["history"]] == [
            T0 + 10 + k * PAUSE for k in (1, 2, 3)
        ]
        assert [a["at"] for a in saved["alerts"]] == [T0 + 10 + 3 * PAUSE] and saved["alerts"][0]["delivered"]
        assert registered.alias("champion") == "2" and registered.alias("previous") == "1"
        assert registered.tags("2")["kollm.rollout.result"] == "promoted"
        assert "promoted" in webhook.received[0]["text"]

    asyncio.run(scenario())


def test_failing_canary_is_rolled_back_after_exactly_two_failed_windows(registered, tmp_path, webhook):
    async def scenario() -> None:
        async with running(registered, tmp_path) as rig:
            await rig.start(steps=[50, 75], min_requests=8, failure_limit=2, alert_webhook=webhook.url)
            await rig.send(7)
            assert [s for s, _ in await rig.send(3, fail=True)] == [500] * 3
            await rig.send(20, arm="stable")
            await rig.window()
            assert rig.verdicts() == ["fail"]
            assert (
                rig.state.status == "progressing"
                and rig.state.failures == 1
                and rig.state.step == 0
                and rig.gw.weight == 50
            )
            assert (
                rig.state.history[0].result.values["success_rate"] == 0.7 and rig.state.history[0].result.requests == 10
            )
            assert "analysis failed (1/2" in rig.state.message

            await rig.send(7)
            await rig.send(3, fail=True)
            await rig.window()
            assert rig.verdicts() == ["fail", "fail"]
            assert rig.state.status == "rolled_back" and rig.state.failures == 2 and rig.gw.weight == 0
            assert rig.state.ended_at == T0 + 2 * PAUSE
            assert {v for _, v in await rig.send(30, arm="weight")} == {"1"}  # weight 0: only the stable version serves
            await rig.send(3)  # the canary still answers when asked by header, but nothing is analysed any more
            await rig.clock.advance(5 * PAUSE)
            assert rig.verdicts() == ["fail", "fail"]
        saved = rig.saved()
        assert saved["status"] == "rolled_back" and saved["weight"] == 0 and saved["failures"] == 2
        assert [h["result"]["verdict"] for h in saved["history"]] == ["fail", "fail"]
        assert "success_rate=0.7" in saved["message"]
        assert registered.alias("champion") == "1"
        assert "success_rate" in registered.tags("2")["kollm.rollout.failed_analysis"]
        assert len(webhook.received) == 1 and "ROLLED BACK" in webhook.received[0]["text"]

    asyncio.run(scenario())


def test_slow_canary_is_rolled_back_on_latency(registered, tmp_path, webhook):
    async def scenario() -> None:
        async with running(registered, tmp_path) as rig:
            await rig.start(
                steps=[20, 40], min_requests=3, analysis="success_rate>=0.95,p95_ms<=100", alert_webhook=webhook.url
            )
            for _ in range(2):
                # each request takes at least 0.25 s (real time, a lower bound whatever the machine's load)
                assert [s for s, _ in await rig.send(3, delay_s=0.25)] == [200] * 3
                await rig.window()
            assert rig.verdicts() == ["fail", "fail"] and rig.state.status == "rolled_back"
            assert all(
                h.result.values["p95_ms"] >= 250 and h.result.values["success_rate"] == 1 for h in rig.state.history
            )
            assert all(h.result.failed == ["p95_ms<=100"] for h in rig.state.history)
            assert "p95_ms" in rig.state.message
        assert registered.alias("champion") == "1"
        assert "p95_ms" in webhook.received[0]["text"]

    asyncio.run(scenario())


def test_inconclusive_and_failed_windows_hold_the_step_until_later_windows_pass(registered, tmp_path, webhook):
    async def scenario() -> None:
        async with running(registered, tmp_path) as rig:
            await rig.start(steps=[50, 100], min_requests=5, failure_limit=2, alert_webhook=webhook.url)
            await rig.send(2)
            await rig.window()  # too few requests: held, not a failure
            assert rig.verdicts() == ["inconclusive"] and rig.state.step == 0 and rig.state.failures == 0
            await rig.send(4)
            await rig.send(1, fail=True)
            await rig.window()  # one failure below the limit: held
            assert rig.verdicts() == ["inconclusive", "fail"] and rig.state.step == 0 and rig.state.failures == 1
            await rig.send(5)
            await rig.window()
            assert rig.state.step == 1 and rig.gw.weight == 100
            await rig.send(5)
            await rig.window()
            assert rig.verdicts() == ["inconclusive", "fail", "pass", "pass"]
            assert [h.result.requests for h in rig.state.history] == [2, 5, 5, 5]
            assert [h.weight for h in rig.state.history] == [50, 50, 50, 100]
            assert rig.state.status == "promoted" and rig.state.failures == 1
        assert registered.alias("champion") == "2"

    asyncio.run(scenario())


def test_pause_stops_the_clock_of_the_window_and_resume_starts_a_new_one(registered, tmp_path, webhook):
    async def scenario() -> None:
        async with running(registered, tmp_path) as rig:
            await rig.start(steps=[20, 40], min_requests=3, alert_webhook=webhook.url)
            await rig.send(3)
            await rig.clock.advance(PAUSE / 2)
            paused = (await rig.admin("pause"))["rollout"]
            assert paused["status"] == "paused" and paused["weight"] == 20
            await rig.send(5)  # served while paused: not kept for any window
            await rig.clock.advance(10 * PAUSE)
            assert rig.verdicts() == [] and rig.state.status == "paused"
            resumed = (await rig.admin("resume"))["rollout"]
            assert resumed["status"] == "progressing" and resumed["window_started_at"] == T0 + 10.5 * PAUSE
            await rig.window()
            assert rig.verdicts() == ["inconclusive"] and rig.state.history[0].result.requests == 0
            await rig.send(3)
            await rig.window()
            assert rig.verdicts() == ["inconclusive", "pass"] and rig.gw.weight == 40
            aborted = await rig.admin("abort", reason="bad vibes")
            assert aborted["rollout"]["status"] == "aborted" and aborted["gateway"]["canary_weight"] == 0
            assert aborted["rollout"]["ended_at"] == T0 + 12.5 * PAUSE
            await rig.clock.advance(10 * PAUSE)
            assert rig.verdicts() == ["inconclusive", "pass"]
        assert registered.alias("champion") == "1"
        assert registered.tags("2")["kollm.rollout.reason"] == "bad vibes"

    asyncio.run(scenario())


def test_restarted_gateway_resumes_at_the_same_step_with_a_fresh_window(registered, tmp_path, webhook):
    async def scenario() -> None:
        async with running(registered, tmp_path) as rig:
            await rig.start(min_requests=3, alert_webhook=webhook.url)  # steps 20,40,60,80
            await rig.send(3)
            await rig.window()
            assert rig.verdicts() == ["pass"] and rig.gw.weight == 40
            await rig.send(2)  # in the window the restart cuts short: lost
        saved = rig.saved()
        assert (
            saved["status"] == "progressing"
            and saved["step"] == 2
            and saved["step_index"] == 1
            and saved["weight"] == 40
        )

        # a new process builds everything again from the project folder; its clock reads a later time
        restarted_at = T0 + 100
        async with running(registered, tmp_path, ManualClock(restarted_at)) as rig:
            assert rig.state.step == 1 and rig.state.status == "progressing" and rig.gw.weight == 40
            assert (
                rig.state.window_started_at == restarted_at and "resumed after a gateway restart" in rig.state.message
            )
            assert rig.verdicts() == ["pass"]
            metrics = (await rig.http.get("/metrics")).text
            assert f'kollm_rollout_step{{rollout="{registered.name}"}} 2.0' in metrics
            assert f'kollm_rollout_canary_weight_percent{{rollout="{registered.name}"}} 40.0' in metrics
            await rig.send(1)
            await rig.window()
            assert rig.verdicts() == ["pass", "inconclusive"] and rig.state.history[1].result.requests == 1
            await rig.send(3)
            await rig.window()
            assert rig.verdicts() == ["pass", "inconclusive", "pass"] and rig.gw.weight == 60
            assert [h.at for h in rig.state.history] == [T0 + PAUSE, restarted_at + PAUSE, restarted_at + 2 * PAUSE]
            assert (await rig.admin("promote"))["rollout"]["status"] == "promoted"
        assert registered.alias("champion") == "2" and registered.alias("previous") == "1"

    asyncio.run(scenario())


def test_attach_rollout_uses_the_real_clock_by_default(registered, tmp_path):
    name = registered.name
    gw = Gateway(Arm(create_app(versioned("1"), model_name=name, model_version="1"), version="1", model_name=name))
    assert attach_rollout(gw, project_dir=tmp_path, model_name=name).clock is SYSTEM_CLOCK
