"""The tests' one FakeEngine (tests/serve/fake_engine.py) and the native engine implement the Engine protocol the
router is written against: member by member with inspect, at runtime (a runtime-checkable copy of the protocol),
and statically (mypy accepts a FakeEngine where an Engine is expected)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Protocol, runtime_checkable

import pytest

from kollm.serve.engine import Engine, TransformersEngine

from .fake_engine import FakeEngine, versioned

ROOT = Path(__file__).resolve().parents[2]

MEMBERS = [name for name in vars(Engine) if not name.startswith("_")]


@pytest.mark.parametrize("impl", [FakeEngine, TransformersEngine])
def test_implements_every_protocol_member_with_its_signature(impl):
    expected = {"generate", "encode_chat", "encode_prompt", "ready", "alive", "queue_depth", "running", "shutdown"}
    assert expected <= set(MEMBERS)
    for name in MEMBERS:
        want = getattr(Engine, name)
        have = getattr(impl, name)
        assert list(inspect.signature(have).parameters) == list(inspect.signature(want).parameters), name
        assert inspect.iscoroutinefunction(have) == inspect.iscoroutinefunction(want), name
        assert inspect.isasyncgenfunction(have) or name != "generate", name
    assert "context_length" in Engine.__annotations__
    assert "context_length" in vars(FakeEngine(context_length=7))


@runtime_checkable
class CheckedEngine(Engine, Protocol):
    """kollm.serve.engine.Engine, runtime-checkable (the protocol itself is left as it is)."""


def test_the_fake_engine_matches_the_protocol_exactly():
    for name in MEMBERS:
        want, have = inspect.signature(getattr(Engine, name)), inspect.signature(getattr(FakeEngine, name))
        shape = [(p.name, p.kind, p.default) for p in want.parameters.values()]
        assert [(p.name, p.kind, p.default) for p in have.parameters.values()] == shape, name
        assert typing.get_type_hints(getattr(FakeEngine, name)) == typing.get_type_hints(getattr(Engine, name)), name
    for engine in (FakeEngine(), versioned("2")):
        assert isinstance(engine, CheckedEngine) and isinstance(engine.context_length, int)

    class NoProbe(FakeEngine):
        alive = None  # type: ignore[assignment]

    assert not isinstance(NoProbe(), CheckedEngine)  # the runtime check does look at the members


def test_mypy_accepts_the_fake_engine_as_an_engine(tmp_path):
    mypy = Path(sys.executable).parent / "mypy"
    if not mypy.exists():
        pytest.skip("mypy is not installed (the dev extra)")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from kollm.serve.engine import Engine\n"
        "from tests.serve.fake_engine import FakeEngine, versioned\n\n"
        "engine: Engine = FakeEngine()\ncanary: Engine = versioned('2')\n",
        encoding="utf-8",
    )
    # Only the two modules are analysed (follow-imports=skip: torch and transformers would take minutes).
    fake = str(ROOT / "tests" / "serve" / "fake_engine.py")
    files = [str(ROOT / "src" / "kollm" / "serve" / "engine.py"), fake, str(probe)]
    r = subprocess.run(
        [
            str(mypy),
            "--config-file",
            os.devnull,
            "--no-incremental",
            "--follow-imports=skip",
            "--ignore-missing-imports",
            "--cache-dir",
            str(tmp_path / "cache"),
            *files,
        ],
        env={**os.environ, "MYPYPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    ours = [line for line in r.stdout.splitlines() if line.startswith((str(probe), fake, "probe.py", "tests/"))]
    assert ours == [] and "error" not in r.stderr, r.stdout + r.stderr
