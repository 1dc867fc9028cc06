"""Pydantic conventions shared by every layer: a bottom module (it imports nothing from kollm but errors).

`STRICT` is the `model_config` of every pydantic model a user writes in kollm.yaml: unknown keys are errors that
name the field, so a typo never passes silently. `kollm.pipeline.step` re-exports it for existing imports.
"""

from __future__ import annotations

import re

from pydantic import ConfigDict

# Every pydantic model of kollm.yaml forbids unknown keys, so a typo is an error that names the field.
STRICT = ConfigDict(extra="forbid")


def module_function(v: str) -> str:
    """A field validator's check of a `module:function` reference (a python step's callable, align's reward)."""
    if v.count(":") != 1 or not all(v.split(":")):
        raise ValueError(f"expected 'module:function', got \"{v}\"")
    return v


# A name kollm stores as an MLflow registered model (and experiment) name and writes into `models:/NAME@ALIAS` URIs:
# MLflow refuses '/', ':' and names that resolve to another path, and stores at most 256 characters; kollm also
# keeps out '@' (the URI's alias separator), quotes, '<', spaces and the like.
MLFLOW_NAME_MAX = 256
_MLFLOW_NAME = re.compile(r"\w[\w.\-]*")
MLFLOW_NAME_RULE = f"letters, digits, '_', '-' and '.', starting with a letter or digit, at most {MLFLOW_NAME_MAX}"


def mlflow_name(v: str | None) -> str | None:
    """A field validator's check of a name MLflow stores as a registered model name (None: the default)."""
    if v is not None and (not _MLFLOW_NAME.fullmatch(v) or v.startswith("_") or len(v) > MLFLOW_NAME_MAX):
        raise ValueError(f'"{v}" cannot be an MLflow model name; use {MLFLOW_NAME_RULE} characters')
    return v


__all__ = ["MLFLOW_NAME_RULE", "STRICT", "mlflow_name", "module_function"]
