"""What running on Ray costs against the local executor, side by side in one run.

    python benchmarks/ray_overhead.py                      # prepare: 50 MB corpus, 3 rounds (~5 minutes on 2 CPUs)
    python benchmarks/ray_overhead.py --mb 10 --repeats 1  # quicker

Part `prepare`: the `prepare` step's work (`prepare_sources` + writing train/eval Parquet) on the same generated
Korean corpus (JSON Lines files; the generator of benchmarks/prepare_throughput.py), in alternation:
- local: the process-pool path with num_proc=2 (what `kollm run` does on one machine);
- ray: the Ray Data path (`executor="ray"`: files and byte ranges as Ray Data rows, read and transformed by
  `map_batches` in a pool of 2 Ray tasks, dedup and split in this process) on a local Ray instance started
  once with `num_cpus=2` before the rounds (its start-up time is printed, not counted).
Both write byte-identical Parquet files (checked). The ratio is local wall time / Ray wall time (throughput of Ray
relative to local; goal >= 0.9 on 2 CPUs), per round and as the median of the rounds; the first Ray round also
starts Ray's worker processes, so it is shown apart too.

Part `steps` (`--part steps`): the executor's own cost per step. The same chain of N no-op `python` steps (the
pipeline of benchmarks/pipeline_overhead.py) is run by `kollm.run(executor="local")` and by
`kollm.run(executor="ray")` on a Ray instance that is already up (each step a Ray task that runs one attempt of
its step with `run_one`), first uncached, then fully cached; Ray's added time per step = (ray - local) / N
(goal < 1 s), median over rounds.

Wall-clock rates depend on what else runs on the machine: load averages are printed before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def run_prepare(paths: list[str], executor: str, out: Path) -> dict:
    from kollm.data.readers import SourceFiles
    from kollm.steps.prepare import Config, prepare_sources, write_parquet

    cfg = Config(num_proc=2, batch_rows=500)
    t0 = time.perf_counter()
    prepared = prepare_sources([SourceFiles("bench", "", "jsonl", paths)], cfg, step="bench", executor=executor)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(prepared.train, out / "train.parquet", "corpus")
    write_parquet(prepared.eval, out / "eval.parquet", "corpus")
    wall = time.perf_counter() - t0
    digest = hashlib.sha256((out / "train.parquet").read_bytes() + (out / "eval.parquet").read_bytes()).hexdigest()
    return {"wall": wall, "digest": digest, "rows_kept": prepared.counts.kept, "mb": prepared.stats["input_text_mb"]}


def bench_prepare(mb: float, repeats: int) -> dict:
    import ray
    from prepare_throughput import write_corpus

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        paths, docs, nbytes = write_corpus(tmp_path / "corpus", mb)
        print(f"corpus: {docs} documents, {nbytes / 1e6:.1f} MB in {len(paths)} JSON Lines files")
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        print(f"ray.init(num_cpus=2): {ray_start:.1f} s (not counted below)")
        rounds = []
        try:
            for r in range(repeats):
                local = run_prepare(paths, "local", tmp_path / f"local-{r}")
                on_ray = run_prepare(paths, "ray", tmp_path / f"ray-{r}")
                if local["digest"] != on_ray["digest"]:
                    raise SystemExit("the Ray Data path wrote different Parquet bytes than the local path")
                ratio = local["wall"] / on_ray["wall"]
                rounds.append({"local_s": local["wall"], "ray_s": on_ray["wall"], "ratio": ratio})
                print(
                    f"round {r + 1}: local (2 processes) {local['wall']:.1f} s   Ray Data (2 tasks) {on_ray['wall']:.1f} s   "
                    f"ratio {ratio:.2f}x   ({local['mb'] / local['wall']:.2f} vs {on_ray['mb'] / on_ray['wall']:.2f} MB/s)"
                )
        finally:
            ray.shutdown()
    later = rounds[1:] or rounds
    result = {
        "mb": nbytes / 1e6,
        "docs": docs,
        "ray_init_s": ray_start,
        "rounds": rounds,
        "ratio_median": statistics.median(r["ratio"] for r in rounds),
        "ratio_median_after_first": statistics.median(r["ratio"] for r in later),
        "same_parquet_bytes": True,
    }
    print()
    print("| prepare, 2 CPUs | local, 2 processes | Ray Data, 2 tasks | Ray / local throughput |")
    print("|---|---|---|---|")
    print(
        f"| median of {len(rounds)} rounds | {statistics.median(r['local_s'] for r in rounds):.1f} s | "
        f"{statistics.median(r['ray_s'] for r in rounds):.1f} s | {result['ratio_median']:.2f}x |"
    )
    if len(rounds) > 1:
        print(f"| rounds 2-{len(rounds)} (Ray workers warm) | | | {result['ratio_median_after_first']:.2f}x |")
    print(f"goal >= 0.9x: {'met' if result['ratio_median'] >= 0.9 else 'NOT met'}")
    return result


def bench_steps(n_steps: int, repeats: int) -> dict:
    import ray

    import kollm
    from pipeline_overhead import kollm_project

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    print(f"ray.init: {time.perf_counter() - t0:.1f} s (not counted)")
    rounds = []
    try:
        for r in range(repeats):
            row: dict = {}
            for executor in ("local", "ray"):
                with tempfile.TemporaryDirectory(prefix="kollm-ray-steps-") as tmp:
                    root = Path(tmp) / "p"
                    kollm_project(root)
                    t = time.perf_counter()
                    kollm.run(root, executor=executor)
                    row[f"{executor}_first_s"] = time.perf_counter() - t
                    t = time.perf_counter()
                    kollm.run(root, executor=executor)
                    row[f"{executor}_cached_s"] = time.perf_counter() - t
            row["added_per_step_first_s"] = (row["ray_first_s"] - row["local_first_s"]) / n_steps
            row["added_per_step_cached_s"] = (row["ray_cached_s"] - row["local_cached_s"]) / n_steps
            rounds.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()))
    finally:
        ray.shutdown()
    med = {k: statistics.median(x[k] for x in rounds) for k in rounds[0]}
    print(f"\n| {n_steps} no-op steps | local | ray | Ray's added time per step |")
    print("|---|---|---|---|")
    print(
        f"| first run | {med['local_first_s']:.2f} s | {med['ray_first_s']:.2f} s | {med['added_per_step_first_s']:.3f} s |"
    )
    print(
        f"| cached rerun | {med['local_cached_s']:.2f} s | {med['ray_cached_s']:.2f} s | {med['added_per_step_cached_s']:.3f} s |"
    )
    print(
        f"goal < 1 s per step: {'met' if max(med['added_per_step_first_s'], med['added_per_step_cached_s']) < 1 else 'NOT met'}"
    )
    return {"n_steps": n_steps, "rounds": rounds, "median": med}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--part", choices=["prepare", "steps"], default="prepare", help="what to measure (default: prepare)"
    )
    ap.add_argument("--mb", type=float, default=50.0, help="corpus size in MB for the prepare part (default 50)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (local, Ray) (default 3)")
    ap.add_argument(
        "--out", type=Path, default=None, help="results as JSON (default: benchmarks/results/ray_overhead[_steps].json)"
    )
    args = ap.parse_args()
    args.out = args.out or Path(
        "benchmarks/results/ray_overhead.json"
        if args.part == "prepare"
        else "benchmarks/results/ray_overhead_steps.json"
    )
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f}")
    if args.part == "steps":
        from pipeline_overhead import N_STEPS

        result = {"steps": bench_steps(N_STEPS, args.repeats)}
    else:
        result = {"prepare": bench_prepare(args.mb, args.repeats)}
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f}")
    result["load_average"] = {"before": load_before[0], "after": load_after[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
