"""Every `--help` of the kollm CLI is readable: no Python type reprs (`<list[str]>`, `<bool>`, `<path>`), which
typer prints where a parameter has no metavar, and every line fits 80 columns."""

from __future__ import annotations

import re
from typing import Any

import typer.main
from typer.testing import CliRunner

from kollm.cli import app

TYPE_REPR = re.compile(r"<(?:list\[[^\]]*\]|bool|str|int|float|path|file|dir|datetime|Path|dict[^>]*)>")


def _commands(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = [path]
    if getattr(cmd, "commands", None):  # a group (typer's own click)
        for name, sub in cmd.commands.items():
            out += _commands(sub, (*path, name))
    return out


def test_every_help_is_free_of_python_types_and_fits_80_columns():
    runner = CliRunner()
    paths = _commands(typer.main.get_command(app))
    assert ("rollout", "start") in paths and ("monitor", "config") in paths and len(paths) > 30
    for path in paths:
        r = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
        assert r.exit_code == 0, (path, r.output)
        assert "Usage:" in r.output
        junk = TYPE_REPR.findall(r.output)
        assert junk == [], f"kollm {' '.join(path)} --help shows {junk}:\n{r.output}"
        wide = [line for line in r.output.splitlines() if len(line) > 80]
        assert wide == [], f"kollm {' '.join(path)} --help: lines over 80 columns: {wide}"


def test_options_name_their_kind_and_flags_take_no_value():
    r = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert re.search(r"--force TEXT\s", r.output) and re.search(r"--quiet\s+No progress", r.output.replace("-q, ", ""))
    r = CliRunner().invoke(app, ["rollout", "start", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert "--failure-limit INTEGER" in r.output and "--probe PATH" in r.output
    assert re.search(r"^  NAME\s+The registered model name", r.output, re.M)
