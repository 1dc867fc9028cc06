"""Progress beyond the bare `ctx.progress` loop wrapper (kollm.pipeline.step.Progress): notes beside a bar, and
bars of a step that runs in a child process.

- `progress_note(progress, loss=2.31)`: shows fields beside the innermost bar this thread has open with
  `progress` (a training step's latest loss). A Progress without a `note` method ignores it.
- A step in a child process (`kollm step run --progress-events`, what the local executor starts for steps that
  run side by side) draws nothing itself: `EventWriter` writes its bars as JSON lines on stderr (start, advance,
  note, end; advances at most every `interval` seconds), and the parent reads them back with `read_events` and
  draws them with its own Progress (`replay`), nested as the child opened them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

from kollm.pipeline.step import Progress

T = TypeVar("T")

# starts each event line on the child's stderr; a line without it is the child's own output
EVENT_PREFIX = "\x1ekollm-progress "


def progress_note(progress: Progress, **fields: Any) -> None:
    """Show `fields` (e.g. loss=2.31) beside the innermost bar this thread has open with `progress`."""
    note = getattr(progress, "note", None)
    if note is not None:
        note(**fields)


class EventWriter:
    """A Progress that writes its bars as event lines to `stream` (a child process's stderr) for the parent."""

    def __init__(self, stream: IO[str], interval: float = 0.2, clock: Callable[[], float] = time.monotonic):
        self.stream = stream
        self.interval = interval
        self.clock = clock
        self.lock = threading.Lock()
        self.next_id = 0
        self.local = threading.local()

    def _emit(self, event: dict[str, Any]) -> None:
        line = EVENT_PREFIX + json.dumps(event, ensure_ascii=True, default=str) + "\n"
        with self.lock:
            self.stream.write(line)
            self.stream.flush()

    def _stack(self) -> list[list[Any]]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        stack: list[list[Any]] = self.local.stack
        return stack

    def _flush(self, bar: list[Any]) -> None:
        """Send the advances a bar has not reported yet. bar: [id, pending advances, time of the last report]."""
        if bar[1]:
            self._emit({"bar": bar[0], "event": "advance", "n": bar[1]})
            bar[1], bar[2] = 0, self.clock()

    def __call__(self, items: Iterable[T], *, total: int | None = None, description: str = "") -> Iterator[T]:
        with self.lock:
            bar_id, self.next_id = self.next_id, self.next_id + 1
        self._emit({"bar": bar_id, "event": "start", "total": total, "description": description})
        bar: list[Any] = [bar_id, 0, self.clock()]
        stack = self._stack()
        stack.append(bar)
        try:
            for item in items:
                yield item
                bar[1] += 1
                if self.clock() - bar[2] >= self.interval:
                    self._flush(bar)
        finally:
            stack.remove(bar)
            self._flush(bar)
            self._emit({"bar": bar_id, "event": "end"})

    def note(self, **fields: Any) -> None:
        stack = self._stack()
        if stack:
            self._flush(stack[-1])  # the note belongs after the steps done so far
            self._emit({"bar": stack[-1][0], "event": "note", "fields": fields})


def read_events(lines: Iterable[str], other: list[str]) -> Iterator[dict[str, Any]]:
    """The progress events among a child's stderr lines; every other line is appended to `other`."""
    for line in lines:
        if line.startswith(EVENT_PREFIX):
            try:
                event = json.loads(line[len(EVENT_PREFIX) :])
            except ValueError:
                other.append(line)
                continue
            if isinstance(event, dict):
                yield event
        else:
            other.append(line)


def replay(events: Iterator[dict[str, Any]], progress: Progress) -> None:
    """Draw a child process's bars with `progress` as its events arrive; returns when `events` ends."""
    for event in events:
        if event.get("event") == "start":
            _draw(event, events, progress)


def _draw(start: dict[str, Any], events: Iterator[dict[str, Any]], progress: Progress) -> None:
    def ticks() -> Iterator[None]:
        for event in events:
            kind = event.get("event")
            if kind == "start":  # a bar inside this one
                _draw(event, events, progress)
            elif event.get("bar") != start.get("bar"):
                continue
            elif kind == "advance":
                for _ in range(int(event.get("n", 1))):
                    yield None
            elif kind == "note" and isinstance(event.get("fields"), dict):
                progress_note(progress, **event["fields"])
            elif kind == "end":
                return

    total = start.get("total")
    for _ in progress(
        ticks(), total=total if isinstance(total, int) else None, description=start.get("description") or ""
    ):
        pass


def note_text(fields: dict[str, Any]) -> str:
    """`loss 2.314 lr 0.0003`: each field's name and value (numbers to 4 significant digits)."""
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items() if v is not None)


class TerminalBars:
    """A Progress that draws rich bars on `console` (a terminal): every bar of the run in one live display (a
    step in a child process below the one in this process), each with its description, done/total, elapsed
    time and latest note (a training step's loss). A bar disappears when its loop ends."""

    def __init__(self, console: Any):
        self.console = console
        self.lock = threading.Lock()
        self.display: Any = None
        self.open = 0
        self.local = threading.local()

    def _stack(self) -> list[Any]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        stack: list[Any] = self.local.stack
        return stack

    def __call__(self, items: Iterable[T], *, total: int | None = None, description: str = "") -> Iterator[T]:
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        with self.lock:
            if self.display is None:
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
                from rich.progress import Progress as Bars

                self.display = Bars(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("{task.fields[note]}"),
                    console=self.console,
                    transient=True,
                )
                self.display.start()
            display = self.display
            task = display.add_task(description or "working", total=total, note="")
            self.open += 1
        stack = self._stack()
        stack.append(task)
        try:
            for item in items:
                yield item
                display.advance(task)
        finally:
            stack.remove(task)
            with self.lock:
                display.remove_task(task)
                self.open -= 1
                if self.open == 0:
                    display.stop()
                    self.display = None

    def note(self, **fields: Any) -> None:
        stack = self._stack()
        display = self.display
        if stack and display is not None:
            display.update(stack[-1], note=note_text(fields), refresh=True)
