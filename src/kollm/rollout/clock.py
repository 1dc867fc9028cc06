"""The rollout controller's clock: where it reads the time and how it waits, injectable for tests.

    SystemClock   the real one (time.time(), asyncio.sleep); what `kollm serve --canary` uses.
    ManualClock   time that moves only when a test calls `await clock.advance(seconds)`: sleepers wake at their
                  deadlines, in order, and `advance` returns once each task it woke is asleep on the clock again
                  (or finished). A test decides when an analysis window ends; nothing depends on machine speed.

The controller reads `now()` for window starts and ends and for the timestamps in the state file (seconds since
the epoch, like time.time()), and waits between checks with `sleep()`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds` on this clock."""
        ...


class SystemClock:
    """Wall-clock time and asyncio's sleep."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """A clock for tests: `now()` changes only through `advance`, and `sleep` returns only when `advance` reaches its
    deadline. Use it from one event loop.

    `advance(s)` moves time forward to each pending deadline up to now + s in turn: there it wakes the sleepers due
    and waits until every task it woke has settled (is sleeping on this clock again, or is done), so whatever they
    do when woken (take locks, run threads, write files) has happened before time moves on and before `advance`
    returns. A woken task that waits on something only the caller can provide would never settle:
    `settle_timeout_s` (real seconds, a safeguard against a hung test, not a timing assumption) turns that into an
    error naming the tasks."""

    def __init__(self, start: float = 1_700_000_000.0, *, settle_timeout_s: float = 60.0):
        self._now = float(start)
        self.settle_timeout_s = settle_timeout_s
        self._sleepers: list[tuple[float, int, asyncio.Future[None], asyncio.Task | None]] = []  # a heap by deadline
        self._order = itertools.count()
        self._changed: asyncio.Event | None = None

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), fut, asyncio.current_task()))
        self._notify()
        await fut  # cancelled with its task: advance skips it

    @property
    def sleepers(self) -> int:
        """How many tasks are sleeping on this clock."""
        return sum(not fut.done() for _, _, fut, _ in self._sleepers)

    async def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock only moves forward, not by {seconds}")
        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            self._now = max(self._now, self._sleepers[0][0])
            woken: list[asyncio.Task] = []
            while self._sleepers and self._sleepers[0][0] <= self._now:
                _, _, fut, task = heapq.heappop(self._sleepers)
                if not fut.done():
                    fut.set_result(None)
                    if task is not None:
                        woken.append(task)
            await self._settle(woken)
        self._now = target

    async def _settle(self, tasks: list[asyncio.Task]) -> None:
        for t in tasks:
            t.add_done_callback(lambda _: self._notify())
        self._changed = changed = asyncio.Event()
        try:
            async with asyncio.timeout(self.settle_timeout_s):
                while True:
                    changed.clear()
                    asleep = {id(task) for _, _, fut, task in self._sleepers if not fut.done()}
                    if all(t.done() or id(t) in asleep for t in tasks):
                        return
                    await changed.wait()
        except TimeoutError:
            busy = [t.get_name() for t in tasks if not t.done()]
            raise RuntimeError(
                f"ManualClock.advance: tasks {busy} neither slept again nor finished within "
                f"{self.settle_timeout_s:g} s after being woken"
            ) from None
        finally:
            self._changed = None

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now!r}, sleepers={self.sleepers})"
