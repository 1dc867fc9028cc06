"""The model registry: MLflow Model Registry with aliases (`champion`, `challenger`, `previous`), never stages.

Library API (the CLI `kollm registry list|show|promote|rollback` and the serving/rollout code call these):

    list_models(project_dir=None) -> list[str]
    list_versions(name, project_dir=None) -> list[VersionInfo]          # newest first
    show(name, ref="champion", project_dir=None) -> VersionInfo          # ref: a version number or an alias
    promote(name, version=None, reason="", project_dir=None) -> AliasMove
        champion -> `version` (default: the current challenger); the old champion becomes `previous`;
        the `challenger` alias is removed when it pointed at the promoted version.
    rollback(name, reason="", project_dir=None) -> AliasMove
        champion -> the version under `previous`; `previous` is removed (a second rollback needs a new promotion).
    audit_trail(name, project_dir=None) -> list[AuditEntry]              # every alias move, oldest first
    resolve_model_uri(uri, project_dir=None) -> Path
        `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID/PATH` or a local folder -> a local
        Hugging Face model folder (downloaded once into <project>/.kollm/models/ and reused).

Every alias move is recorded twice: tags on the model version (`kollm.<alias>_since`, `kollm.<alias>_reason`,
and `kollm.rolled_back_at/_reason` on a version that was rolled back) and one `kollm.audit.NNNNNN` tag on the
registered model holding a JSON AuditEntry (when, who, what moved, why).

The tracking/registry URI is the project's: kollm.yaml `tracking.uri`, else $MLFLOW_TRACKING_URI, else
sqlite:///<project>/.kollm/mlflow.db.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from kollm.errors import KollmError, NotFound
from kollm.pipeline.artifacts import link_tree
from kollm.redact import mask_uri

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous"

AUDIT_PREFIX = "kollm.audit."
HF_ARTIFACT = "hf_model"  # the pyfunc artifact name that holds the Hugging Face folder (see kollm.eval.pyfunc_hf)

_MODELS_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)/?$")
_MODELS_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)/?$")
_RUNS = re.compile(r"^runs:/(?P<run_id>[0-9a-zA-Z]+)/(?P<path>.+)$")


@dataclass(frozen=True)
class VersionInfo:
    """One registered model version."""

    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str | None
    source: str
    created: datetime
    description: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class AuditEntry:
    """One alias move, stored as JSON in a `kollm.audit.NNNNNN` tag of the registered model."""

    at: str  # ISO 8601, UTC
    action: str  # register | promote | rollback
    alias: str  # the alias that moved
    version: str  # where it points now
    replaced: str | None  # where it pointed before (None: it was unset)
    reason: str
    user: str


@dataclass(frozen=True)
class AliasMove:
    """The result of promote/rollback: the new champion and what happened to the other aliases."""

    name: str
    action: str
    champion: str
    previous: str | None
    replaced: str | None  # the champion before the move
    reason: str
    at: str


# --- tracking ---------------------------------------------------------------------------------------------


def tracking_uri(project_dir: Path | None = None) -> str:
    """The project's MLflow tracking URI (see kollm.pipeline.tracking)."""
    from kollm.pipeline.tracking import tracking_uri as project_tracking_uri

    return project_tracking_uri(project_dir)


def client(project_dir: Path | None = None) -> MlflowClient:
    """An MlflowClient for the project's tracking server and registry (the same URI)."""
    from kollm.pipeline.tracking import client_for

    return client_for(tracking_uri(project_dir))  # a clear, fast error when a database store is unreachable


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _not_found(e: MlflowException) -> bool:
    return e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def _version_info(mv) -> VersionInfo:  # mv: mlflow ModelVersion
    return VersionInfo(
        name=mv.name,
        version=str(mv.version),
        aliases=tuple(sorted(mv.aliases or ())),
        run_id=mv.run_id or None,
        source=mv.source or "",
        created=datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, UTC),
        description=mv.description or "",
        tags=dict(mv.tags or {}),
    )


def _aliases(model) -> dict[str, str]:  # model: mlflow RegisteredModel
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def _registered_model(c: MlflowClient, name: str):
    try:
        return c.get_registered_model(name)
    except MlflowException as e:
        if not _not_found(e):
            raise
        names = [m.name for m in c.search_registered_models(max_results=50)]
        hint = (
            ("registered models: " + ", ".join(names))
            if names
            else "no model is registered yet: run a pipeline with a `register` step"
        )
        raise NotFound(f"no registered model '{name}' at {mask_uri(c.tracking_uri)}", hint=hint) from None


def _equals(field: str, value: str) -> str:
    """The MLflow search filter `field = 'value'`. Its grammar has no escapes: the value is quoted with a quote it
    does not hold, so a name such as o'brien stays one string; one holding both quotes cannot be searched for."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{field} = {quote}{value}{quote}"
    raise NotFound(f"cannot search the registry for {value!r}: it holds both kinds of quote")


def _get_version(c: MlflowClient, name: str, ref: str) -> VersionInfo:
    """`ref` is a version number or an alias. NotFound names what exists."""
    model = _registered_model(c, name)
    aliases = _aliases(model)
    ref = ref.lstrip("@")
    if ref.isdigit():
        try:
            return _version_info(c.get_model_version(name, ref))
        except MlflowException as e:
            if not _not_found(e):
                raise
            known = sorted(int(v.version) for v in c.search_model_versions(_equals("name", name)))
            raise NotFound(
                f"model '{name}' has no version {ref}", hint=f"versions: {', '.join(map(str, known)) or 'none'}"
            ) from None
    if ref not in aliases:
        existing = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
        raise NotFound(f"model '{name}' has no alias '{ref}'", hint=f"aliases: {existing}")
    return _version_info(c.get_model_version(name, aliases[ref]))


# --- reading ----------------------------------------------------------------------------------------------


def list_models(project_dir: Path | None = None) -> list[str]:
    c = client(project_dir)
    return sorted(m.name for m in c.search_registered_models(max_results=1000))


def list_versions(name: str, project_dir: Path | None = None) -> list[VersionInfo]:
    """All versions of `name`, newest first."""
    c = client(project_dir)
    by_version: dict[str, list[str]] = {}
    for alias, version in _aliases(_registered_model(c, name)).items():
        by_version.setdefault(version, []).append(alias)
    versions = [_version_info(v) for v in c.search_model_versions(_equals("name", name))]
    # search results do not carry aliases in every store; take them from the registered model
    versions = [replace(v, aliases=tuple(sorted(by_version.get(v.version, [])))) for v in versions]
    return sorted(versions, key=lambda v: int(v.version), reverse=True)


def show(name: str, ref: str = CHAMPION, project_dir: Path | None = None) -> VersionInfo:
    """One version by number ("3") or alias ("champion", "@challenger")."""
    return _get_version(client(project_dir), name, ref)


def audit_trail(name: str, project_dir: Path | None = None) -> list[AuditEntry]:
    """Every recorded alias move of `name`, oldest first."""
    model = _registered_model(client(project_dir), name)
    entries = sorted((k, v) for k, v in (model.tags or {}).items() if k.startswith(AUDIT_PREFIX))
    return [AuditEntry(**json.loads(v)) for _, v in entries]


# --- moving aliases ---------------------------------------------------------------------------------------


def _record(c: MlflowClient, name: str, entry: AuditEntry) -> None:
    model = c.get_registered_model(name)
    seq = sum(1 for k in (model.tags or {}) if k.startswith(AUDIT_PREFIX))
    c.set_registered_model_tag(name, f"{AUDIT_PREFIX}{seq:06d}", json.dumps(asdict(entry), ensure_ascii=False))
    c.set_registered_model_tag(name, "kollm.last_move", f"{entry.at} {entry.action}: {entry.alias} -> v{entry.version}")


def _move(c: MlflowClient, name: str, alias: str, version: str, *, action: str, reason: str, at: str) -> str | None:
    """Point `alias` at `version`, tag the version, record the move. Returns the version it pointed at before."""
    before = _aliases(c.get_registered_model(name)).get(alias)
    # the audit entry first: a process killed half-way leaves a recorded move, never an alias moved without one
    _record(
        c,
        name,
        AuditEntry(
            at=at, action=action, alias=alias, version=version, replaced=before, reason=reason[:2000], user=_user()
        ),
    )
    c.set_registered_model_alias(name, alias, version)
    c.set_model_version_tag(name, version, f"kollm.{alias}_since", at)
    c.set_model_version_tag(name, version, f"kollm.{alias}_reason", reason[:4000])
    return before


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def set_alias(
    name: str, alias: str, version: str, *, reason: str, action: str = "register", project_dir: Path | None = None
) -> str | None:
    """Point `alias` at `version` with an audit record (used by `register` for `challenger`). Returns the old target."""
    c = client(project_dir)
    _get_version(c, name, str(version))
    return _move(c, name, alias, str(version), action=action, reason=reason, at=_now())


def promote(
    name: str, version: str | int | None = None, reason: str = "", project_dir: Path | None = None
) -> AliasMove:
    """Make `version` (default: the current challenger) the champion; the old champion becomes `previous`."""
    c = client(project_dir)
    model = _registered_model(c, name)
    aliases = _aliases(model)
    if version is None:
        if CHALLENGER not in aliases:
            raise NotFound(
                f"model '{name}' has no '{CHALLENGER}' to promote",
                hint=f"pass a version (kollm registry promote {name} --version N) or register a new one with `kollm run`",
            )
        version = aliases[CHALLENGER]
    version = str(_get_version(c, name, str(version)).version)
    old = aliases.get(CHAMPION)
    if old == version:
        raise KollmError(f"version {version} of '{name}' is already the champion", hint="promote another version")
    at = _now()
    reason = reason or "promoted"
    if old is not None:
        _move(c, name, PREVIOUS, old, action="promote", reason=f"replaced by v{version}: {reason}", at=at)
    _move(c, name, CHAMPION, version, action="promote", reason=reason, at=at)
    if aliases.get(CHALLENGER) == version:
        c.delete_registered_model_alias(name, CHALLENGER)
    return AliasMove(name=name, action="promote", champion=version, previous=old, replaced=old, reason=reason, at=at)


def rollback(name: str, reason: str = "", project_dir: Path | None = None) -> AliasMove:
    """Restore the version under `previous` as champion; the rolled-back version is tagged, `previous` removed."""
    c = client(project_dir)
    aliases = _aliases(_registered_model(c, name))
    if PREVIOUS not in aliases:
        raise NotFound(
            f"model '{name}' has no '{PREVIOUS}' version to roll back to",
            hint="a rollback needs an earlier promotion; promote a version explicitly with `kollm registry promote NAME --version N`",
        )
    restored, bad = aliases[PREVIOUS], aliases.get(CHAMPION)
    at = _now()
    reason = reason or "rolled back"
    _move(c, name, CHAMPION, restored, action="rollback", reason=reason, at=at)
    c.delete_registered_model_alias(name, PREVIOUS)
    if bad is not None and bad != restored:
        c.set_model_version_tag(name, bad, "kollm.rolled_back_at", at)
        c.set_model_version_tag(name, bad, "kollm.rolled_back_reason", reason[:4000])
    return AliasMove(name=name, action="rollback", champion=restored, previous=None, replaced=bad, reason=reason, at=at)


# --- resolving model URIs to local folders ----------------------------------------------------------------


def _is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder, or a LoRA adapter folder (PEFT format; see kollm.adapter)."""
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def _hf_folder_in(download: Path, what: str) -> Path:
    """The Hugging Face folder inside a downloaded MLflow model (pyfunc with an `hf_model` artifact) or folder."""
    mlmodel = download / "MLmodel"
    if mlmodel.is_file():
        spec = yaml.safe_load(mlmodel.read_text()) or {}
        artifacts = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {}) or {}
        if HF_ARTIFACT in artifacts:
            folder = download / artifacts[HF_ARTIFACT]["path"]
            if _is_hf_folder(folder):
                return folder
    if _is_hf_folder(download):
        return download
    candidates = sorted(
        {p.parent for pattern in ("*/config.json", "*/*/config.json") for p in download.glob(pattern)}
        | {p.parent for pattern in ("*/adapter_config.json", "*/*/adapter_config.json") for p in download.glob(pattern)}
    )
    candidates = [c for c in candidates if not any(c != o and o in c.parents for o in candidates)]
    if len(candidates) == 1:
        return candidates[0]
    raise NotFound(
        f"{what} is not a Hugging Face model (no config.json found in {download})",
        hint="register models with a kollm `register` step, or point at a folder saved with save_pretrained",
    )


def _cache_root(project_dir: Path | None) -> Path:
    if project_dir is not None:
        return Path(project_dir) / ".kollm" / "models"
    return Path(tempfile.gettempdir()) / "kollm-models"


def _download_once(cache: Path, download) -> Path:  # download: Callable[[str], None] writing into a folder
    """Download into a temp folder beside `cache` and rename it into place (atomic; reused afterwards)."""
    if cache.is_dir():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".{cache.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        download(str(tmp))
        try:
            os.rename(tmp, cache)
        except OSError:
            if not cache.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _local_path(uri: str | None) -> Path | None:
    """The folder a file:// (or plain path) artifact URI names; None for any other scheme (s3://, http://, the
    tracking server's mlflow-artifacts:/, ...)."""
    if not uri:
        return None
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    if urlparse(uri).scheme:  # s3://, http://, mlflow-artifacts:/, models:/, runs:/ ...
        return None
    return Path(uri)


def _link_or_download(source: str, tracking: str) -> Callable[[str], None]:
    """What fills a cache folder with the artifacts at `source`: hard links where they lie on this machine (no
    second copy on one file system; link_tree), else MLflow's download. Either writes `dst/<last part>/...`."""

    def fill(dst: str) -> None:
        from mlflow.artifacts import download_artifacts

        local = _local_path(source)
        if local is not None and local.is_dir():
            link_tree(local, Path(dst) / local.name)
            return
        download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=tracking)

    return fill


def _safe(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]+", "_", text)[:80]


def resolve_model_uri(uri: str, project_dir: Path | None = None) -> Path:
    """A local Hugging Face model folder for `uri`.

    Accepts `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID/PATH`, `file://PATH` or a local
    folder (relative paths are relative to `project_dir`, else the current folder). Registry and run
    artifacts are downloaded from the MLflow artifact store once, into <project>/.kollm/models/
    (a temp folder without a project). Raises NotFound with what exists when the name, alias, version,
    run or folder is missing.
    """
    uri = uri.strip()
    if uri.startswith("models:/"):
        match = _MODELS_ALIAS.match(uri) or _MODELS_VERSION.match(uri)
        if not match:
            raise NotFound(f"cannot parse model URI '{uri}'", hint="use models:/NAME@ALIAS or models:/NAME/VERSION")
        c = client(project_dir)
        parts = match.groupdict()
        info = _get_version(c, parts["name"], parts.get("alias") or parts["version"])
        key = hashlib.sha256(f"{c.tracking_uri}\0{info.source}".encode()).hexdigest()[:12]
        cache = _cache_root(project_dir) / f"{_safe(info.name)}-v{info.version}-{key}"
        source = c.get_model_version_download_uri(info.name, info.version)
        folder = _download_once(cache, _link_or_download(source, c.tracking_uri))
        return _hf_folder_in(_single_child(folder), f"{uri} (version {info.version})")
    if uri.startswith("runs:/"):
        match = _RUNS.match(uri)
        if not match:
            raise NotFound(f"cannot parse run URI '{uri}'", hint="use runs:/RUN_ID/PATH, e.g. runs:/0a1b.../model")
        c = client(project_dir)
        run_id, path = match["run_id"], match["path"].strip("/")
        try:
            c.get_run(run_id)
        except MlflowException as e:
            if not _not_found(e):
                raise
            raise NotFound(
                f"no MLflow run '{run_id}' at {mask_uri(c.tracking_uri)}", hint="`kollm runs` lists the runs"
            ) from None
        key = hashlib.sha256(f"{c.tracking_uri}\0{run_id}\0{path}".encode()).hexdigest()[:12]
        cache = _cache_root(project_dir) / f"run-{run_id[:12]}-{key}"

        def download(dst: str) -> None:
            from mlflow.artifacts import download_artifacts

            try:  # runs:/ reaches the run's artifacts and, as in MLflow 3, the models the run logged (by name)
                download_artifacts(artifact_uri=f"runs:/{run_id}/{path}", dst_path=dst, tracking_uri=c.tracking_uri)
            except (MlflowException, OSError) as e:
                raise NotFound(
                    f"run {run_id} has no artifact '{path}'", hint=f"MLflow said: {str(e).splitlines()[0][:200]}"
                ) from None

        folder = _download_once(cache, download)
        return _hf_folder_in(_single_child(folder), uri)
    raw = uri.removeprefix("file://")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = (Path(project_dir) if project_dir is not None else Path.cwd()) / path
    if not path.exists():
        raise NotFound(
            f"model '{uri}' not found: no folder {path}",
            hint="use models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH or a local Hugging Face folder",
        )
    return _hf_folder_in(path.resolve(), uri)


def _single_child(folder: Path) -> Path:
    """download_artifacts of `x/model` writes `dst/model/...`; step into a lone subfolder."""
    children = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(children) == 1 and children[0].is_dir() and not (folder / "MLmodel").exists():
        return children[0]
    return folder


# --- registering ------------------------------------------------------------------------------------------

PYFUNC_CODE = Path(__file__).parent / "eval" / "pyfunc_hf.py"


def register_folder(
    name: str,
    hf_folder: Path,
    *,
    run_id: str,
    tags: dict[str, str],
    description: str = "",
    alias: str | None = CHALLENGER,
    reason: str = "registered",
    project_dir: Path | None = None,
    step_key: str | None = None,
) -> VersionInfo:
    """Log `hf_folder` as an MLflow model of run `run_id` (a logged model named `model` with kollm's pyfunc and the
    transformers flavor, see _log_model), register it as a new version of `name` with `tags`, and point `alias` at
    it. The version loads in plain MLflow with `mlflow.pyfunc.load_model("models:/NAME@ALIAS")` (see
    kollm.eval.pyfunc_hf) or `mlflow.transformers.load_model(...)`, and in kollm with resolve_model_uri.

    Idempotent per `step_key` (the register step's cache key): a version this key created already is returned
    (with `alias` moved to it if a killed attempt stopped short of that), and model files an earlier, killed
    attempt of the key logged completely are registered instead of being copied again.

    Idempotent per model digest (the `kollm.model_digest` tag): a version of `name` with the same model files and
    the same `description` is returned instead of a new one. `alias` moves to it only while it holds no alias and was never rolled back, so
    an unchanged rerun after `kollm registry promote` leaves the champion alone and points no `challenger` at it.
    """
    c = client(project_dir)
    if step_key:
        keyed = c.search_model_versions(_equals(f"tags.`{STEP_KEY_TAG}`", step_key))
        done = [v for v in keyed if v.name == name]
        if done:
            version = str(min(int(v.version) for v in done))
            if alias and _aliases(c.get_registered_model(name)).get(alias) != version:
                _move(c, name, alias, version, action="register", reason=reason, at=_now())
            return _get_version(c, name, version)
        tags = {**tags, STEP_KEY_TAG: step_key}
    digest = tags.get(MODEL_DIGEST_TAG)
    # the same model files registered with the same description (another description is a deliberate new version)
    same = [
        v
        for v in (c.search_model_versions(_equals(f"tags.`{MODEL_DIGEST_TAG}`", digest)) if digest else [])
        if v.name == name and (v.description or "") == description
    ]
    if same:
        existing = min(same, key=lambda v: int(v.version))
        version = str(existing.version)
        held = set(_aliases(c.get_registered_model(name)).values())
        if alias and version not in held and "kollm.rolled_back_at" not in (existing.tags or {}):
            _move(c, name, alias, version, action="register", reason=reason, at=_now())
        return _get_version(c, name, version)
    source = _logged_by_earlier_attempt(c, run_id, step_key) if step_key else None
    if source is None:
        source = f"models:/{_log_model(c, run_id, hf_folder, tags)}"
    try:
        c.create_registered_model(
            name, description=f"registered by kollm; aliases: {CHAMPION}, {CHALLENGER}, {PREVIOUS}"
        )
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = source.removeprefix("models:/") if source.startswith("models:/") else None
    mv = c.create_model_version(
        name, source=source, run_id=run_id, tags=tags, description=description, model_id=model_id
    )
    if model_id:  # as mlflow.register_model does: the logged model lists its versions (the UI links them)
        versions = json.loads(c.get_logged_model(model_id).tags.get(MODEL_VERSIONS_TAG) or "[]")
        if not any(str(v.get("name")) == name and str(v.get("version")) == str(mv.version) for v in versions):
            versions.append({"name": name, "version": str(mv.version)})  # (a tracking server adds it itself)
            c.set_logged_model_tags(model_id, {MODEL_VERSIONS_TAG: json.dumps(versions)})
    if alias:
        _move(c, name, alias, str(mv.version), action="register", reason=reason, at=_now())
    return _get_version(c, name, str(mv.version))


STEP_KEY_TAG = "kollm.step_key"
MODEL_DIGEST_TAG = "kollm.model_digest"  # the content digest of the registered model files (see kollm.steps.register)
MODEL_LOGGED_TAG = "kollm.model_logged"  # set on a run once its model is completely logged
MODEL_ID_TAG = "kollm.model_id"  # the MLflow logged model (models:/<id>) that run logged
MODEL_NAME = "model"  # the logged model's name: runs:/<run id>/model reaches it too
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # on a logged model: the registered versions made from it
INPUT_EXAMPLE = (["서울은 대한민국의"], {"max_new_tokens": 32})
TASK = "text-generation"


def _logged_by_earlier_attempt(c: MlflowClient, run_id: str, step_key: str) -> str | None:
    """The model URI a run of an earlier attempt of this register step logged completely (None: there is none)."""
    experiment = c.get_run(run_id).info.experiment_id
    runs = c.search_runs(
        [experiment],
        filter_string=_equals("tags.`kollm.cache_key`", step_key) + f" and tags.`{MODEL_LOGGED_TAG}` = 'true'",
        max_results=1,
    )
    if not runs:
        return None
    model_id = runs[0].data.tags.get(MODEL_ID_TAG)  # absent: logged as run artifacts by an older kollm
    return f"models:/{model_id}" if model_id else f"runs:/{runs[0].info.run_id}/{MODEL_NAME}"


def _log_model(c: MlflowClient, run_id: str, hf_folder: Path, tags: dict[str, str]) -> str:
    """Log `hf_folder` as one MLflow logged model of run `run_id` (MLflow 3's models:/<model id>, listed in the
    experiment's Models tab and the run's Models column) with two flavors over one copy of the weights:

    - python_function: kollm's HFCausalLM (kollm.eval.pyfunc_hf), the HF folder its artifact `hf_model`; what
      mlflow.pyfunc.load_model and `mlflow models serve` load.
    - transformers: task text-generation, its model_binary the same `hf_model` folder and the tokenizer also in
      components/tokenizer (the one file set the flavor reads from its own place); mlflow.transformers.load_model
      returns a text-generation pipeline.

    The signature comes from HFCausalLM.predict's type hints (a list in, one string per row out) with the
    generation params; the input example is a prompt. Returns the logged model's id."""
    import mlflow
    import torch
    import transformers
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model, ModelSignature
    from mlflow.models.utils import _save_example
    from mlflow.transformers.flavor_config import FlavorKey
    from mlflow.types import ParamSchema, ParamSpec
    from transformers import AutoTokenizer

    requirements = [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
    ]
    experiment = c.get_run(run_id).info.experiment_id
    logged = c.create_logged_model(
        experiment, name=MODEL_NAME, source_run_id=run_id, model_type=TASK, tags={k: v[:8000] for k, v in tags.items()}
    )  # the version's lineage tags
    try:
        # MLflow nags about type hints, Any and input examples; the choices here are deliberate. It forces its own
        # "once" filter around those checks, so filters cannot silence them: record the warnings and drop them.
        # A local artifact store gets the model folder by one rename from a temp folder beside it, whose weights are
        # hard links to `hf_folder` (no second copy on one file system; see link_tree).
        dest = _local_path(logged.artifact_location)
        near = None
        if dest is not None:
            near = dest.parent
            near.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(prefix=".kollm-register-", dir=near) as tmp,
            warnings.catch_warnings(record=True),
        ):
            local = Path(tmp) / MODEL_NAME
            stub = Path(tmp) / "stub" / hf_folder.name  # MLflow copies artifacts; it gets a stand-in, linked below
            stub.mkdir(parents=True)
            (stub / "config.json").write_text("{}")
            spec = Model(
                artifact_path=logged.artifact_location,
                run_id=run_id,
                model_uuid=logged.model_id,
                model_id=logged.model_id,
            )
            # no input_example here: with one, MLflow would load the model and generate to check it
            mlflow.pyfunc.save_model(
                path=str(local),
                python_model=str(PYFUNC_CODE),
                artifacts={HF_ARTIFACT: str(stub)},
                pip_requirements=requirements,
                mlflow_model=spec,
            )
            spec = Model.load(str(local / "MLmodel"))
            binary = spec.flavors["python_function"]["artifacts"][HF_ARTIFACT]["path"]
            shutil.rmtree(local / binary)
            link_tree(hf_folder, local / binary)
            hints = spec.signature
            spec.signature = ModelSignature(
                inputs=hints.inputs,
                outputs=hints.outputs,
                params=ParamSchema([ParamSpec("max_new_tokens", "long", 64), ParamSpec("batch_size", "long", 8)]),
            )
            spec.signature._is_signature_from_type_hint = True  # predict checks its hints, not a table schema
            _save_example(spec, INPUT_EXAMPLE, str(local))
            tokenizer = AutoTokenizer.from_pretrained(str(local / binary))
            tokenizer.save_pretrained(str(local / "components" / FlavorKey.TOKENIZER))
            if (local / binary / "config.json").is_file():  # a LoRA adapter needs its base: pyfunc only
                spec.add_flavor(
                    "transformers", **_transformers_flavor(local / binary, binary, type(tokenizer).__name__)
                )
            files = [f for f in local.rglob("*") if f.is_file() and f.name != "MLmodel"]
            spec.model_size_bytes = sum(f.stat().st_size for f in files)
            spec.save(str(local / "MLmodel"))
            if dest is not None and not (dest.exists() and any(dest.iterdir())):
                if dest.exists():
                    dest.rmdir()
                os.rename(local, dest)
            else:
                c.log_model_artifacts(logged.model_id, str(local))  # an upload (another machine or file system)
    except BaseException:
        try:
            c.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        except Exception:  # the original error matters more
            pass
        raise
    c.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    c.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    c.set_tag(run_id, MODEL_ID_TAG, logged.model_id)
    c.set_tag(run_id, MODEL_LOGGED_TAG, "true")
    return logged.model_id


def _transformers_flavor(folder: Path, binary: str, tokenizer_type: str) -> dict[str, object]:
    """The `transformers` flavor of MLmodel for a text-generation model whose weights are at `binary` (relative to the
    model folder) and whose tokenizer is in components/tokenizer: what mlflow.transformers.save_model writes for a
    local checkpoint (its own builder for that fails with transformers 5), without copying the weights again."""
    import transformers
    from mlflow.transformers.flavor_config import FlavorKey

    architectures = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    flavor: dict[str, object] = {
        "transformers_version": transformers.__version__,
        "code": None,
        FlavorKey.TASK: TASK,
        FlavorKey.INSTANCE_TYPE: "TextGenerationPipeline",
        FlavorKey.MODEL_TYPE: architectures[0] if architectures else "AutoModelForCausalLM",
        FlavorKey.MODEL_NAME: binary,
        FlavorKey.MODEL_BINARY: binary,
        FlavorKey.COMPONENTS: [FlavorKey.TOKENIZER],
        FlavorKey.COMPONENT_TYPE.format(FlavorKey.TOKENIZER): tokenizer_type,
    }
    if int(transformers.__version__.split(".")[0]) < 5:  # pipeline.framework is gone in transformers 5
        flavor[FlavorKey.FRAMEWORK] = "pt"
    return flavor


def alias_versions(name: str, aliases: list[str], project_dir: Path | None = None) -> dict[str, str | None]:
    """Which version each alias of `name` points at (None: unset, or no such model)."""
    c = client(project_dir)
    try:
        model = c.get_registered_model(name)
    except MlflowException as e:
        if _not_found(e):
            return dict.fromkeys(aliases)
        raise
    known = model.aliases or {}
    return {a: (str(known[a]) if a in known else None) for a in aliases}
