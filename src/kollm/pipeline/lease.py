"""One attempt's lease on its step's checkpoint folder, ended when the step is published.

Every attempt of a step shares the step's checkpoint folder (`.kollm/checkpoints/<key>/`, or `checkpoints/<key>/` in
an object store), so that a retry resumes where the last attempt got to. An attempt can outlive its coordinator: a
Ray Train run whose coordinator's node died trains on until Ray notices (and for good across a network partition),
and may write a checkpoint after the retry published the step. So the runner marks each attempt's lease in the
folder (`attempts/<token>`) before the step runs, and publishing the step removes the folder with every mark. Each
checkpoint, and the model at the end, is written only after checking the attempt's mark, and checked again after: an
attempt whose step was published meanwhile stops (Superseded) instead of writing into the published step's folder,
and what it wrote in between is removed. Attempts of a step not yet published (a retry beside an attempt left
running, two runners of one object store) share the folder as before: one key, one training, either checkpoint
resumes it.

No torch here: the runner imports this module for every step.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kollm.errors import Superseded

ATTEMPTS = "attempts"  # in a step's checkpoint folder: one empty file per attempt whose step is not yet published


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


@dataclass(frozen=True)
class Lease:
    """Attempt `token`'s lease on the checkpoint folder of its step: in the artifact store (`remote`) when the
    step's checkpoints live there, else `folder`. Picklable: it travels with the job to training processes and Ray
    Train workers, wherever they run."""

    token: str
    folder: Path
    remote: str | None = None

    @classmethod
    def new(cls, attempt: int, folder: Path, remote: str | None = None) -> Lease:
        return cls(f"{attempt}-{uuid.uuid4().hex[:12]}", folder, remote)

    def claim(self) -> Lease:
        """Mark the lease (before the attempt runs)."""
        if self.remote:
            fs, root = _fs(self.remote)
            fs.pipe_file(f"{root}/{ATTEMPTS}/{self.token}", b"")  # an object store has no folders to make
        else:
            (self.folder / ATTEMPTS).mkdir(parents=True, exist_ok=True)
            (self.folder / ATTEMPTS / self.token).touch()
        return self

    def held(self) -> bool:
        """False once the step was published (its checkpoint folder removed with the mark)."""
        if self.remote:
            fs, root = _fs(self.remote)
            path = f"{root}/{ATTEMPTS}/{self.token}"
            fs.invalidate_cache(path)
            return bool(fs.exists(path))
        return (self.folder / ATTEMPTS / self.token).exists()

    def _others(self) -> bool:
        """Whether any other attempt holds a lease on the folder now (a run started after the publish)."""
        if self.remote:
            fs, root = _fs(self.remote)
            fs.invalidate_cache(f"{root}/{ATTEMPTS}")
            try:
                return bool(fs.ls(f"{root}/{ATTEMPTS}"))
            except FileNotFoundError:
                return False
        folder = self.folder / ATTEMPTS
        return folder.is_dir() and any(folder.iterdir())

    def check(self, what: str) -> None:
        """Raise Superseded, saying that `what` was not written, once the step was published."""
        if not self.held():
            raise self._superseded(what)

    def written(self, what: str, paths: Sequence[Path] = (), remote_paths: Sequence[str] = ()) -> None:
        """After writing `paths` (and `remote_paths` in the store): if the step was published meanwhile, remove them
        (unless a new run of the step uses the folder already) and raise Superseded."""
        if self.held():
            return
        if not self._others():
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)
                try:
                    path.parent.rmdir()  # only when empty again: the published step left nothing behind
                except OSError:
                    pass
            if remote_paths:
                fs, _ = _fs(self.remote or "")
                for remote in remote_paths:
                    try:
                        fs.rm(remote, recursive=True)
                    except FileNotFoundError:
                        pass
        raise self._superseded(what)

    def _superseded(self, what: str) -> Superseded:
        return Superseded(
            f"attempt {self.token} of this step stopped without writing {what}: its lease on the step's checkpoint "
            "folder ended (the step was published meanwhile by a retry or another runner, or the folder was removed)"
        )
