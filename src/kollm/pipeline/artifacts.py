"""Content digests and atomic writes for artifacts."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
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


def file_stamp(path: Path) -> str:
    """What a cached file digest is keyed by: (path, size, mtime_ns, inode), never the path alone. Content written
    in place changes the mtime; a file replaced by another (a rename, an atomic write) changes the inode."""
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def cached_folder_digest(folder: Path, cache_file: Path) -> str:
    """folder_digest of a large folder that rarely changes (a local base model), with each file's digest kept in
    `cache_file` by (path, size, mtime_ns, inode) (file_stamp): a rerun reads the folder's metadata instead of
    every weight file."""
    try:
        cache: dict[str, str] = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    fresh: dict[str, str] = {}
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in METADATA_FILES):
        stamp = file_stamp(path)
        fresh[stamp] = cache.get(stamp) or file_digest(path)
        h.update(f"{path.relative_to(folder).as_posix()}\0{fresh[stamp]}\n".encode())
    if any(k not in cache for k in fresh):
        write_json_atomic(
            cache_file, {**{k: v for k, v in cache.items() if not k.startswith(str(folder.resolve()) + "/")}, **fresh}
        )
    return "sha256:" + h.hexdigest()


log = logging.getLogger("kollm.artifacts")

FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int), a copy-on-write clone of a whole file (btrfs, xfs, ...)
_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EACCES)


def _reflink(src: Path, dst: Path) -> bool:
    """Clone `src` to `dst` without copying its blocks where the file system can (False: it cannot)."""
    try:
        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
    except OSError:
        dst.unlink(missing_ok=True)
        return False
    shutil.copystat(src, dst)
    return True


def link_tree(src: Path, dst: Path) -> str:
    """Put the files of the folder `src` at `dst` (which must not exist) without a second full copy: hard links
    (one inode, no new data blocks), else reflinks, else a copy (another file system). A copy is said once, in one
    log line naming both places and the size. Returns how: "link", "reflink" or "copy" (the last way used).

    Linked files share their inode with `src`, so neither side may be written in place: kollm's writers replace
    files (write a temp file, rename it over), and artifacts are never opened for writing once published."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    dst.mkdir(parents=True)
    for d in sorted(p for p in src.rglob("*") if p.is_dir()):
        (dst / d.relative_to(src)).mkdir(parents=True, exist_ok=True)
    how = "link"
    for path in files:
        target = dst / path.relative_to(src)
        if how == "link":
            try:
                os.link(path, target)
                continue
            except OSError as e:
                if e.errno not in _NO_LINK:
                    raise
                how = "reflink"
        if how == "reflink":
            if _reflink(path, target):
                continue
            how = "copy"
            size = sum(p.stat().st_size for p in files)
            log.warning(
                "copying %s (%.2f GB) to %s: not on one file system, so no hard link or reflink", src, size / 1e9, dst
            )
        shutil.copy2(path, target)
    return how


def tree_blocks(folder: Path) -> int:
    """Bytes of disk the files below `folder` hold (st_blocks, each inode counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in folder.rglob("*"):
        st = path.lstat()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
    return total
