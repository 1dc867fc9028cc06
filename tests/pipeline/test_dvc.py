"""DVC-tracked data sources on a real git + DVC repository with a local DVC remote, made here: the bytes come
from the remote at the revision (the repository's DVC cache is emptied first), the digest and the run's input
record carry the revision, commit and md5, and `kollm watch`'s data digest moves with a revision that changes
the data."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kollm
from kollm.errors import ConfigError

pytest.importorskip("dvc", reason="dvc is not installed (pip install 'kollm[dvc]')")
GIT = shutil.which("git")
pytestmark = pytest.mark.skipif(GIT is None, reason="git is not installed")
DVC = str(Path(sys.executable).parent / "dvc")


def sh(*cmd: str, cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (cmd, r.stdout, r.stderr)


def corpus(n: int, seed: int) -> str:
    from kollm.data.synthetic import corpus_with_near_duplicates

    docs, _ = corpus_with_near_duplicates(n, dup_fraction=0.0, seed=seed)
    return "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A data repository: data/corpus.jsonl tracked by DVC at tags v1 and v2, pushed to a local remote; the
    repository's own cache is then deleted, so every read has to come from the remote."""
    root = tmp_path_factory.mktemp("dvc")
    repo, remote = root / "data-repo", root / "remote"
    repo.mkdir()
    sh(GIT, "init", "-q", "-b", "main", cwd=repo)  # type: ignore[arg-type]
    sh(GIT, "config", "user.email", "t@example.com", cwd=repo)  # type: ignore[arg-type]
    sh(GIT, "config", "user.name", "t", cwd=repo)  # type: ignore[arg-type]
    sh(DVC, "init", "-q", cwd=repo)
    sh(DVC, "remote", "add", "-d", "store", str(remote), cwd=repo)
    (repo / "data").mkdir()
    for tag, seed in (("v1", 0), ("v2", 1)):
        (repo / "data" / "corpus.jsonl").write_text(corpus(40, seed), encoding="utf-8")
        sh(DVC, "add", "-q", "data/corpus.jsonl", cwd=repo)
        sh(GIT, "add", "-A", cwd=repo)  # type: ignore[arg-type]
        sh(GIT, "commit", "-qm", tag, cwd=repo)  # type: ignore[arg-type]
        sh(GIT, "tag", tag, cwd=repo)  # type: ignore[arg-type]
        sh(DVC, "push", "-q", cwd=repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    return repo


def project(root: Path, repo: Path, rev: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "kollm.yaml").write_text(
        textwrap.dedent(f"""\
        project: dvc-test
        data:
          corpus: {{dvc: {{repo: {repo}, path: data/corpus.jsonl, rev: {rev}}}}}
        steps:
          - kind: prepare
            inputs: {{source: corpus}}
        """),
        encoding="utf-8",
    )
    return root


def test_a_dvc_source_is_read_from_the_remote_at_its_revision(repo, tmp_path):
    from kollm.pipeline.spec import resolve_source

    p = project(tmp_path / "p", repo, "v1")
    pipe = kollm.load(p)
    a1 = resolve_source("corpus", pipe.cfg.data["corpus"], p)
    v1 = subprocess.run([GIT, "rev-parse", "v1"], cwd=repo, capture_output=True, text=True).stdout.strip()  # type: ignore[list-item]
    assert a1.meta["dvc"]["rev"] == "v1" and a1.meta["dvc"]["commit"] == v1
    local = Path(a1.meta["files"][0])
    assert local.read_text(encoding="utf-8") == corpus(40, 0)  # v1's bytes, from the remote
    assert a1.meta["dvc"]["md5"] == hashlib.md5(local.read_bytes()).hexdigest()


def test_the_run_records_the_dvc_revision_and_md5(repo, tmp_path):
    p = project(tmp_path / "p", repo, "v1")
    result = kollm.run(p)
    assert not result.steps["prepare"].cache_hit
    out = next(iter(result.steps["prepare"].outputs.values()))
    manifest = json.loads((out.path.parent / "step.json").read_text(encoding="utf-8"))
    source = manifest["inputs"]["source"]
    assert source["dvc"]["rev"] == "v1" and source["dvc"]["path"] == "data/corpus.jsonl"
    assert source["digest"].startswith("sha256:") and len(source["dvc"]["md5"]) == 32
    again = kollm.run(p)
    assert again.steps["prepare"].cache_hit  # same revision: same digest
    project(p, repo, "v2")
    third = kollm.run(p)
    assert third.steps["prepare"].outputs != result.steps["prepare"].outputs
    assert not third.steps["prepare"].cache_hit  # a revision with other bytes is new data


def test_watch_sees_a_new_revision_as_new_data(repo, tmp_path):
    from kollm.monitor.watch import data_digest

    p = project(tmp_path / "p", repo, "v1")
    d1, unwatched = data_digest(p)
    assert unwatched == [] and data_digest(p)[0] == d1
    project(p, repo, "v2")
    assert data_digest(p)[0] != d1


def test_bad_dvc_references_get_one_clear_message(repo, tmp_path):
    p = project(tmp_path / "p", repo, "v9")
    with pytest.raises(ConfigError, match=r"data\.corpus\.dvc: cannot open .* at v9"):
        kollm.load(p)
    (p / "kollm.yaml").write_text(
        (p / "kollm.yaml").read_text(encoding="utf-8").replace("data/corpus.jsonl", "data/missing.jsonl"),
        encoding="utf-8",
    )
    (p / "kollm.yaml").write_text(
        (p / "kollm.yaml").read_text(encoding="utf-8").replace("rev: v9", "rev: v1"), encoding="utf-8"
    )
    with pytest.raises(ConfigError, match=r"data\.corpus\.dvc\.path: 'data/missing.jsonl' is not in"):
        kollm.load(p)
    (p / "kollm.yaml").write_text(
        "project: x\ndata:\n  corpus: {path: a.txt, dvc: {path: b}}\nsteps:\n  - kind: prepare\n", encoding="utf-8"
    )
    with pytest.raises(ConfigError, match="either `path` or `dvc"):
        kollm.load(p)
