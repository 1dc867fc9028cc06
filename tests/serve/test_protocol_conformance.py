"""The test FakeEngine and the native engine implement the Engine protocol the router is written against."""

from __future__ import annotations

import inspect

import pytest

from kollm.serve.engine import Engine, TransformersEngine

from .fake_engine import FakeEngine

MEMBERS = [name for name in vars(Engine) if not name.startswith("_")]


@pytest.mark.parametrize("impl", [FakeEngine, TransformersEngine])
def test_implements_every_protocol_member_with_its_signature(impl):
    assert {"generate", "encode_chat", "encode_prompt", "ready", "alive", "queue_depth", "running", "shutdown"} <= set(MEMBERS)
    for name in MEMBERS:
        want = getattr(Engine, name)
        have = getattr(impl, name)
        assert list(inspect.signature(have).parameters) == list(inspect.signature(want).parameters), name
        assert inspect.iscoroutinefunction(have) == inspect.iscoroutinefunction(want), name
        assert inspect.isasyncgenfunction(have) or name != "generate", name
    assert "context_length" in Engine.__annotations__
    assert "context_length" in vars(FakeEngine(context_length=7))
