"""Pydantic models for kollm.yaml. Errors name the YAML path and say how to fix it."""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, Field, RootModel, ValidationError, field_validator, model_validator

from kollm._pydantic import STRICT, mlflow_name
from kollm.errors import ConfigError

CONFIG_FILE = "kollm.yaml"
# The most YAML nodes a kollm.yaml may expand to once aliases (*name) are resolved. A real pipeline has a few
# thousand; a "billion laughs" alias bomb of a few KB expands to billions and would exhaust memory.
MAX_YAML_NODES = 200_000
MAX_YAML_DEPTH = 100  # nesting, aliases expanded (a real kollm.yaml nests fewer than 10 levels)
# libyaml's parser where PyYAML was built with it (the same events and nodes, 100x faster), else PyYAML's own
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class TrackingConfig(BaseModel):
    model_config = STRICT
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///<project>/.kollm/mlflow.db. "
        "PostgreSQL: postgresql://user@host:5432/db.",
    )
    experiment: str | None = Field(
        None, min_length=1, max_length=500, description="MLflow experiment name. Default: the project name."
    )
    artifact_location: str | None = Field(
        None,
        description="Where MLflow stores run artifacts for a new experiment (e.g. s3://bucket/kollm). Default: .kollm/mlartifacts.",
    )


class DvcSource(BaseModel):
    model_config = STRICT
    repo: str = Field(".", description="The git + DVC repository: a folder (relative to kollm.yaml) or a git URL.")
    path: str = Field(..., description="The DVC-tracked file in that repository, e.g. data/corpus.jsonl.")
    rev: str | None = Field(None, description="A git revision (tag, branch, commit). Default: the working tree.")
    remote: str | None = Field(None, description="The DVC remote to read from. Default: the repository's default.")


class DataSource(BaseModel):
    model_config = STRICT
    path: str | None = Field(
        None, description="A local file, folder or glob (relative to kollm.yaml), or an fsspec URL (s3://...)."
    )
    dvc: DvcSource | None = Field(
        None, description="A DVC-tracked file, read through DVC's API from its remote (pip install 'kollm[dvc]')."
    )
    format: Literal["auto", "txt", "jsonl", "parquet", "csv", "hf"] = Field(
        "auto", description="File format. auto: from the file extension (a folder with dataset_info.json is hf)."
    )

    @model_validator(mode="after")
    def _one_location(self) -> DataSource:
        if (self.path is None) == (self.dvc is None):
            raise ValueError("give either `path` or `dvc: {repo, path, rev}`, not both or neither")
        return self

    @property
    def location(self) -> str:
        """Where the data is, for messages: the path, or dvc://REPO/PATH@REV."""
        if self.dvc is not None:
            return f"dvc://{self.dvc.repo}/{self.dvc.path}" + (f"@{self.dvc.rev}" if self.dvc.rev else "")
        return self.path or ""


_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def memory_bytes(text: str) -> int:
    """'8Gi' -> 8 * 2**30, '512M' -> 512e6, '1024' -> 1024 (Kubernetes quantities; also 'GB', 'GiB')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]i?)?[bB]?\s*", text)
    if not m:
        raise ValueError(f"not a memory size: {text!r} (write e.g. 8Gi, 512Mi or 16G)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


class Resources(BaseModel):
    model_config = STRICT
    gpus: int = Field(0, ge=0, description="GPUs the step needs. >1 runs training on several GPUs of one host.")
    cpus: float = Field(1, gt=0, description="CPU cores the step needs (the Ray executor reserves them).")
    memory: str | None = Field(
        None, description="Memory the step needs, e.g. 8Gi (the Ray and KFP executors reserve it)."
    )
    workers: int = Field(
        1,
        ge=1,
        le=1024,
        description="Number of Ray Train workers on CPU for a training step (DDP over gloo; with the local executor: "
        "processes of this host). On GPUs the worker count is `gpus`.",
    )

    @model_validator(mode="after")
    def _workers_or_gpus(self) -> Resources:
        if self.workers > 1 and self.gpus > 0:
            raise ValueError(
                f"workers ({self.workers}) sets the number of CPU workers, but gpus ({self.gpus}) already runs one worker "
                "per GPU; drop workers or set gpus: 0"
            )
        return self


class SweepParam(BaseModel):
    """One swept setting: exactly one of choice, grid, uniform, loguniform, randint."""

    model_config = STRICT
    choice: list[Any] | None = Field(None, description="Pick one of these values at random for each trial.")
    grid: list[Any] | None = Field(
        None, description="Every value, each in its own trials (the grids' product, times `samples`)."
    )
    uniform: tuple[float, float] | None = Field(None, description="[low, high]: a float drawn uniformly.")
    loguniform: tuple[float, float] | None = Field(
        None, description="[low, high], both > 0: a float drawn uniformly in log space."
    )
    randint: tuple[int, int] | None = Field(None, description="[low, high]: an integer low <= n < high.")

    @model_validator(mode="after")
    def _one_kind(self) -> SweepParam:
        given = [k for k in ("choice", "grid", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of choice, grid, uniform, loguniform, randint"
                + (f" (got {', '.join(given)})" if given else "")
            )
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind} is empty; list at least one value")
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} bounds [{value[0]}, {value[1]}]: the low bound must be below the high bound")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform bounds [{value[0]}, {value[1]}]: both must be > 0")
        return self


class SweepSpec(BaseModel):
    """A hyperparameter search over a training step's config, run as Ray Tune trials (kollm.pipeline.sweep)."""

    model_config = STRICT
    params: dict[str, SweepParam] = Field(
        ..., min_length=1, description="Config path (lr, lora.r, ...) -> how to sample it."
    )
    metric: str = Field(
        "eval_loss", description="The step metric that picks the best finished trial (eval_loss, train_loss)."
    )
    mode: Literal["min", "max"] = Field("min", description="Whether a lower or a higher `metric` is better.")
    samples: int = Field(4, ge=1, le=1000, description="Trials to sample (times the product of the `grid` params).")
    scheduler: Literal["asha", "none"] = Field(
        "asha",
        description="asha: stop weak trials early from the training loss the loop reports as it goes; none: run every trial to the end.",
    )
    grace_period: int = Field(
        1, ge=1, description="ASHA: reports (every `log_every` steps) a trial runs before it may be stopped."
    )
    reduction_factor: int = Field(
        2, ge=2, description="ASHA: keep the best 1/reduction_factor of the trials at each rung."
    )
    max_concurrent: int = Field(2, ge=1, description="Trials running at the same time.")
    seed: int = Field(
        0,
        description="Seed for sampling the trials' values (the same seed gives the same trials, so a rerun reuses them).",
    )


class StepSpec(BaseModel):
    model_config = STRICT
    kind: str = Field(..., description="The step kind: prepare, cpt, sft, align, evaluate, register, python.")
    name: str | None = Field(None, description="A unique name for the step. Default: the kind.")
    config: dict[str, Any] = Field(
        default_factory=dict, description="The step's settings; `kollm schema` lists them per kind."
    )
    inputs: dict[str, str] = Field(
        default_factory=dict,
        description="Input name -> a data source name, an earlier step's name, or STEP.OUTPUT. "
        "Default: the latest earlier output of the type the input accepts.",
    )
    resources: Resources = Field(default_factory=Resources)
    retries: int = Field(0, ge=0, le=20, description="How often to retry the step after an unexpected error.")
    retry_backoff_s: float = Field(
        2.0, ge=0, description="Seconds before the first retry; doubled on each further retry."
    )
    sweep: SweepSpec | None = Field(
        None,
        description="A hyperparameter search (training steps): trials on Ray Tune; the best trial's outputs become the step's.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in " ./:\\")):
            raise ValueError("a step name may not be empty or contain spaces, '.', '/', ':' or '\\'")
        return v


class ExecutorConfig(BaseModel):
    model_config = STRICT
    kind: Literal["local", "ray"] = Field(
        "local", description="local: this machine; ray: steps as Ray tasks (pip install 'kollm[ray]')."
    )
    address: str | None = Field(
        None,
        description="Ray only: the cluster (auto, ray://HOST:10001). Default: a local Ray instance started for the run.",
    )


class ProjectConfig(BaseModel):
    """The whole kollm.yaml."""

    model_config = STRICT
    project: str = Field(
        ..., description="The project name (also the default MLflow experiment and registered model name)."
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    data: dict[str, DataSource] = Field(
        default_factory=dict, description="Named raw data sources, read by prepare steps."
    )
    steps: list[StepSpec] = Field(..., min_length=1, description="The pipeline: steps run in this order.")
    executor: ExecutorConfig = Field(
        default_factory=lambda: ExecutorConfig(),
        description="Which executor runs the steps: local or ray (or {kind: ray, address: ...}).",
    )

    _project_name = field_validator("project")(mlflow_name)

    @field_validator("executor", mode="before")
    @classmethod
    def _executor_shorthand(cls, v: Any) -> Any:
        return {"kind": v} if isinstance(v, str) else v


def format_loc(loc: tuple[Any, ...], prefix: str = "") -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


_EXPECTED = {
    "float_parsing": "a number",
    "float_type": "a number",
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping (key: value)",
    "list_type": "a list",
    "model_type": "a mapping (key: value)",
    "model_attributes_type": "a mapping (key: value)",
}


def pydantic_problems(err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> list[str]:
    """Turn a pydantic ValidationError into one line per problem: `steps[2].config.lr: expected a number, got "fast"`."""
    problems = []
    variants = _variants(model)
    for e in err.errors():
        loc = tuple(e["loc"])
        target = model
        if (
            variants and loc and str(loc[0]) in variants[1]
        ):  # pydantic names the chosen variant's tag first: not a YAML key
            target, loc = variants[1][str(loc[0])], loc[1:]
        where = format_loc(loc, prefix)
        typ = e["type"]
        if typ in _EXPECTED:
            problems.append(f"{where}: expected {_EXPECTED[typ]}, got {_describe(e.get('input'))}")
        elif typ == "missing":
            problems.append(f"{where}: required field is missing")
        elif (
            typ == "extra_forbidden"
            and model
            and target
            and len(loc) == 1
            and (msg := foreign_setting(model, target, str(loc[0])))
        ):
            problems.append(f"{where}: {msg}")
        elif typ == "union_tag_invalid" and variants and not loc:
            got = e["input"].get(variants[0]) if isinstance(e.get("input"), dict) else e.get("input")
            problems.append(
                f"{format_loc((variants[0],), prefix)}: expected one of {_or([repr(t) for t in variants[1]], 'or')}, got {_describe(got)}"
            )
        elif typ == "extra_forbidden":
            allowed = _allowed_keys(target, loc[:-1]) if target else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            if close:
                hint = f"did you mean '{close[0]}'?"
            elif allowed:
                hint = "allowed keys: " + ", ".join(allowed)
            else:
                hint = "remove it"
            problems.append(f"{where}: unknown key; {hint}")
        elif typ == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            problems.append(f"{where}: expected one of {expected}, got {_describe(e.get('input'))}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {msg[0].lower() + msg[1:] if msg else msg}")
    return problems


def _variants(model: type[BaseModel] | None) -> tuple[str, dict[str, type[BaseModel]]] | None:
    """For a RootModel over a union of models discriminated by a field (align's per-method configs): the field and
    {tag: model}. pydantic puts the tag of the chosen model first in an error's loc; None for any other model."""
    if not (isinstance(model, type) and issubclass(model, RootModel)):
        return None
    root = model.model_fields["root"]
    if not isinstance(root.discriminator, str):
        return None
    out: dict[str, type[BaseModel]] = {}
    for member in get_args(root.annotation):
        for tag in get_args(member.model_fields[root.discriminator].annotation):
            out[tag] = member
    return root.discriminator, out


def foreign_setting(model: type[BaseModel], chosen: type[BaseModel], key: str) -> str | None:
    """When `model` is a union of models discriminated by a field (align: one model per `method`) and `key` is a
    setting of other members but not of the `chosen` one: 'not a setting of method dpo (it belongs to grpo)'."""
    variants = _variants(model)
    if variants is None or key in chosen.model_fields:
        return None
    field, members = variants
    tags = [tag for tag, m in members.items() if m is chosen]
    owners = [tag for tag, m in members.items() if key in m.model_fields]
    if not tags or not owners:
        return None
    return f"not a setting of {field} {tags[0]} (it belongs to {_or(owners, 'and')})"


def _or(items: list[str], word: str) -> str:
    """'a', 'a or b', 'a, b or c' (pydantic's style for the expected values of a Literal)."""
    return f" {word} ".join([", ".join(items[:-1]), items[-1]]) if len(items) > 1 else "".join(items)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names of the (nested) model at `loc`, for 'did you mean' hints."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            ann = current.model_fields[part].annotation
            current = _unwrap_model(ann)
        else:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _unwrap_model(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


def find_config(path: str | os.PathLike[str] | None) -> Path:
    """The kollm.yaml for PATH: the file itself, or kollm.yaml in the folder (default: the current folder)."""
    p = Path(path) if path else Path.cwd()
    if p.is_dir():
        p = p / CONFIG_FILE
    if not p.exists():
        raise ConfigError(
            f"no {CONFIG_FILE} at {p}",
        ) from None
    return p.resolve()


def safe_load_bounded(
    text: str, *, source: str | None = None, max_nodes: int = MAX_YAML_NODES, max_depth: int = MAX_YAML_DEPTH
) -> Any:
    """yaml.safe_load that refuses a document nested deeper than `max_depth` or whose alias-expanded size exceeds
    `max_nodes` (or which refers to itself), before building any Python object. Raises ConfigError for those,
    yaml.YAMLError for bad syntax."""
    try:
        return _load_bounded(text, _Loader, source, max_nodes, max_depth)
    except yaml.YAMLError:
        if _Loader is yaml.SafeLoader:
            raise
        # bad syntax: parse again with PyYAML's own parser, for its (tested, more specific) message
        return _load_bounded(text, yaml.SafeLoader, source, max_nodes, max_depth)


def _load_bounded(text: str, loader_class: Any, source: str | None, max_nodes: int, max_depth: int) -> Any:
    _check_depth(text, max_depth, source, loader_class)
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, max_nodes, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_depth(text: str, max_depth: int, source: str | None, loader_class: Any = yaml.SafeLoader) -> None:
    """Refuse nesting deeper than `max_depth` (an alias counts as deep as what it names) from the parser's event
    stream, which is flat: composing and constructing recurse once per level and would end in a RecursionError."""
    heights: dict[str, int] = {}  # anchor -> height of its node
    open_: list[tuple[str | None, int]] = []  # per open mapping/list: its anchor, the height of its tallest child

    def child(height: int, event: yaml.Event) -> None:
        if not open_:
            return
        anchor, tallest = open_[-1]
        open_[-1] = (anchor, max(tallest, height))
        if len(open_) + height > max_depth:
            raise ConfigError(
                f"the document nests mappings and lists more than {max_depth} levels deep "
                f"(at line {event.start_mark.line + 1 if event.start_mark else '?'}, aliases expanded)",
                source=source,
                hint="flatten the structure; a kollm.yaml needs only a few levels",
            )

    loader = loader_class(text)
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                child(1, event)
                open_.append((event.anchor, 0))
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                anchor, tallest = open_.pop()
                if anchor is not None:
                    heights[anchor] = tallest + 1
                child(tallest + 1, event)
            elif isinstance(event, yaml.ScalarEvent):
                if event.anchor is not None:
                    heights[event.anchor] = 0
            elif isinstance(event, yaml.AliasEvent):
                child(heights.get(event.anchor or "", 0), event)
    finally:
        loader.dispose()


def _check_expanded_size(root: yaml.Node, max_nodes: int, source: str | None) -> None:
    """Count the nodes of the document with every alias expanded; each distinct node is sized once (memoised),
    so a bomb is measured in time linear to its text, not to its expansion."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(
                f"an alias refers to a mapping or list that contains it (line {node.start_mark.line + 1}); "
                "kollm.yaml may not be recursive",
                source=source,
            )
        active.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
                if total > max_nodes:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += size(item)
                if total > max_nodes:
                    break
        active.discard(key)
        sizes[key] = total
        if total > max_nodes:
            raise ConfigError(
                f"the document expands to more than {max_nodes:,} values once its aliases (*name) are resolved "
                f"(at line {node.start_mark.line + 1}); an alias bomb is refused",
                source=source,
                hint="repeat fewer aliases, or write the values out",
            )
        return total

    size(root)


_parsed: dict[tuple[str, int, int], Any] = {}  # (file, mtime, size) -> its YAML document


def _read_yaml(file: Path) -> Any:
    """kollm.yaml's document, parsed once per version of the file (a run reads it from several places)."""
    st = file.stat()
    key = (str(file), st.st_mtime_ns, st.st_size)
    if key not in _parsed:
        _parsed.clear()
        _parsed[key] = safe_load_bounded(file.read_text(encoding="utf-8"), source=str(file))
    return copy.deepcopy(_parsed[key])


def load_config(path: str | os.PathLike[str] | None = None) -> tuple[ProjectConfig, Path]:
    """Read and validate kollm.yaml. Returns the config and the file's path. Raises ConfigError."""
    file = find_config(path)
    try:
        raw = _read_yaml(file)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"not valid YAML{where}: {problem}", source=str(file)) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text; save the file as UTF-8", source=str(file)) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            "expected a mapping with keys project, steps (and optionally tracking, data, executor)", source=str(file)
        )
    try:
        cfg = ProjectConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(pydantic_problems(e, model=ProjectConfig), source=str(file)) from None
    return cfg, file
