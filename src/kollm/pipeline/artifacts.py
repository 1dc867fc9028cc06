"""Content digests and atomic writes for artifacts."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kollm.pipeline.step import METADATA_FILES

_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_digest(folder: Path, *, exclude: Iterable[str] = METADATA_FILES) -> str:
    """sha256 over every file below `folder` (relative name and content), in a stable order; files named in
    `exclude` (metadata: run ids, counters, lineage) are left out, so the digest is over content only."""
    skip = set(exclude)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(b"\0")
        h.update(file_digest(path).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def files_digest(files: Iterable[tuple[str, str]]) -> str:
    """sha256 over (name, per-file digest) pairs."""
    h = hashlib.sha256()
    for name, digest in sorted(files):
        h.update(f"{name}\0{digest}\n".encode())
    return "sha256:" + h.hexdigest()


def json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_tree(folder: Path) -> None:
    """Flush every file below `folder` to disk before it is published by a rename."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def publish_dir(tmp: Path, final: Path) -> None:
    """Atomically move the finished folder `tmp` to `final` (the caller holds the project lock)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fsync_tree(tmp)
    os.rename(tmp, final)


def cached_folder_digest(folder: Path, cache_file: Path) -> str:
    """folder_digest of a large folder that rarely changes (a local base model), with each file's digest kept in
    `cache_file` by (path, size, mtime): a rerun reads the folder's metadata instead of every weight file."""
    try:
        cache: dict[str, str] = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    fresh: dict[str, str] = {}
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in METADATA_FILES):
        st = path.stat()
        stamp = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        fresh[stamp] = cache.get(stamp) or file_digest(path)
        h.update(f"{path.relative_to(folder).as_posix()}\0{fresh[stamp]}\n".encode())
    if any(k not in cache for k in fresh):
        write_json_atomic(
            cache_file, {**{k: v for k, v in cache.items() if not k.startswith(str(folder.resolve()) + "/")}, **fresh}
        )
    return "sha256:" + h.hexdigest()
