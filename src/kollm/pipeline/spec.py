"""Load kollm.yaml, lint the pipeline and wire each step's inputs to data sources and earlier outputs.

Every problem found is reported at once, each naming its YAML path and how to fix it (like Metaflow's lint).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from importlib.machinery import ModuleSpec, PathFinder
from types import ModuleType

from pydantic import BaseModel, ValidationError

from kollm.config import DataSource, ProjectConfig, Resources, SweepSpec, load_config, pydantic_problems
from kollm.errors import ConfigError, KollmError
from kollm.pipeline.artifacts import file_digest, files_digest
from kollm.pipeline.step import Artifact, InputSpec, parse_config
from kollm.pipeline.kinds import load_kind


@dataclass(frozen=True)
class InputRef:
    """Where an input comes from: a data source (`step` is None) or an output of an earlier step."""

    source: str | None = None
    step: str | None = None
    output: str | None = None

    def __str__(self) -> str:
        return f"data.{self.source}" if self.source else f"{self.step}.{self.output}"


@dataclass
class ResolvedStep:
    index: int
    name: str
    kind: str
    module: ModuleType
    config: BaseModel
    inputs: dict[str, InputRef]
    outputs: dict[str, str]  # output name -> artifact type
    retries: int
    retry_backoff_s: float
    resources: Resources
    sweep: SweepSpec | None = None  # a hyperparameter search over this step (kollm.pipeline.sweep)

    @property
    def where(self) -> str:
        return f"steps[{self.index}] ({self.name})"


@dataclass
class Pipeline:
    cfg: ProjectConfig
    file: Path
    project_dir: Path
    steps: list[ResolvedStep]

    @property
    def state_dir(self) -> Path:
        return self.project_dir / ".kollm"


def load_pipeline(path: str | Path | None = None) -> Pipeline:
    """Read, validate and wire kollm.yaml. Raises ConfigError listing every problem."""
    cfg, file = load_config(path)
    project_dir = file.parent
    # `python` steps import user modules from the project folder: this project's folder goes first
    if str(project_dir) in sys.path:
        sys.path.remove(str(project_dir))
    sys.path.insert(0, str(project_dir))
    problems: list[str] = []

    for name, src in cfg.data.items():
        try:
            resolve_source(name, src, project_dir, digest=False)
        except ConfigError as e:
            problems.extend(e.problems)

    steps: list[ResolvedStep] = []
    names: dict[str, int] = {}
    for i, spec in enumerate(cfg.steps):
        name = spec.name or spec.kind
        where = f"steps[{i}]"
        if name in names:
            problems.append(
                f"{where}: a step named '{name}' already exists at steps[{names[name]}]; give each step a unique `name:`"
            )
            continue
        names[name] = i
        try:
            module = load_kind(spec.kind, where=f"{where}.kind")
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        try:
            config = parse_config(module.Config, spec.config)
        except ValidationError as e:
            problems.extend(pydantic_problems(e, prefix=f"{where}.config", model=module.Config))
            continue
        try:
            _check_code(module.code(config))  # a `python` step's user module must exist before anything runs
        except ConfigError as e:
            problems.extend(f"{where}.config: {p}" for p in e.problems)
            continue
        if spec.sweep is not None:  # sweep hook: parameter paths, values and metric checked against the step's Config
            from kollm.pipeline.sweep import check_sweep

            problems.extend(check_sweep(spec.sweep, spec.kind, module.Config, config, where=f"{where}.sweep"))
        in_specs: dict[str, InputSpec] = module.inputs(config)
        wired, wire_problems = _wire(where, i, name, in_specs, spec.inputs, cfg, steps)
        problems.extend(wire_problems)
        steps.append(
            ResolvedStep(
                index=i,
                name=name,
                kind=spec.kind,
                module=module,
                config=config,
                inputs=wired,
                outputs=module.outputs(config),
                retries=spec.retries,
                retry_backoff_s=spec.retry_backoff_s,
                resources=spec.resources,
                sweep=spec.sweep,
            )
        )
    if problems:
        raise ConfigError(problems, source=str(file))
    return Pipeline(cfg=cfg, file=file, project_dir=project_dir, steps=steps)


def find_module(name: str) -> ModuleSpec | None:
    """Where `name` would be imported from now. Top-level names are searched on sys.path afresh, because
    sys.modules may still hold a module of that name from another project opened in this process."""
    try:
        return (PathFinder.find_spec(name) if "." not in name else None) or importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None


def _check_code(modules: tuple[str, ...]) -> None:
    for mod in modules:
        if find_module(mod) is None:
            raise ConfigError(f"cannot find module '{mod}' (is it in the project folder or installed?)")


def _wire(
    where: str,
    index: int,
    name: str,
    in_specs: dict[str, InputSpec],
    explicit: dict[str, str],
    cfg: ProjectConfig,
    earlier: list[ResolvedStep],
) -> tuple[dict[str, InputRef], list[str]]:
    problems: list[str] = []
    wired: dict[str, InputRef] = {}
    for key in explicit:
        if key not in in_specs:
            known = ", ".join(in_specs) or "none"
            problems.append(f"{where}.inputs.{key}: step kind has no input '{key}' (its inputs: {known})")
    for input_name, spec in in_specs.items():
        accepted = " or ".join(spec.types)
        if input_name in explicit:
            ref, problem = _parse_ref(explicit[input_name], spec, cfg, earlier, index)
            if ref is None:  # then `problem` says why
                problems.append(f"{where}.inputs.{input_name}: {problem}")
            else:
                wired[input_name] = ref
            continue
        ref = _default_ref(spec, cfg, earlier)
        if ref is not None:
            wired[input_name] = ref
        elif not spec.optional:
            if spec.types == ("source",):
                hint = (
                    f"name a data source, e.g. `inputs: {{{input_name}: {next(iter(cfg.data))}}}`"
                    if cfg.data
                    else "add a `data:` section with a source and name it in `inputs:`"
                )
                problems.append(
                    f"{where}.inputs.{input_name}: needs a data source and {'several' if cfg.data else 'none'} exist; {hint}"
                )
            else:
                problems.append(
                    f"{where}.inputs.{input_name}: needs an artifact of type {accepted} and no earlier step produces one; "
                    f"add a step that does before '{name}' or set `inputs: {{{input_name}: STEP}}`"
                )
    return wired, problems


def _default_ref(spec: InputSpec, cfg: ProjectConfig, earlier: list[ResolvedStep]) -> InputRef | None:
    if "source" in spec.types and len(cfg.data) == 1:
        return InputRef(source=next(iter(cfg.data)))
    for step in reversed(earlier):
        for out, typ in step.outputs.items():
            if typ in spec.types:
                return InputRef(step=step.name, output=out)
    return None


def _parse_ref(
    text: str, spec: InputSpec, cfg: ProjectConfig, earlier: list[ResolvedStep], index: int
) -> tuple[InputRef | None, str | None]:
    accepted = " or ".join(spec.types)
    by_name = {s.name: s for s in earlier}
    step_name, _, output = text.partition(".")
    if text.startswith("data."):
        step_name, output = "", ""
        text = text.removeprefix("data.")
    if step_name in by_name:
        step = by_name[step_name]
        if output:
            if output not in step.outputs:
                return (
                    None,
                    f"step '{step_name}' has no output '{output}' (its outputs: {', '.join(step.outputs) or 'none'})",
                )
            if step.outputs[output] not in spec.types:
                return None, f"'{text}' is of type {step.outputs[output]}, but this input needs {accepted}"
            return InputRef(step=step_name, output=output), None
        matches = [o for o, t in step.outputs.items() if t in spec.types]
        if not matches:
            return (
                None,
                f"step '{step_name}' produces no {accepted} (its outputs: {', '.join(f'{o}: {t}' for o, t in step.outputs.items()) or 'none'})",
            )
        return InputRef(step=step_name, output=matches[0]), None
    if text in cfg.data:
        if "source" not in spec.types:
            return (
                None,
                f"'{text}' is a raw data source, but this input needs {accepted}; name the prepare step that reads it instead",
            )
        return InputRef(source=text), None
    if any((s.name or s.kind) == step_name for s in cfg.steps[index:]):
        return None, f"step '{step_name}' runs later; an input can only come from an earlier step"
    if any((s.name or s.kind) == step_name for s in cfg.steps[:index]):
        return None, f"step '{step_name}' is not valid (see its own errors), so its outputs cannot be wired"
    options = [s.name for s in earlier] + list(cfg.data)
    return None, f"'{text}' is neither an earlier step nor a data source (known: {', '.join(options) or 'none'})"


# --- data sources -------------------------------------------------------------------------------

_digest_cache: dict[tuple[str, int, int], str] = {}


def _local_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _digest_cache:
        _digest_cache[key] = file_digest(path)
    return _digest_cache[key]


def resolve_source(name: str, src: DataSource, project_dir: Path, *, digest: bool = True) -> Artifact:
    """Match a data source's files. Its digest covers every matched file, so changed data invalidates the cache."""
    where = f"data.{name}.path"
    if src.dvc is not None:
        return _dvc_source(name, src, project_dir, digest)
    assert src.path is not None  # DataSource's validator: a path or a dvc reference
    if "://" in src.path and not src.path.startswith("file://"):
        return _remote_source(name, src, digest)
    raw = src.path.removeprefix("file://")
    base = Path(raw) if Path(raw).is_absolute() else project_dir / raw
    fmt = src.format
    if any(c in raw for c in "*?["):
        root = base.parent
        while any(c in str(root) for c in "*?["):
            root = root.parent
        pattern = base.relative_to(root).parts
        files = sorted(p for p in walk_files(root) if _glob_match(p.relative_to(root).parts, pattern))
        if not files:
            raise ConfigError(f"{where}: no file matches '{src.path}' (relative to {project_dir})")
    elif base.is_dir():
        if (base / "dataset_info.json").exists() or (base / "state.json").exists():
            fmt = "hf" if fmt == "auto" else fmt
        files = sorted(
            p for p in walk_files(base) if not any(part.startswith(".") for part in p.relative_to(base).parts)
        )
        if not files:
            raise ConfigError(f"{where}: the folder '{src.path}' is empty")
        root = base
    elif base.is_file():
        files, root = [base], base.parent
    else:
        raise ConfigError(
            f"{where}: '{src.path}' does not exist (relative to {project_dir}); fix the path or create the file"
        )
    d = files_digest((p.relative_to(root).as_posix(), _local_digest(p)) for p in files) if digest else ""
    return Artifact(
        type="source",
        path=base if base.is_dir() else root,
        digest=d,
        meta={"name": name, "uri": str(base), "format": fmt, "files": [str(p) for p in files]},
    )


def _dvc_source(name: str, src: DataSource, project_dir: Path, digest: bool) -> Artifact:
    """The DVC-tracked file at its revision: digest from DVC's md5, bytes from the remote (kept in .kollm/dvc/)."""
    from kollm.pipeline import dvc_source

    assert src.dvc is not None
    if not digest:  # validation: the revision and the file must exist; the bytes are read when a step runs
        f = dvc_source.lookup(name, src.dvc, project_dir)
        return Artifact(
            type="source",
            path=None,
            digest="",
            meta={"name": name, "uri": src.location, "format": src.format, "files": [], "dvc": f.record()},
        )
    f, local = dvc_source.fetch(name, src.dvc, project_dir)
    return Artifact(
        type="source",
        path=local.parent,
        digest=files_digest([(local.name, f"dvc-md5:{f.md5}")]),
        meta={"name": name, "uri": str(local), "format": src.format, "files": [str(local)], "dvc": f.record()},
    )


def walk_files(root: Path) -> list[Path]:
    """Every file under `root`, following symlinked folders but entering each real folder once, so symlink loops
    (`a -> .`, `a -> b -> a`) end instead of expanding without bound as `glob(recursive=True)` does (a folder
    reachable under two paths is listed once, under the first path in sorted order)."""
    seen: set[tuple[int, int]] = set()
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()  # a folder reachable twice is listed under the same (first) path on every run
        out.extend(p for p in (Path(dirpath) / f for f in filenames) if p.is_file())
    return out


def _glob_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """glob(recursive=True) semantics on path parts: `**` matches zero or more folders, `*`/`?`/`[...]` match within
    one name, and a wildcard does not match a name starting with '.' unless the pattern part does."""
    memo: dict[tuple[int, int], bool] = {}

    def match(i: int, j: int) -> bool:
        if (i, j) in memo:
            return memo[i, j]
        if j == len(pattern):
            ok = i == len(parts)
        elif pattern[j] == "**":
            ok = match(i, j + 1) or (i < len(parts) and not parts[i].startswith(".") and match(i + 1, j))
        else:
            ok = (
                i < len(parts)
                and fnmatch.fnmatchcase(parts[i], pattern[j])
                and (not parts[i].startswith(".") or pattern[j].startswith("."))
                and match(i + 1, j + 1)
            )
        memo[i, j] = ok
        return ok

    return match(0, 0)


def _remote_source(name: str, src: DataSource, digest: bool) -> Artifact:
    import fsspec

    where = f"data.{name}.path"
    try:
        fs, root = fsspec.core.url_to_fs(src.path)
        paths = sorted(fs.glob(root)) if any(c in root for c in "*?[") else [root]
        paths = [p for p in paths if fs.exists(p)]
        if paths and fs.isdir(paths[0]) and len(paths) == 1:
            paths = sorted(p for p in fs.find(paths[0]))
        if not paths:
            raise ConfigError(f"{where}: nothing found at '{src.path}'")
        infos = [(p, fs.info(p)) for p in paths] if digest else []
    except KollmError:
        raise
    except Exception as e:
        raise ConfigError(f"{where}: cannot read '{src.path}': {type(e).__name__}: {e}") from None
    # Remote stores give an ETag or checksum; fall back to size and modification time.
    d = (
        files_digest(
            (
                p,
                str(
                    info.get("ETag")
                    or info.get("etag")
                    or info.get("checksum")
                    or f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or info.get('created')}"
                ),
            )
            for p, info in infos
        )
        if digest
        else ""
    )
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    files = [fs.unstrip_protocol(p) if protocol not in ("file", "local") else p for p in paths]
    return Artifact(
        type="source", path=None, digest=d, meta={"name": name, "uri": src.path, "format": src.format, "files": files}
    )
