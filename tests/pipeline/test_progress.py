"""Progress bars: done/total and a note (a training step's loss) on the terminal, and the bars of a step that runs
in a child process drawn by the `kollm run` that started it."""

from __future__ import annotations

import io
import textwrap
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

import kollm
from kollm.pipeline.progress import EventWriter, TerminalBars, progress_note, read_events, replay
from kollm.train.loop import StepLog
from kollm.train.recipe import TrainingLog


class Recorder:
    """A Progress that records each bar: description, total, items passed, the notes it got (in order)."""

    def __init__(self) -> None:
        self.bars: list[dict[str, Any]] = []
        self.local = threading.local()
        self.lock = threading.Lock()

    def __call__(self, items: Iterable[Any], *, total: int | None = None, description: str = "") -> Iterator[Any]:
        bar: dict[str, Any] = {"description": description, "total": total, "done": 0, "notes": []}
        with self.lock:
            self.bars.append(bar)
        stack = self.local.__dict__.setdefault("stack", [])
        stack.append(bar)
        try:
            for item in items:
                yield item
                bar["done"] += 1
        finally:
            stack.remove(bar)

    def note(self, **fields: Any) -> None:
        stack = self.local.__dict__.get("stack")
        if stack:
            stack[-1]["notes"].append((stack[-1]["done"], fields))


def test_terminal_bar_shows_done_total_and_the_latest_note():
    out = io.StringIO()
    bars = TerminalBars(Console(file=out, force_terminal=True, width=120, color_system=None))
    for i in bars(range(5), description="cpt"):
        if i == 3:
            progress_note(bars, loss=2.71828)
    text = out.getvalue()
    assert "cpt" in text and "3/5" in text and "loss 2.718" in text
    assert bars.display is None  # the live display ends with its last bar


def test_training_log_puts_the_loss_beside_the_bar(tmp_path):
    progress = Recorder()
    log = TrainingLog(tmp_path / "cpt.jsonl", "cpt", None, progress=progress)
    for step in progress(range(4), total=4, description="cpt"):
        if step % 2 == 1:
            log(
                StepLog(
                    step=step + 1,
                    epoch=0,
                    loss=5.0 - step,
                    learning_rate=1e-3,
                    grad_norm=1.0,
                    tokens_per_s=1.0,
                    tokens=8,
                )
            )
    assert progress.bars[0]["notes"] == [(1, {"loss": 4.0}), (3, {"loss": 2.0})]


def test_events_replay_the_bars_of_a_child_in_order():
    stream = io.StringIO()
    child = EventWriter(stream, interval=3600)  # advances only when a note or the bar's end flushes them
    for i in child(range(3), total=3, description="outer"):
        for _ in child(["a", "b"], description="inner"):
            pass
        if i == 1:
            progress_note(child, loss=1.5)
    stream.write("an ordinary line\n")
    other: list[str] = []
    parent = Recorder()
    replay(read_events(io.StringIO(stream.getvalue()), other), parent)
    assert other == ["an ordinary line\n"]
    assert [(b["description"], b["total"], b["done"]) for b in parent.bars] == [
        ("outer", 3, 3),
        ("inner", None, 2),
        ("inner", None, 2),
        ("inner", None, 2),
    ]
    assert parent.bars[0]["notes"] == [(1, {"loss": 1.5})]


STEPS_PY = """
from kollm.pipeline.progress import progress_note

def work(ctx):
    for i in ctx.progress(range(4), total=4, description=f"{ctx.name} working"):
        progress_note(ctx.progress, loss=1.0 / (i + 1))
    (ctx.output_path("m") / "done.txt").write_text(ctx.name)
    return {}
"""


def test_steps_in_child_processes_report_progress_to_the_run(tmp_path):
    """Two steps run side by side, each in a `kollm step run` child: their bars and notes reach this process."""
    root = tmp_path / "p"
    root.mkdir()
    module = f"progress_{uuid.uuid4().hex[:8]}"
    (root / f"{module}.py").write_text(STEPS_PY, encoding="utf-8")
    step = '{{kind: python, name: {n}, resources: {{cpus: 0.5}}, config: {{callable: "{m}:work", outputs: {{m: metrics}}, params: {{side: {n}}}}}}}'
    (root / "kollm.yaml").write_text(
        textwrap.dedent(f"""\
            project: progress-test
            steps:
              - {step.format(n="left", m=module)}
              - {step.format(n="right", m=module)}
            """),
        encoding="utf-8",
    )
    progress = Recorder()
    result = kollm.run(Path(root), progress=progress)
    assert not any(r.cache_hit for r in result.steps.values())
    bars = {b["description"]: b for b in progress.bars}
    assert set(bars) == {"left working", "right working"}
    for bar in bars.values():
        assert bar["total"] == 4 and bar["done"] == 4
        assert [fields["loss"] for _, fields in bar["notes"]] == [1.0, 0.5, 1 / 3, 0.25]
