"""The contract between the runner and a step kind.

A step kind is a module in `kollm.steps` (one file per kind, readable top to bottom) that defines:

    KIND: str                                  # the `kind:` users write in kollm.yaml
    class Config(pydantic.BaseModel): ...       # the step's `config:` block; use `model_config = STRICT`
                                               # (or a RootModel over a discriminated union of models: see parse_config)
    def inputs(config) -> dict[str, InputSpec]  # named inputs and the artifact types they accept
    def outputs(config) -> dict[str, str]       # output name -> artifact type
    def code(config) -> tuple[str, ...]         # modules/packages whose source is hashed into the cache key
    def run(ctx: StepContext) -> StepResult     # do the work; write each output into ctx.output_path(name)

Steps share this Protocol (`StepKind` below), not a base class. The runner owns caching, atomic writes, retries, tracking
and wiring: a step only reads `ctx.inputs`, writes files under `ctx.output_path(name)` and returns metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, RootModel

from kollm._pydantic import STRICT as STRICT

if TYPE_CHECKING:
    from kollm.config import Resources
    from kollm.pipeline.lease import Lease
    from kollm.pipeline.tracking import StepTracker

# STRICT lives in the bottom module kollm._pydantic (config, data, eval, train use it without the pipeline contract);
# re-exported here so step kinds keep importing it with the rest of the contract.

# Artifact types. Datasets: "corpus" (text), "instructions" (chat messages), "preferences"
# (prompt/chosen/rejected). "model": a Hugging Face folder. "metrics": metrics.json. "report": HTML and JSON.
# "source": a raw data source from the `data:` section of kollm.yaml (input of `prepare`).
ARTIFACT_TYPES = ("source", "corpus", "instructions", "preferences", "model", "metrics", "report")
DATASET_TYPES = ("corpus", "instructions", "preferences")

ARTIFACT_META_FILE = "kollm-artifact.json"
# Files that describe an artifact rather than hold it: run ids, times, counters, lineage. They are not part of its
# content digest, so a re-run whose data or weights come out byte-identical has the same digest and later steps
# stay cached (a model's kollm.json names the pipeline run; a dataset's stats.json counts rejected rows).
METADATA_FILES = frozenset({ARTIFACT_META_FILE, "kollm.json", "stats.json"})

T = TypeVar("T")


@dataclass(frozen=True)
class Artifact:
    """A typed, content-addressed output of a step (or a raw data source).

    `path` is a folder (for a "source": the folder the files were matched in, or None for a URL);
    `digest` is "sha256:<hex>" over the folder's files (names and bytes); `meta` is small JSON
    (row counts, stats, base model, ...) that the producing step returned in `StepResult.meta`.
    """

    type: str
    path: Path | None
    digest: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "path": str(self.path) if self.path else None,
            "digest": self.digest,
            "meta": self.meta,
        }

    def folder(self) -> Path:
        """`path`, for an artifact that has one: every step output does, only a URL source has none."""
        if self.path is None:
            raise ValueError(f"the {self.type} artifact {self.digest} has no local folder (a URL source)")
        return self.path


@dataclass(frozen=True)
class InputSpec:
    """A named input of a step kind: which artifact types it accepts and whether it may be absent."""

    types: tuple[str, ...]
    optional: bool = False
    help: str = ""


@dataclass
class StepResult:
    """What `run` returns: final metrics (logged to MLflow) and per-output metadata stored with the artifact."""

    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class StepRecord:
    """A finished step of the current pipeline run, visible to later steps (for lineage)."""

    name: str
    kind: str
    key: str
    run_id: str | None  # the step's nested MLflow run
    cache_hit: bool
    outputs: dict[str, Artifact]
    metrics: dict[str, float]


class Progress(Protocol):
    def __call__(self, items: Iterable[T], *, total: int | None = None, description: str = "") -> Iterator[T]: ...


@runtime_checkable
class StepKind(Protocol):
    """What a step kind module defines (a module satisfies this Protocol; tests check every kind against it)."""

    KIND: str
    Config: type[BaseModel]

    def inputs(self, config: Any) -> dict[str, InputSpec]: ...

    def outputs(self, config: Any) -> dict[str, str]: ...

    def code(self, config: Any) -> tuple[str, ...]: ...

    def references(self, config: Any, project_dir: Path) -> dict[str, str]: ...

    def run(self, ctx: StepContext) -> StepResult | None: ...


def parse_config(model: type[BaseModel], raw: Any) -> BaseModel:
    """A step's config from its `config:` mapping (raises pydantic's ValidationError). A kind whose settings differ
    by variant (align: one model per `method`) makes `Config` a RootModel over a discriminated union of models;
    its step functions then receive the chosen variant's model, not the RootModel around it."""
    config = model.model_validate(raw)
    return config.root if isinstance(config, RootModel) else config


def _no_progress(items: Iterable[T], *, total: int | None = None, description: str = "") -> Iterator[T]:
    yield from items


@dataclass
class StepContext:
    """Everything a step may use. Created by the runner for one attempt of one step."""

    name: str
    kind: str
    config: Any  # the step module's Config instance
    inputs: dict[str, Artifact]  # resolved inputs; an absent optional input is not in the dict
    output_dir: Path  # a fresh, empty temporary folder; the runner renames it into the cache when run() returns
    checkpoint_dir: Path  # stable for this cache key across attempts and crashes: training resumes from here
    project_dir: Path  # the folder with kollm.yaml
    state_dir: Path  # <project>/.kollm
    tracker: StepTracker  # the step's nested MLflow run
    run_id: str | None  # the parent (pipeline) MLflow run id
    upstream: list[StepRecord]  # earlier steps of this pipeline run, in order
    resources: Resources  # the step's `resources:` block (gpus, cpus, memory)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("kollm.step"))
    progress: Progress = _no_progress  # wrap long loops: `for x in ctx.progress(xs, total=n, description="...")`
    key: str = ""  # this step's cache key (register tags the version it creates with it)
    attempt: int = 0  # 0 for the first try, 1 for the first retry, ...
    executor: str = (
        "local"  # which executor runs this attempt: "local" or "ray" (prepare uses Ray Data, training Ray Train)
    )
    checkpoint_remote: str | None = None  # the artifact store's folder for this key's checkpoints (remote stores)
    lease: Lease | None = None  # this attempt's lease on the checkpoint folder; ends when the step is published

    def output_path(self, name: str) -> Path:
        """The folder to write output `name` into (created on first use)."""
        path = self.output_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def logs_dir(self, category: str) -> Path:
        """`.kollm/logs/<category>/` (training, inference, system, api), created on first use."""
        path = self.state_dir / "logs" / category
        path.mkdir(parents=True, exist_ok=True)
        return path
