"""DVC-tracked data sources: `data: NAME: {dvc: {repo: ., path: data/corpus.jsonl, rev: v1}}`.

The file is looked up at the revision (`DVCFileSystem`: the git commit and the md5 DVC recorded for it) and read
through `dvc.api.open` from the repository's remote into `.kollm/dvc/MD5/NAME` once; steps read that copy. The
source's digest is the md5 (the same bytes under another revision are the same data), its record keeps the
repository, path, revision, commit and md5. dvc is imported only here (`pip install 'kollm[dvc]'`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kollm.config import DvcSource
from kollm.errors import ConfigError, KollmError


@dataclass(frozen=True)
class DvcFile:
    repo: str  # as given, or the absolute folder for a local repository
    path: str
    rev: str | None
    commit: str  # the git commit the revision resolved to
    md5: str
    size: int

    def record(self) -> dict[str, Any]:
        return {
            "repo": self.repo,
            "path": self.path,
            "rev": self.rev,
            "commit": self.commit,
            "md5": self.md5,
            "size": self.size,
        }


def _repo(ref: DvcSource, project_dir: Path) -> str:
    if "://" in ref.repo or ref.repo.startswith("git@"):
        return ref.repo
    return str((project_dir / ref.repo).resolve())


def _require_dvc(where: str) -> None:
    if importlib.util.find_spec("dvc") is None:
        raise KollmError(f"{where}: dvc is not installed", hint="pip install 'kollm[dvc]'")


def lookup(name: str, ref: DvcSource, project_dir: Path) -> DvcFile:
    """The revision's commit and the file's md5, from git and the .dvc file (no data is read)."""
    where = f"data.{name}.dvc"
    _require_dvc(where)
    from dvc.api import DVCFileSystem

    repo = _repo(ref, project_dir)
    try:
        fs = DVCFileSystem(repo, rev=ref.rev)
        try:
            info = fs.info(ref.path)
            commit = fs.repo.get_rev()
        finally:
            fs.close()
    except FileNotFoundError:
        raise ConfigError(
            f"{where}.path: {ref.path!r} is not in {ref.repo} at {ref.rev or 'the working tree'}"
        ) from None
    except Exception as e:
        raise ConfigError(
            f"{where}: cannot open {ref.repo} at {ref.rev or 'the working tree'}: {type(e).__name__}: {e}"
        ) from None
    if info.get("type") != "file" or not info.get("md5"):
        raise ConfigError(f"{where}.path: {ref.path!r} is not a DVC-tracked file (run `dvc add {ref.path}`)")
    return DvcFile(repo, ref.path, ref.rev, commit, str(info["md5"]), int(info.get("size") or 0))


def fetch(name: str, ref: DvcSource, project_dir: Path) -> tuple[DvcFile, Path]:
    """Look the file up and make sure a copy of its bytes, read with `dvc.api.open`, is in .kollm/dvc/MD5/."""
    f = lookup(name, ref, project_dir)
    dest = project_dir / ".kollm" / "dvc" / f.md5 / Path(ref.path).name
    if dest.exists():
        return f, dest
    import dvc.api

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with (
            dvc.api.open(ref.path, repo=f.repo, rev=ref.rev, remote=ref.remote, mode="rb") as src,
            open(tmp, "wb") as out,
        ):
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, dest)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(
            f"data.{name}.dvc: cannot read {ref.path} from the DVC remote"
            f"{' ' + repr(ref.remote) if ref.remote else ''}: {type(e).__name__}: {e} (was it `dvc push`ed?)"
        ) from None
    return f, dest
