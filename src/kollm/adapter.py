"""LoRA adapters as Model artifacts: a LoRA step's output is its adapter in PEFT format plus a reference to its base.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (what PEFT's `save_pretrained`
writes; `base_model_name_or_path` is the base's folder, so `AutoModelForCausalLM.from_pretrained(adapter)` with
PEFT installed loads the pair where that folder exists), the tokenizer with its chat template, the generation
config, and `kollm.json` whose `lora.base` names the base:

    {"digest": "sha256:...", "path": "/.../base-folder", "source": "artifact" | a hub name | a folder}

The base is found at `path` or, when that folder is gone (another machine, a registry download), as the registered
model version whose `kollm.model_digest` tag is the digest. Its content digest is checked against the recorded one
(computed once per file and cached by path, size and mtime); a mismatch is one error naming both digests.

    is_adapter(folder) -> bool
    base_ref(folder) -> BaseRef
    find_base(folder, project_dir=None) -> Path             the base's folder, digest checked
    registered_adapters_of(digest, project_dir=None)        {name: models:/NAME/VERSION} of the adapters of a base
    load_causal_lm(folder, dtype=None, project_dir=None)    a model; an adapter is merged into its base in memory
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kollm.errors import KollmError, NotFound

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LINEAGE_FILE = "kollm.json"
BASE_DIGEST_TAG = "kollm.base_model_digest"  # on a registered adapter version: its base's digest
BASE_URI_TAG = "kollm.base_model_uri"  # on a registered adapter version: the registered base, when there is one


class AdapterBaseMismatch(KollmError):
    """The base found for an adapter is not the model it was trained on. Exit code 4."""

    exit_code = 4


@dataclass(frozen=True)
class BaseRef:
    """What an adapter was trained on: its content digest and where it was."""

    digest: str | None  # None: a plain PEFT folder from elsewhere (no kollm.json): not checked
    path: str | None
    source: str


def is_adapter(folder: Path) -> bool:
    """A LoRA adapter folder (PEFT's files, no model weights of its own)."""
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def base_ref(folder: Path) -> BaseRef:
    folder = Path(folder)
    meta_file = folder / LINEAGE_FILE
    base: dict[str, Any] = {}
    if meta_file.is_file():
        lora = (json.loads(meta_file.read_text(encoding="utf-8")) or {}).get("lora") or {}
        base = lora.get("base") or {}
    if not base:
        named = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
        return BaseRef(digest=None, path=named, source=str(named))
    return BaseRef(digest=base.get("digest"), path=base.get("path"), source=str(base.get("source") or base.get("path")))


def folder_digest_cached(folder: Path, project_dir: Path | None = None) -> str:
    """The content digest of a model folder as the artifact store computes it, each file's digest cached."""
    from kollm.pipeline.artifacts import cached_folder_digest

    cache = (
        Path(project_dir) / ".kollm" / "digests.json"
        if project_dir is not None
        else Path(tempfile.gettempdir()) / "kollm-digests.json"
    )
    return cached_folder_digest(Path(folder), cache)


def _registered_with_digest(digest: str, project_dir: Path | None) -> str | None:
    """models:/NAME/VERSION of a registered version whose model files have this digest (None: none is)."""
    from kollm import registry

    from mlflow.exceptions import MlflowException

    try:
        c = registry.client(project_dir)
        found = c.search_model_versions(registry._equals(f"tags.`{registry.MODEL_DIGEST_TAG}`", digest))
    except (MlflowException, KollmError):  # no registry reachable: the base's folder was the only place to look
        return None
    if not found:
        return None
    v = min(found, key=lambda v: (v.name, int(v.version)))
    return f"models:/{v.name}/{v.version}"


def _project_of(folder: Path) -> Path | None:
    """The project whose .kollm/ holds `folder` (an artifact or a registry download), else None."""
    for parent in folder.resolve().parents:
        if parent.name == ".kollm":
            return parent.parent
    return None


def registered_adapters_of(digest: str, project_dir: Path | None = None) -> dict[str, str]:
    """{registered model name: models:/NAME/VERSION} of the registered LoRA adapters trained on the base with this
    content digest (tag kollm.base_model_digest): per name, the version its `champion` alias points to when that is
    one of them, else the newest of them."""
    from kollm import registry

    from mlflow.exceptions import MlflowException

    client = registry.client(project_dir)
    found = client.search_model_versions(registry._equals(f"tags.`{BASE_DIGEST_TAG}`", digest))
    versions: dict[str, set[str]] = {}
    for v in found:
        versions.setdefault(v.name, set()).add(str(v.version))
    chosen: dict[str, str] = {}
    for name, of_base in sorted(versions.items()):
        try:  # search results carry no aliases: ask for the champion
            champion = str(client.get_model_version_by_alias(name, "champion").version)
        except MlflowException:
            champion = ""
        chosen[name] = champion if champion in of_base else max(of_base, key=int)
    return {name: f"models:/{name}/{version}" for name, version in chosen.items()}


def find_base(folder: Path, project_dir: Path | None = None) -> Path:
    """The folder of the base that the adapter in `folder` was trained on, its digest checked."""
    folder = Path(folder)
    project_dir = project_dir if project_dir is not None else _project_of(folder)
    ref = base_ref(folder)
    mismatch: tuple[Path, str] | None = None
    if ref.path:
        path = Path(ref.path)
        if not path.is_absolute():
            path = (folder / path).resolve()
        if (path / "config.json").is_file() or is_adapter(path):
            if ref.digest is None:
                return path
            found = folder_digest_cached(path, project_dir)
            if found == ref.digest:
                return path
            mismatch = (path, found)
    if ref.digest is not None and (project_dir is not None or os.environ.get("MLFLOW_TRACKING_URI")):
        uri = _registered_with_digest(ref.digest, project_dir)
        if uri is not None:
            from kollm import registry

            return registry.resolve_model_uri(uri, project_dir)
    if mismatch is not None:
        raise AdapterBaseMismatch(
            f"adapter {folder}: it was trained on base {ref.digest}, but the base at {mismatch[0]} has digest {mismatch[1]}",
            hint="restore that base folder, or register the original base (kollm matches it by digest)",
        )
    if ref.digest is None and ref.path is None:
        raise NotFound(f"adapter {folder}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    raise NotFound(
        f"adapter {folder}: its base {ref.digest or ref.source} is neither at {ref.path} nor a registered model version",
        hint="register the base model (a version with that kollm.model_digest), or put its folder back",
    )


def base_vocab_rows(model: Any) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def load_causal_lm(folder: Path, *, dtype: Any = None, project_dir: Path | None = None, **kwargs: Any) -> Any:
    """AutoModelForCausalLM for a model folder, or for an adapter folder its base with the adapter merged in
    (in memory; a chain of adapters, each trained on the one before, is merged in order)."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if not is_adapter(folder):
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    from peft import PeftModel

    base = load_causal_lm(find_base(folder, project_dir), project_dir=project_dir, **kwargs)
    meta_file = folder / LINEAGE_FILE
    lora = (json.loads(meta_file.read_text(encoding="utf-8")) or {}).get("lora") or {} if meta_file.is_file() else {}
    rows = lora.get("vocab_size")
    if rows and int(rows) != base_vocab_rows(base):  # the step added chat tokens: the adapter carries the embeddings
        base.resize_token_embeddings(int(rows))
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    for p in merged.parameters():  # PEFT froze the base; a merged model is a plain one, as from_pretrained gives
        p.requires_grad_(True)
    return merged
