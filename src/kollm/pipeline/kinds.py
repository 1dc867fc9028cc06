"""The step kinds a `kind:` names: kind -> the module that implements it (each follows kollm.pipeline.step's
contract). The pipeline resolves kinds here by module name, so it imports no step module (the layer above) before a
pipeline uses it; torch and the other heavy packages load only with the steps that need them."""

from __future__ import annotations

import importlib
from types import ModuleType

from kollm.errors import ConfigError

KINDS: dict[str, str] = {
    "prepare": "kollm.steps.prepare",
    "cpt": "kollm.steps.cpt",
    "sft": "kollm.steps.sft",
    "align": "kollm.steps.align",
    "evaluate": "kollm.steps.evaluate",
    "register": "kollm.steps.register",
    "python": "kollm.steps.python",
}


def load_kind(kind: str, where: str = "kind") -> ModuleType:
    """The module of a step kind; an unknown kind is a ConfigError that lists the known ones."""
    if kind not in KINDS:
        import difflib

        close = difflib.get_close_matches(kind, list(KINDS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "known kinds: " + ", ".join(KINDS)
        raise ConfigError(f"{where}: unknown step kind '{kind}'; {hint}")
    return importlib.import_module(KINDS[kind])
