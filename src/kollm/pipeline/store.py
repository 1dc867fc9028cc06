"""Where finished steps live: an `ArtifactStore` looks results up by cache key, stages an attempt's outputs and
publishes them atomically, and turns an artifact URI back into a local folder.

- `LocalStore` (a project's `.kollm/`, or any folder given as a path or `file://` URL): a finished step is the
  folder `steps/<key>/` (one sub-folder per output plus `step.json`), published with one `rename`; a step at work
  writes into `tmp/<key>.<id>/`. Locks are per key (`locks/<key>.lock`, flock), so two runners on one project run
  different steps at the same time and the second one to reach a step in flight waits for it and reuses it.
- `FsspecStore` (`s3://`, `gs://`, `memory://`, any fsspec URL): outputs are uploaded under
  `objects/<key>/<publish id>/` and the manifest `steps/<key>.json` is written last, so a reader sees a finished
  step or none. Object stores have no locks: two runners that reach the same key at once both compute it and the
  first manifest wins (outputs are content-addressed, so either is correct). Inputs are downloaded once into a
  local cache folder, by digest.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from kollm.errors import KollmError
from kollm.pipeline.artifacts import folder_digest, publish_dir, write_json_atomic
from kollm.pipeline.step import ARTIFACT_META_FILE, Artifact

MANIFEST = "step.json"

# A step's manifest (step.json): {"name", "kind", "key", "config", "outputs": {name: {"type", "digest", "meta",
# "uri"}}, "metrics", "inputs": {name: {"type", "digest", "uri"}}, "run_id", "finished_at"}
Manifest = dict[str, Any]


class ArtifactStore(Protocol):
    """Finished steps by cache key. Every method is safe to call from several processes at once."""

    url: str
    shared: bool  # False for a store that only this process sees (memory://): steps must then run in this process

    def lookup(self, key: str) -> Manifest | None:
        """The manifest of the finished step with this key, or None (also for a half-published one)."""
        ...

    def outputs(self, manifest: Manifest) -> dict[str, Artifact]:
        """The outputs of a finished step as local artifacts (downloaded first where the store is remote)."""
        ...

    def stage(self, key: str) -> Path:
        """A fresh, empty local folder for one attempt of the step with this key."""
        ...

    def discard(self, staged: Path) -> None:
        """Remove a staged folder (a failed attempt)."""
        ...

    def publish(self, key: str, staged: Path, manifest: Manifest) -> Manifest:
        """Publish a finished attempt atomically; returns the manifest readers see (another runner's, if it won)."""
        ...

    def materialize(self, uri: str) -> Artifact:
        """An artifact given by URI (an output folder of a finished step) as a local artifact."""
        ...

    def lock(self, key: str) -> Any:
        """A context manager held while computing `key`; a second holder waits."""
        ...

    def checkpoint_url(self, key: str) -> str | None:
        """Where the training checkpoints of `key` are mirrored so another machine can resume them (None: only in
        the project's `.kollm/checkpoints/`, which every runner of a local store shares)."""
        ...

    def drop_checkpoints(self, key: str) -> None:
        """Remove the mirrored checkpoints of a finished step."""
        ...


def open_store(url: str | Path | None, state_dir: Path) -> ArtifactStore:
    """The store at `url`: None -> the project's `.kollm/`; a path or file:// URL -> a LocalStore there;
    any other fsspec URL -> an FsspecStore (downloads are cached under the project's `.kollm/store-cache/`)."""
    if url is None:
        return LocalStore(state_dir)
    text = str(url)
    if "://" not in text:
        return LocalStore(Path(text).expanduser().resolve())
    if text.startswith("file://"):
        return LocalStore(Path(urlparse(text).path))
    return FsspecStore(text, cache_dir=state_dir / "store-cache")


def read_artifact_meta(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / ARTIFACT_META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KollmError(
            f"{folder} is not a kollm artifact (no {ARTIFACT_META_FILE})",
            hint="pass the URI of a finished step's output folder",
        ) from None
    except json.JSONDecodeError as e:
        raise KollmError(f"{folder / ARTIFACT_META_FILE} is not valid JSON: {e}") from None


class LocalStore:
    """Finished steps in a folder on this machine (or a shared file system mounted on every worker)."""

    shared = True

    def __init__(self, root: Path):
        self.root = root
        self.url = root.as_uri()

    def lookup(self, key: str) -> Manifest | None:
        folder = self.root / "steps" / key
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        if not all((folder / name).is_dir() for name in manifest.get("outputs", {})):
            return None
        return manifest

    def outputs(self, manifest: Manifest) -> dict[str, Artifact]:
        folder = self.root / "steps" / manifest["key"]
        return {
            n: Artifact(o["type"], folder / n, o["digest"], o.get("meta", {})) for n, o in manifest["outputs"].items()
        }

    def stage(self, key: str) -> Path:
        path = self.root / "tmp" / f"{key}.{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def publish(self, key: str, staged: Path, manifest: Manifest) -> Manifest:
        final = self.root / "steps" / key
        for name, out in manifest["outputs"].items():
            out["uri"] = (final / name).as_uri()
        write_json_atomic(staged / MANIFEST, manifest)
        if final.exists():  # a forced re-run replaces the old result
            trash = self.root / "tmp" / f"{key}.old.{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        publish_dir(staged, final)
        return manifest

    def materialize(self, uri: str) -> Artifact:
        folder = Path(urlparse(uri).path) if uri.startswith("file://") else Path(uri)
        meta = read_artifact_meta(folder)
        return Artifact(meta["type"], folder, meta["digest"], meta.get("meta", {}))

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # we hold the key: attempts a killed process left half-written are garbage now
            for stale in (self.root / "tmp").glob(f"{key}.*"):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def checkpoint_url(self, key: str) -> str | None:
        return None

    def drop_checkpoints(self, key: str) -> None:
        pass  # the runner removes .kollm/checkpoints/<key> itself

    def holder(self, key: str) -> bool:
        """True when another process holds the lock of `key` right now (a step in flight)."""
        path = self.root / "locks" / f"{key}.lock"
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)


CLOUD_ERROR_MODULES = ("botocore", "aiobotocore", "google.auth", "google.api_core", "azure.core", "azure.identity")


class FsspecStore:
    """Finished steps under an fsspec URL, for workers on several machines (s3://bucket/prefix, gs://...)."""

    def __init__(self, url: str, cache_dir: Path):
        import fsspec

        self.url = url.rstrip("/")
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:
            raise KollmError(
                f"store {url}: {e}", hint="install the fsspec driver for this URL (s3: pip install 'kollm[s3]')"
            ) from None
        self.cache_dir = cache_dir
        self.local_tmp = cache_dir / "tmp"
        self.shared = "memory" not in (
            self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        )

    def _path(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])

    def _uri(self, path: str) -> str:
        return self.fs.unstrip_protocol(path)

    @contextmanager
    def _remote(self) -> Iterator[None]:
        """The store's own errors (no credentials, access denied, an unknown bucket) as one message, not a
        cloud SDK's traceback."""
        try:
            yield
        except KollmError:
            raise
        except Exception as e:
            if not (isinstance(e, PermissionError) or type(e).__module__.startswith(CLOUD_ERROR_MODULES)):
                raise
            raise KollmError(
                f"store {self.url}: {type(e).__name__}: {e}",
                hint="give this process credentials for the store (for s3://: AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role; AWS_ENDPOINT_URL for MinIO) "
                "and check that the bucket exists and that they may read and write it",
            ) from None

    def lookup(self, key: str) -> Manifest | None:
        with self._remote():
            return self._lookup(key)

    def _lookup(self, key: str) -> Manifest | None:
        try:
            with self.fs.open(self._path("steps", f"{key}.json"), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None

    def outputs(self, manifest: Manifest) -> dict[str, Artifact]:
        return {n: self.materialize(o["uri"]) for n, o in manifest["outputs"].items()}

    def stage(self, key: str) -> Path:
        path = self.local_tmp / f"{key}.{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def publish(self, key: str, staged: Path, manifest: Manifest) -> Manifest:
        with self._remote():
            return self._publish(key, staged, manifest)

    def _publish(self, key: str, staged: Path, manifest: Manifest) -> Manifest:
        prefix = self._path("objects", key, uuid.uuid4().hex[:12])
        for name, out in manifest["outputs"].items():
            out["uri"] = self._uri(f"{prefix}/{name}")
        for path in sorted(p for p in staged.rglob("*") if p.is_file()):
            self.fs.put_file(str(path), f"{prefix}/{path.relative_to(staged).as_posix()}")
        existing = self.lookup(key)
        if existing is not None and not manifest.get("forced"):  # another runner published first: theirs stands
            self.fs.rm(prefix, recursive=True)
            shutil.rmtree(staged, ignore_errors=True)
            return existing
        with self.fs.open(self._path("steps", f"{key}.json"), "wb") as f:  # the manifest last: now it is visible
            f.write(json.dumps(manifest, ensure_ascii=False, default=str).encode())
        shutil.rmtree(staged, ignore_errors=True)
        return manifest

    def materialize(self, uri: str) -> Artifact:
        with self._remote():
            return self._materialize(uri)

    def _materialize(self, uri: str) -> Artifact:
        fs, path = self.fs, uri
        if "://" in uri:
            import fsspec

            fs, path = fsspec.core.url_to_fs(uri)
        try:
            with fs.open(f"{path.rstrip('/')}/{ARTIFACT_META_FILE}", "rb") as f:
                meta = json.loads(f.read())
        except FileNotFoundError:
            raise KollmError(
                f"{uri} is not a kollm artifact (no {ARTIFACT_META_FILE})",
                hint="pass the URI of a finished step's output folder",
            ) from None
        local = self.cache_dir / "objects" / meta["digest"].removeprefix("sha256:")[:32] / Path(path).name
        if not local.exists():
            tmp = self.cache_dir / "tmp" / f"dl.{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            root = path.rstrip("/")
            for remote in fs.find(root):
                target = tmp / remote[len(root) + 1 :]
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(remote, str(target))
            if folder_digest(tmp) != meta["digest"]:
                shutil.rmtree(tmp, ignore_errors=True)
                raise KollmError(
                    f"{uri}: downloaded files do not match the artifact's digest {meta['digest']}",
                    hint="the store was changed by hand; re-run the step that produced it with --force",
                )
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, local)
            except OSError:  # another process downloaded it first
                shutil.rmtree(tmp, ignore_errors=True)
        return Artifact(meta["type"], local, meta["digest"], meta.get("meta", {}))

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        yield  # object stores have no locks; see the module docstring

    def checkpoint_url(self, key: str) -> str | None:
        return self._uri(self._path("checkpoints", key)) if self.shared else None

    def drop_checkpoints(self, key: str) -> None:
        with self._remote():
            root = self._path("checkpoints", key)
            if self.shared and self.fs.exists(root):
                self.fs.rm(root, recursive=True)


def wait_note(store: ArtifactStore, key: str) -> bool:
    """True when the step with this key is being computed by another process right now (so we will wait)."""
    return isinstance(store, LocalStore) and store.holder(key)
