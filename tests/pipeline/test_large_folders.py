"""Large model folders: hard links instead of copies through the store, the registry and serving; the digest cache."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.tiny import save_tiny

import kollm
from kollm import registry
from kollm.pipeline import artifacts
from kollm.pipeline.artifacts import cached_folder_digest, folder_digest, link_tree, tree_blocks, write_json_atomic
from kollm.pipeline.step import ARTIFACT_META_FILE
from kollm.pipeline.store import LocalStore

PAD = 8 << 20  # the "weights" a test folder carries beside the tiny model


def pad(folder: Path, size: int = PAD, name: str = "pad-00001-of-00001.bin") -> Path:
    path = folder / name
    path.write_bytes(os.urandom(size))
    return path


@pytest.fixture
def spy_digests(monkeypatch):
    """The files whose content kollm hashes (the real file_digest, recorded)."""
    read: list[Path] = []
    real = artifacts.file_digest

    def recording(path: Path) -> str:
        read.append(Path(path))
        return real(path)

    monkeypatch.setattr(artifacts, "file_digest", recording)
    return read


def test_digest_cache_is_keyed_by_size_mtime_and_inode_not_by_path(tmp_path, spy_digests):
    folder = tmp_path / "base"
    folder.mkdir()
    weights = pad(folder, 1 << 16)
    (folder / "config.json").write_text("{}")
    cache = tmp_path / "digests.json"
    first = cached_folder_digest(folder, cache)
    assert first == folder_digest(folder)
    spy_digests.clear()
    assert cached_folder_digest(folder, cache) == first and spy_digests == []  # metadata only

    # the same size, written in place, mtime touched: re-read
    stat = weights.stat()
    with open(weights, "r+b") as f:
        f.write(b"\xff" * 16)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_ino == stat.st_ino
    spy_digests.clear()
    second = cached_folder_digest(folder, cache)
    assert spy_digests == [weights]
    assert second != first and second == folder_digest(folder)

    # another file of the same size put in its place with the old mtime restored: only the inode tells, and does
    stat = weights.stat()
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(stat.st_size))
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, weights)
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns and weights.stat().st_ino != stat.st_ino
    spy_digests.clear()
    third = cached_folder_digest(folder, cache)
    assert spy_digests == [weights]  # config.json came from the cache
    assert third not in (first, second) and third == folder_digest(folder)


def test_store_registry_and_serving_share_one_copy_of_the_weights(tmp_path):
    """A published model folder registered in MLflow and resolved for serving: every place holds hard links to the
    same inodes, so the disk holds the weights once; a metadata rewrite replaces its file, never writes into one."""
    store = LocalStore(tmp_path / "store")
    staged = store.stage("k" * 16)
    folder = save_tiny(staged / "model")
    weights = pad(folder)
    digest = folder_digest(folder)
    write_json_atomic(folder / ARTIFACT_META_FILE, {"type": "model", "digest": digest, "meta": {}})
    store.publish("k" * 16, staged, {"outputs": {"model": {"type": "model", "digest": digest}}})
    published = store.root / "steps" / ("k" * 16) / "model"
    weights = published / weights.name

    project = tmp_path / "p"
    project.mkdir()
    (project / "kollm.yaml").write_text("project: big\nsteps:\n  - kind: python\n    config: {callable: 'm:f'}\n")
    c = registry.client(project)
    exp = c.create_experiment("big", artifact_location=(project / "mlartifacts").as_uri())
    before = tree_blocks(tmp_path)
    registry.register_folder("big", published, run_id=c.create_run(exp).info.run_id, tags={}, project_dir=project)
    served = registry.resolve_model_uri("models:/big/1", project)
    extra = tree_blocks(tmp_path) - before
    assert extra < PAD // 4, f"registering and resolving added {extra} bytes for {PAD} bytes of weights"

    logged = [p for p in (project / "mlartifacts").rglob(weights.name)]
    assert len(logged) == 1
    for name in (weights.name, "model.safetensors", "tokenizer.json"):
        inodes = {(f / name).stat().st_ino for f in (published, logged[0].parent, served)}
        assert len(inodes) == 1, f"{name} is not one file in the store, MLflow and the serving cache"
    assert weights.stat().st_nlink == 3
    assert (served / weights.name).read_bytes() == weights.read_bytes()

    meta = (served / ARTIFACT_META_FILE).read_text()
    write_json_atomic(published / ARTIFACT_META_FILE, {"rewritten": True})  # the runner's way of writing metadata
    assert (served / ARTIFACT_META_FILE).read_text() == meta  # the linked copy kept its content


def test_a_copy_across_file_systems_is_said_once(tmp_path, caplog):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the temp folder")
    src = shm / f"kollm-test-{os.getpid()}"
    try:
        (src / "sub").mkdir(parents=True)
        for i in range(3):
            pad(src, 1 << 12, f"w{i}.bin")
        (src / "sub" / "config.json").write_text("{}")
        with caplog.at_level(logging.INFO, logger="kollm.artifacts"):
            how = link_tree(src, tmp_path / "dst")
        assert how == "copy"
        lines = [r.getMessage() for r in caplog.records if r.name == "kollm.artifacts"]
        assert len(lines) == 1 and "not on one file system" in lines[0] and str(src) in lines[0], lines
        assert folder_digest(tmp_path / "dst") == folder_digest(src)
        assert how == "copy" and (tmp_path / "dst" / "w0.bin").stat().st_ino != (src / "w0.bin").stat().st_ino
    finally:
        import shutil

        shutil.rmtree(src, ignore_errors=True)
    same = link_tree(tmp_path / "dst", tmp_path / "again")  # one file system: links, nothing said
    assert (
        same == "link" and (tmp_path / "again" / "w0.bin").stat().st_ino == (tmp_path / "dst" / "w0.bin").stat().st_ino
    )


def test_fully_cached_run_on_a_large_base_folder_reads_no_weights(tmp_path, spy_digests):
    """The step key of a step whose base_model is a local folder covers its content through the digest cache: a
    fully cached rerun stats the base's files and reads none (the cost that grows with the folder)."""
    root = tmp_path / "p"
    (root / "data").mkdir(parents=True)
    rows = [
        {"messages": [{"role": "user", "content": f"질문 {i}"}, {"role": "assistant", "content": f"대답 {i}입니다"}]}
        for i in range(30)
    ]
    (root / "data" / "chat.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    weights = pad(save_tiny(root / "base"), 32 << 20)
    (root / "kollm.yaml").write_text(
        textwrap.dedent("""\
        project: largebase
        data: {chat: {path: data/chat.jsonl}}
        steps:
          - {kind: prepare, name: prep, config: {dataset: instructions, split: {eval_fraction: 0.1}, filters: {min_chars: 1, min_hangul_ratio: 0}}}
          - {kind: sft, name: tune, config: {base_model: base, seq_len: 32, max_steps: 1, batch_size: 2}}
        """)
    )
    kollm.run(root)
    assert weights in spy_digests  # read once, on the first run
    spy_digests.clear()
    again = kollm.run(root)
    assert all(s.cache_hit for s in again.steps.values())
    assert not [p for p in spy_digests if p.is_relative_to(root / "base")], spy_digests


def test_benchmark_small_size(tmp_path):
    """benchmarks/large_artifacts.py at 0.02 GB: publish, register and serve-resolve add (almost) no disk bytes where
    cp -r adds the folder, and the fully cached run on the large base stays fully cached."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "large_artifacts.py"
    out = tmp_path / "large.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--gb", "0.02", "--repeats", "1", "--dir", str(tmp_path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    for name in ("publish", "register", "serve-resolve"):
        op = doc["operations"][name]
        assert op["kollm_extra_bytes"] < doc["bytes"] // 10 and op["cp_r_extra_bytes"] >= doc["bytes"], (name, op)
    assert "speedup" in proc.stdout and "cached kollm.run" in proc.stdout
    assert doc["cached_run"]["cached_run_big_s"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["large.json"]  # its work folder is gone
