"""`plan(pipeline, overrides) -> Plan`: the step DAG and how each step's cache key is made.

A step's key is the digest of everything its result depends on:
  - its kind and resolved config (with any `overrides` applied, e.g. a sweep trial's `sft.lr`),
  - the content digests of its inputs (data sources: every matched file; earlier steps: their output bytes,
    without metadata files such as kollm.json or stats.json),
  - the source of its code (the modules its kind names, or a `python` step's module),
  - the external references its kind declares: the registry version an alias such as `champion` points at
    (evaluate), the content digest of a local `base_model` folder or a hub model's cached revision (training).
Nothing else: run ids, times and counters live in MLflow and in metadata files outside the digest, so a change
that leaves a step's outputs byte-identical stops the cascade at that step.

Planning has no side effects; it reads kollm.yaml, the data sources' files and the registry.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kollm.config import pydantic_problems
from kollm.errors import ConfigError
from kollm.pipeline.artifacts import json_digest
from kollm.pipeline.spec import Pipeline, ResolvedStep, find_module, resolve_source
from kollm.pipeline.step import Artifact, parse_config

KEY_FORMAT = 2  # bump when the way keys are made changes: every step is then recomputed once


@dataclass
class Plan:
    pipeline: Pipeline
    steps: list[ResolvedStep]  # in file order, with overrides applied
    deps: dict[str, list[str]]  # step -> the earlier steps whose outputs it reads
    references: dict[str, dict[str, str]]  # step -> its external references (alias versions, base model digests)
    sources: dict[str, Artifact] = field(default_factory=dict)  # data sources by name, digested
    overrides: dict[str, Any] = field(default_factory=dict)  # what plan() was given, for child processes

    def step(self, name: str) -> ResolvedStep:
        return next(s for s in self.steps if s.name == name)

    def ancestors(self, name: str) -> list[str]:
        """Every step `name` depends on, directly or not, in file order."""
        seen: set[str] = set()
        todo = list(self.deps[name])
        while todo:
            d = todo.pop()
            if d not in seen:
                seen.add(d)
                todo.extend(self.deps[d])
        return [s.name for s in self.steps if s.name in seen]

    def key(self, step: ResolvedStep, inputs: dict[str, Artifact]) -> str:
        return step_key(step, inputs, self.references[step.name])

    def inputs(self, step: ResolvedStep, outputs: dict[str, dict[str, Artifact]]) -> dict[str, Artifact]:
        """The step's inputs: data sources, and the outputs of finished earlier steps (`outputs[step][name]`)."""
        return {
            k: self.sources[ref.source] if ref.source is not None else outputs[ref.step or ""][ref.output or ""]
            for k, ref in step.inputs.items()
        }

    def input_uris(self, step: ResolvedStep, outputs: dict[str, dict[str, Artifact]]) -> dict[str, str]:
        """The `--input NAME=URI` of `kollm step run` for the step: earlier steps' output folders (data sources are
        read by the step itself, as kollm.yaml names them)."""
        return {
            k: a.path.as_uri()
            for k, a in self.inputs(step, outputs).items()
            if step.inputs[k].step is not None and a.path is not None
        }


def plan(pipeline: Pipeline, overrides: dict[str, Any] | None = None, *, steps: list[str] | None = None) -> Plan:
    """The DAG of `pipeline` with `overrides` ({"STEP.config.path": value}) applied and each step's external
    references resolved. `steps` limits which data sources and references are resolved (default: all)."""
    resolved = apply_overrides(pipeline, overrides or {})
    deps = {s.name: sorted({ref.step for ref in s.inputs.values() if ref.step is not None}) for s in resolved}
    wanted = set(steps) if steps is not None else {s.name for s in resolved}
    sources: dict[str, Artifact] = {}
    references: dict[str, dict[str, str]] = {}
    for s in resolved:
        if s.name not in wanted:
            references[s.name] = {}
            continue
        for ref in s.inputs.values():
            if ref.source is not None and ref.source not in sources:
                sources[ref.source] = resolve_source(ref.source, pipeline.cfg.data[ref.source], pipeline.project_dir)
        references[s.name] = dict(s.module.references(s.config, pipeline.project_dir))
    return Plan(
        pipeline=pipeline,
        steps=resolved,
        deps=deps,
        references=references,
        sources=sources,
        overrides=dict(overrides or {}),
    )


def apply_overrides(pipeline: Pipeline, overrides: dict[str, Any]) -> list[ResolvedStep]:
    """The pipeline's steps with config values replaced: {"sft.lr": 1e-3, "sft.lora.r": 16} (STEP.PATH)."""
    by_step: dict[str, dict[str, Any]] = {}
    names = [s.name for s in pipeline.steps]
    problems = []
    for path, value in overrides.items():
        step, _, rest = path.partition(".")
        if step not in names or not rest:
            problems.append(f"override {path}: expected STEP.FIELD with STEP one of {', '.join(names)}")
            continue
        by_step.setdefault(step, {})[rest] = value
    out = []
    for s in pipeline.steps:
        if s.name not in by_step:
            out.append(s)
            continue
        raw = copy.deepcopy(s.config.model_dump(mode="json", exclude_unset=True))
        for dotted, value in by_step[s.name].items():
            node = raw
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    problems.append(f"override {s.name}.{dotted}: '{p}' is not a mapping")
                    break
            else:
                node[leaf] = value
        try:
            config = parse_config(s.module.Config, raw)
        except ValidationError as e:
            problems.extend(pydantic_problems(e, prefix=f"override {s.name}", model=s.module.Config))
            continue
        out.append(replace(s, config=config))
    if problems:
        raise ConfigError(problems)
    return out


def step_key(step: ResolvedStep, inputs: dict[str, Artifact], references: dict[str, str]) -> str:
    parts = {
        "format": KEY_FORMAT,
        "kind": step.kind,
        "config": step.config.model_dump(mode="json"),
        "inputs": {k: a.digest for k, a in sorted(inputs.items())},
        "code": code_digest(step.module.code(step.config)),
        "references": dict(sorted(references.items())),
    }
    if step.sweep is not None:  # a swept step's result is its best trial: the search settings and code are part of it
        parts["sweep"] = step.sweep.model_dump(mode="json")
        parts["sweep_code"] = code_digest(("kollm.pipeline.sweep",))
    return json_digest(parts)[:32]


_code_cache: dict[str, str] = {}


def code_digest(modules: tuple[str, ...]) -> str:
    """Digest of the source files of `modules` (a package: every .py below it)."""
    parts = []
    for mod in sorted(modules):
        spec = find_module(mod)
        if spec is None or spec.origin is None and not spec.submodule_search_locations:
            raise ConfigError(f"cannot find module '{mod}'")
        if spec.submodule_search_locations:
            files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).rglob("*.py"))
        else:
            files = [Path(str(spec.origin))]
        for f in files:
            st = f.stat()
            ck = f"{f}:{st.st_size}:{st.st_mtime_ns}"
            if ck not in _code_cache:
                _code_cache[ck] = json_digest(f.read_bytes().decode("utf-8", "replace"))
            parts.append((mod, f.name, _code_cache[ck]))
    return json_digest(parts)
