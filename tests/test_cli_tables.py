"""Every table the CLI prints fits the terminal's width ($COLUMNS) without breaking a word: a value too long for
its column ends in an ellipsis (the full value is in --json). Each table is rendered at 80 and 120 columns with
long run ids, paths, model names, gate texts and many metrics. (`runs` and `show` as commands of a real run at 80
and 120 columns: tests/test_cli_health.py.)"""

from __future__ import annotations

import re
from datetime import datetime
from types import SimpleNamespace as NS

import pytest
from typer.testing import CliRunner

from kollm import cli
from kollm.pipeline.history import RunRow, StepRow
from tests.pipeline.helpers import make_project

RUN_ID = "0123456789abcdef0123456789abcdef"
LONG_MODEL = "LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct-with-a-very-long-name"
GATE = "passed: perplexity<=200, regex>=0.8, judge_win_rate>=0.5"
METRICS = ", ".join(f"metric_number_{i}={i * 1.2345:.4g}" for i in range(20))


def _tables():
    step = StepRow(
        "continued_pretraining",
        "cpt",
        "FINISHED",
        "miss",
        "74.2s",
        "ab12cd34ef56",
        "model: sha256:0123456789abcdef0123456789abcdef01234567",
        METRICS,
    )
    swept = StepRow(
        "sft",
        "sft",
        "FINISHED",
        "miss",
        "1s",
        "k",
        "",
        "",
        sweep_metric="eval_loss (min)",
        trials=[
            {
                "trial": 0,
                "status": "TERMINATED",
                "metric": 1.2345,
                "values": {"learning_rate": 0.0003, "lora_r": 16, "warmup_ratio": 0.1},
                "iterations": 3,
                "key": "0123456789abcdef",
                "run_id": RUN_ID,
            }
        ],
    )
    tags = {
        "kollm.gate": GATE,
        "kollm.metric.perplexity": "123.4",
        "kollm.base_model": LONG_MODEL,
        "kollm.pipeline_run_id": RUN_ID,
        "kollm.description": "설명 " * 200,
    }
    version = NS(version="12", aliases=["champion", "previous"], created=datetime(2026, 12, 7, 19, 0), tags=tags)
    feature = NS(psi=0.1234, ks_statistic=0.2, ks_pvalue=0.01, reference_mean=12.3, current_mean=14.5, drifted=True)
    drift = NS(window_requests=120, window="24h", reference_rows=5000, features={"hangul_ratio": feature})
    return {
        "runs": (cli.runs_table([RunRow(RUN_ID, "2026-12-07 19:20:01", "FINISHED", 7, 6, "12.3s")]), [RUN_ID]),
        "show": (cli.steps_table([step]), [step.name, step.outputs, METRICS]),
        "trials": (cli.trials_table(swept), [RUN_ID, "learning_rate=0.0003,"]),
        "registry list": (cli.versions_table("korean-quickstart", [version]), [LONG_MODEL, GATE, RUN_ID]),
        "registry show": (cli.tags_table(tags), [LONG_MODEL, tags["kollm.description"]]),
        "monitor drift": (cli.drift_table(drift), ["hangul_ratio", "drifted"]),
    }


def _words(table, long_values: list[str]) -> set[str]:
    """Every whole word that may appear: the cells, headers and title."""
    words = set(str(table.title or "").split())
    for col in table.columns:
        words |= set(str(col.header).split())
        for cell in col.cells:
            words |= set(str(cell).split())
    for value in long_values:
        words |= set(value.split())
    return words


def check_rendering(text: str, width: int, words: set[str]) -> None:
    lines = text.splitlines()
    assert lines and max(len(line) for line in lines) <= width, text
    for token in text.split():
        if set(token) <= set("─━│┃┏┓┗┛┡┩╇┳┻╋┠┨┯┷┼"):
            continue
        if token in words or token == "…":
            continue
        # a word cut to fit ends in an ellipsis and starts like a real word; never a word's tail on its own line
        assert token.endswith("…") and any(w.startswith(token[:-1]) for w in words), (
            f"{token!r} is a broken word at {width} columns:\n{text}"
        )


@pytest.mark.parametrize("width", [80, 120])
def test_every_table_fits_and_cuts_long_values_with_an_ellipsis(width, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", str(width))
    for name, (table, long_values) in _tables().items():
        cli.print_table(table)
        text = capsys.readouterr().out
        check_rendering(text, width, _words(table, long_values))
        if name != "monitor drift":
            assert "…" in text, f"{name}: no value was cut at {width} columns:\n{text}"


def test_wider_terminals_show_more(monkeypatch, capsys):
    shown = {}
    for width in (80, 120):
        monkeypatch.setenv("COLUMNS", str(width))
        cli.print_table(_tables()["show"][0])
        shown[width] = capsys.readouterr().out
    assert "continued_pretraining" in shown[120] and "continued_pretraining" not in shown[80]
    assert len(re.findall(r"metric_number_\d+=", shown[120])) >= len(re.findall(r"metric_number_\d+=", shown[80]))


def test_clip_cuts_at_a_separator_and_says_so():
    assert cli.clip("short", 10) == "short"
    assert cli.clip("a=1, bb=2, ccc=3, dddd=4", 16) == "a=1, bb=2 …"
    assert len(cli.clip("x" * 50, 20)) <= 21 and cli.clip("x" * 50, 20).endswith("…")


@pytest.mark.parametrize("width", [80, 120])
def test_validate_table(tmp_path, width):
    root = make_project(tmp_path / "p")
    r = CliRunner().invoke(cli.app, ["validate", str(root)], env={"COLUMNS": str(width)})
    assert r.exit_code == 0, r.output
    table = r.output.split("ok ")[0]
    assert max(len(line) for line in table.splitlines()) <= width, r.output
    assert "count" in table and "python" in table
