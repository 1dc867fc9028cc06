"""Large model folders: publish, register and serve-resolve of an N GB folder against `cp -r` of it, in one run.

    .venv/bin/python benchmarks/large_artifacts.py --gb 8 [--dir /tmp] [--out benchmarks/results/large_artifacts.json]

The folder is a tiny Hugging Face model (config, tokenizer, weights) plus N GB of weight shards (random bytes: no
step here loads them). Each operation is timed (wall) with the extra disk bytes it costs (st_blocks of every file
under the work folder, each inode once, before and after), beside `cp -r` of the same folder on the same file system:

  - publish: a finished step's output, staged inside the artifact store, digested (the one full read) and published
    (kollm.pipeline.store.LocalStore.publish: fsync and one rename);
  - register: kollm.registry.register_folder into the project's MLflow (SQLite, local artifacts);
  - serve-resolve: kollm.registry.resolve_model_uri("models:/NAME/1"), the folder `kollm serve` loads;
  - base digest: the step key of a step whose base_model is the folder (cached_folder_digest), first and cached;
  - cached run: a fully cached `kollm.run()` (prepare -> sft) whose base_model is the folder, against the same
    pipeline on the tiny model alone (median of --repeats).

Deletes its work folder at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.tiny: the tiny model and tokenizer, built offline
BLOCK = 64 << 20


def blocks(folder: Path) -> int:
    from kollm.pipeline.artifacts import tree_blocks

    return tree_blocks(folder)


def write_shards(folder: Path, size: int) -> None:
    """`size` bytes of random shards of at most 1 GiB (a 64 MiB random block, each copy with its own header)."""
    block = bytearray(os.urandom(BLOCK))
    n_shards = max(1, -(-size // (1 << 30)))
    per = -(-size // n_shards)
    counter = 0
    for i in range(n_shards):
        left = min(per, size - i * per)
        with open(folder / f"pad-{i + 1:05d}-of-{n_shards:05d}.bin", "wb") as f:
            while left > 0:
                counter += 1
                block[:8] = counter.to_bytes(8, "little")
                f.write(block[: min(left, BLOCK)])
                left -= BLOCK


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(work: Path, fn) -> tuple[float, int, object]:
    """(wall seconds, extra disk bytes under `work`, result) of fn()."""
    os.sync()
    before = blocks(work)
    seconds, out = timed(fn)
    os.sync()
    return seconds, blocks(work) - before, out


def cp_r(work: Path, src: Path, name: str) -> tuple[float, int]:
    dst = work / "cp" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    seconds, extra, _ = measure(work, lambda: subprocess.run(["cp", "-r", str(src), str(dst)], check=True))
    shutil.rmtree(dst)
    return seconds, extra


def chat_data(path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": f"질문 {i}"}, {"role": "assistant", "content": f"대답 {i}입니다"}]}
        for i in range(30)
    ]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")


def project(root: Path, base: Path) -> Path:
    (root / "data").mkdir(parents=True)
    chat_data(root / "data" / "chat.jsonl")
    (root / "kollm.yaml").write_text(
        "project: large-base\n"
        "data: {chat: {path: data/chat.jsonl}}\n"
        "steps:\n"
        "  - {kind: prepare, name: prep, config: {dataset: instructions, split: {eval_fraction: 0.1}, "
        "filters: {min_chars: 1, min_hangul_ratio: 0}}}\n"
        f"  - {{kind: sft, name: tune, config: {{base_model: '{base}', seq_len: 32, max_steps: 1, batch_size: 2}}}}\n",
        encoding="utf-8",
    )
    return root


def cached_runs(work: Path, tiny: Path, big: Path, repeats: int) -> dict[str, float]:
    import kollm

    small_p, big_p = project(work / "run-tiny", tiny), project(work / "run-big", big)
    first_big, _ = timed(lambda: kollm.run(big_p))
    kollm.run(small_p)
    small, large = [], []
    for _ in range(repeats):  # interleaved: the machine's load hits both alike
        for target, p in ((small, small_p), (large, big_p)):
            seconds, result = timed(lambda p=p: kollm.run(p))
            assert all(s.cache_hit for s in result.steps.values()), "the rerun was not fully cached"
            target.append(seconds)
    return {
        "first_run_big_s": first_big,
        "cached_run_tiny_s": statistics.median(small),
        "cached_run_big_s": statistics.median(large),
        "cached_run_extra_s": statistics.median(large) - statistics.median(small),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="size of the weight shards in GB (1e9 bytes)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder parent (default: the temp folder)")
    ap.add_argument("--repeats", type=int, default=3, help="cached runs of each pipeline (median)")
    ap.add_argument("--no-run", action="store_true", help="skip the cached `kollm.run` comparison")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "large_artifacts.json")
    args = ap.parse_args()

    from tests.tiny import save_tiny

    from kollm import registry
    from kollm.pipeline.artifacts import cached_folder_digest, folder_digest, write_json_atomic
    from kollm.pipeline.step import ARTIFACT_META_FILE
    from kollm.pipeline.store import LocalStore

    work = Path(tempfile.mkdtemp(prefix="kollm-large-", dir=args.dir))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    size = int(args.gb * 1e9)
    results: dict[str, object] = {
        "gb": args.gb,
        "bytes": size,
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "python": platform.python_version(),
    }
    try:
        tiny = save_tiny(work / "tiny")
        store = LocalStore(work / "store")
        staged = store.stage("k" * 16)
        folder = staged / "model"
        shutil.copytree(tiny, folder)
        write_shards(folder, size)  # the step writing its output (not timed)
        total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"folder: {total / 1e9:.2f} GB in {sum(1 for _ in folder.iterdir())} files; work folder {work}")
        rows = []

        def publish() -> Path:
            digest = folder_digest(folder)
            write_json_atomic(folder / ARTIFACT_META_FILE, {"type": "model", "digest": digest, "meta": {}})
            store.publish("k" * 16, staged, {"outputs": {"model": {"type": "model", "digest": digest}}})
            return store.root / "steps" / ("k" * 16) / "model"

        seconds, extra, published = measure(work, publish)
        assert isinstance(published, Path)
        rows.append(("publish", seconds, extra, *cp_r(work, published, "publish")))

        proj = work / "project"
        proj.mkdir()
        (proj / "kollm.yaml").write_text(
            "project: large\nsteps:\n  - {kind: python, config: {callable: 'm:f'}}\n", encoding="utf-8"
        )
        c = registry.client(proj)
        exp = c.create_experiment("large", artifact_location=(proj / ".kollm" / "mlartifacts").as_uri())
        run_id = c.create_run(exp).info.run_id
        seconds, extra, _ = measure(
            work, lambda: registry.register_folder("large", published, run_id=run_id, tags={}, project_dir=proj)
        )
        rows.append(("register", seconds, extra, *cp_r(work, published, "register")))
        seconds, extra, served = measure(work, lambda: registry.resolve_model_uri("models:/large/1", proj))
        assert isinstance(served, Path)
        assert (served / f"pad-00001-of-{max(1, -(-size // (1 << 30))):05d}.bin").stat().st_ino == (
            published / f"pad-00001-of-{max(1, -(-size // (1 << 30))):05d}.bin"
        ).stat().st_ino, "serve-resolve did not link the published weights"
        rows.append(("serve-resolve", seconds, extra, *cp_r(work, published, "serve")))

        cache = work / "digests.json"
        first, d1 = timed(lambda: cached_folder_digest(published, cache))
        again, d2 = timed(lambda: cached_folder_digest(published, cache))
        assert d1 == d2
        results["base_digest_first_s"], results["base_digest_cached_s"] = first, again

        print(
            f"\n{'operation':<14} {'kollm s':>9} {'kollm extra':>12} {'cp -r s':>9} {'cp -r extra':>12} {'speedup':>8}"
        )
        for name, s, e, cs, ce in rows:
            print(f"{name:<14} {s:>9.3f} {e / 1e9:>10.3f}GB {cs:>9.3f} {ce / 1e9:>10.3f}GB {cs / s:>7.1f}x")
        results["operations"] = {
            name: {"kollm_s": s, "kollm_extra_bytes": e, "cp_r_s": cs, "cp_r_extra_bytes": ce, "speedup": cs / s}
            for name, s, e, cs, ce in rows
        }
        print(f"\nbase digest (step key): first {first:.3f} s, cached {again:.4f} s ({first / again:.0f}x)")

        if not args.no_run:
            base = work / "base-large"
            shutil.copytree(tiny, base)
            write_shards(base, size)
            runs = cached_runs(work, tiny, base, args.repeats)
            results["cached_run"] = runs
            print(
                f"fully cached kollm.run (prepare -> sft): tiny base {runs['cached_run_tiny_s']:.3f} s, "
                f"{args.gb:g} GB base {runs['cached_run_big_s']:.3f} s, "
                f"difference {runs['cached_run_extra_s']:+.3f} s (first run of the large one {runs['first_run_big_s']:.1f} s)"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
