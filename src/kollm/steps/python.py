"""`python`: run a user function (`callable: module:function`) as a pipeline step.

The function receives the StepContext and may return a dict of metrics (or a StepResult). Its module's
source is part of the cache key, so editing the function re-runs the step.

    - kind: python
      name: count
      config:
        callable: myproject.steps:count_rows
        outputs: {summary: metrics}
        params: {threshold: 3}
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, Field, field_validator

from kollm._pydantic import module_function
from kollm.errors import StepFailed
from kollm.pipeline.step import ARTIFACT_TYPES, STRICT, InputSpec, StepContext, StepResult

KIND = "python"
_PLAIN_NAME = re.compile(r"\w[\w-]*")


class Config(BaseModel):
    model_config = STRICT
    callable: str = Field(
        ..., description="module:function to call with the StepContext (the project folder is on sys.path)."
    )
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="Input name -> accepted artifact type (e.g. {data: corpus}); wired like any step's inputs.",
    )
    outputs: dict[str, str] = Field(
        default_factory=dict, description="Output name -> artifact type the function writes."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Free-form parameters, passed as ctx.config.params."
    )

    _module_function = field_validator("callable")(module_function)

    @field_validator("inputs", "outputs")
    @classmethod
    def _known_types(cls, v: dict[str, str]) -> dict[str, str]:
        for name, typ in v.items():
            if typ not in ARTIFACT_TYPES:
                raise ValueError(f"'{name}' has unknown artifact type '{typ}'; use one of {', '.join(ARTIFACT_TYPES)}")
        return v

    @field_validator("outputs")
    @classmethod
    def _plain_output_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:  # each names a folder inside the step's output in the store
            if not _PLAIN_NAME.fullmatch(name):
                raise ValueError(
                    f"output name '{name}' is not a plain name; use letters, digits, '_' and '-' "
                    "(no '/', '.', '..' or absolute path: it names a folder in the artifact store)"
                )
        return v


def inputs(config: Config) -> dict[str, InputSpec]:
    return {name: InputSpec((typ,)) for name, typ in config.inputs.items()}


def outputs(config: Config) -> dict[str, str]:
    return dict(config.outputs)


def code(config: Config) -> tuple[str, ...]:
    return ("kollm.steps.python", config.callable.split(":")[0])


def references(config: Config, project_dir: Path) -> dict[str, str]:
    return {}  # nothing outside its inputs, config and code


# project-local modules: the (file, mtime) each was imported from
_loaded: dict[str, tuple[str, int]] = {}


def _import(module_name: str, project_dir: Path) -> ModuleType:
    """Import a user module. One from the project folder is imported afresh when it was edited since, or when
    sys.modules holds another project's module of the same name, so the code that runs is the code hashed
    into the cache key."""
    from kollm.pipeline.spec import find_module

    found = find_module(module_name)
    origin = Path(found.origin).resolve() if found is not None and found.origin else None
    if origin is None or project_dir.resolve() not in origin.parents:
        return importlib.import_module(module_name)
    stamp = (str(origin), origin.stat().st_mtime_ns)
    if module_name in sys.modules and _loaded.get(module_name) != stamp:
        del sys.modules[module_name]
    module = importlib.import_module(module_name)
    _loaded[module_name] = stamp
    return module


def resolve(spec: str, project_dir: Path) -> Any:
    module_name, func_name = spec.split(":")
    try:
        module = _import(module_name, project_dir)
    except ImportError as e:
        raise StepFailed(f"cannot import '{module_name}' for callable '{spec}': {e}") from None
    try:
        return getattr(module, func_name)
    except AttributeError:
        raise StepFailed(f"module '{module_name}' has no function '{func_name}'") from None


def run(ctx: StepContext) -> StepResult:
    result = resolve(ctx.config.callable, ctx.project_dir)(ctx)  # load_pipeline put the project on sys.path
    if isinstance(result, StepResult):
        return result
    return StepResult(metrics={k: float(v) for k, v in (result or {}).items()})
