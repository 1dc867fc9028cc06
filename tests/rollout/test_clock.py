"""ManualClock: time moves only through advance, sleepers wake at their deadlines in order, and advance returns
once what it woke has settled. SystemClock is the real time."""

from __future__ import annotations

import asyncio
import time

import pytest

from kollm.rollout.clock import SYSTEM_CLOCK, ManualClock


def test_sleepers_wake_at_their_deadlines_in_order():
    async def main() -> list[tuple[str, float]]:
        clock = ManualClock(100.0)
        woke: list[tuple[str, float]] = []

        async def sleeper(name: str, s: float) -> None:
            await clock.sleep(s)
            woke.append((name, clock.now()))

        tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("b", 2.0), ("a", 1.0), ("c", 5.0))]
        while clock.sleepers < 3:
            await asyncio.sleep(0)
        await clock.advance(0.5)
        assert woke == [] and clock.now() == 100.5
        await clock.advance(2.0)
        assert clock.now() == 102.5 and clock.sleepers == 1
        await clock.advance(10)
        await asyncio.gather(*tasks)
        return woke

    assert asyncio.run(main()) == [("a", 101.0), ("b", 102.0), ("c", 105.0)]


def test_a_periodic_task_runs_at_every_tick_and_advance_waits_for_its_work():
    async def main() -> None:
        clock = ManualClock(0.0)
        seen: list[float] = []

        async def loop() -> None:
            while True:
                await clock.sleep(0.25)
                await asyncio.to_thread(lambda: None)  # real work that takes event-loop turns (and a thread)
                await asyncio.sleep(0)
                seen.append(clock.now())

        task = asyncio.create_task(loop())
        while clock.sleepers < 1:
            await asyncio.sleep(0)
        await clock.advance(1.0)
        assert seen == [0.25, 0.5, 0.75, 1.0]  # done by the time advance returns
        await clock.advance(0.1)
        assert seen == [0.25, 0.5, 0.75, 1.0]
        task.cancel()
        await clock.advance(1.0)  # a cancelled sleeper is skipped
        assert clock.sleepers == 0 and seen[-1] == 1.0

    asyncio.run(main())


def test_advance_refuses_to_go_back_and_reports_a_task_that_never_settles():
    async def main() -> None:
        clock = ManualClock(0.0, settle_timeout_s=0.2)
        with pytest.raises(ValueError):
            await clock.advance(-1)
        gate = asyncio.Event()

        async def stuck() -> None:
            await clock.sleep(1)
            await gate.wait()  # waits on the caller of advance: it cannot settle

        task = asyncio.create_task(stuck(), name="stuck")
        while clock.sleepers < 1:
            await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="stuck"):
            await clock.advance(1)
        gate.set()
        await task

    asyncio.run(main())


def test_system_clock_is_the_real_time():
    before = time.time()
    assert before <= SYSTEM_CLOCK.now() <= time.time()
    asyncio.run(SYSTEM_CLOCK.sleep(0))
