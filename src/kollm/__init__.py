"""kollm: from a Korean text corpus to a safely rolled-out LLM with one declarative file.

The Python API mirrors the CLI:
    kollm.load(path)      -> the validated, wired Pipeline (what `kollm validate` checks)
    kollm.run(path, ...)  -> RunResult (what `kollm run` does)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kollm._version import __version__ as __version__

if TYPE_CHECKING:
    from kollm.pipeline.runner import RunResult
    from kollm.pipeline.spec import Pipeline


def load(path: str | Path | None = None) -> Pipeline:
    """Load, validate and wire kollm.yaml (a file or its folder). Raises kollm.errors.ConfigError."""
    from kollm.pipeline.spec import load_pipeline

    return load_pipeline(path)


def run(path: str | Path | None = None, **kwargs: Any) -> RunResult:
    """Run the pipeline; see kollm.executors.run for the options (force, from_step, only, executor, store, ...)."""
    from kollm.executors import run as _run

    return _run(path, **kwargs)
