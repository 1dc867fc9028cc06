"""Pydantic conventions shared by every layer: a bottom module (it imports nothing from kollm but errors).

`STRICT` is the `model_config` of every pydantic model a user writes in kollm.yaml: unknown keys are errors that
name the field, so a typo never passes silently. `kollm.pipeline.step` re-exports it for existing imports.
"""

from __future__ import annotations

from pydantic import ConfigDict

# Every pydantic model of kollm.yaml forbids unknown keys, so a typo is an error that names the field.
STRICT = ConfigDict(extra="forbid")


def module_function(v: str) -> str:
    """A field validator's check of a `module:function` reference (a python step's callable, align's reward)."""
    if v.count(":") != 1 or not all(v.split(":")):
        raise ValueError(f"expected 'module:function', got \"{v}\"")
    return v


__all__ = ["STRICT", "module_function"]
