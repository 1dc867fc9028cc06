"""Runner overhead: kollm vs `dvc repro` on the same 6-step pipeline of no-op steps, in one run.

    .venv/bin/python benchmarks/pipeline_overhead.py [--repeats 5] [--out benchmarks/results/pipeline_overhead.json]
    .venv/bin/python benchmarks/pipeline_overhead.py --quickstart [--repeats 5]   # the Korean quickstart case

Measures
  - kollm per-step overhead: wall time of each executed step minus the time spent inside the step function
    (cache key, input digests, MLflow nested run, atomic publish, manifest), median over steps and repeats;
  - cached rerun: `kollm.run()` in-process with every step cached (excludes interpreter start), and both
    `kollm run` and `dvc repro` as fresh processes (includes interpreter start) on unchanged pipelines. kollm
    records each rerun in MLflow as usual (a parent run and 6 nested runs in the project's SQLite store);
  - first (uncached) run of the whole pipeline for both.
With --quickstart: the README's Korean quickstart (`kollm init`, one full run: minutes of CPU training), then its
fully cached rerun as a fresh `kollm run --quiet` process against `dvc repro` of a cached dvc pipeline with as many
stages (the target: kollm's cached quickstart rerun takes at most dvc's time), and in-process.
Needs `dvc` (pip install dvc); without it only kollm is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_STEPS = 6
STEP_MODULE = """
import time
from pathlib import Path

SPENT = []

def noop(ctx):
    t0 = time.perf_counter()
    src = next(iter(ctx.inputs.values()))
    files = src.meta["files"] if src.type == "source" else [str(p) for p in src.path.glob("*.txt")]
    (ctx.output_path("out") / "data.txt").write_bytes(Path(files[0]).read_bytes())
    SPENT.append(time.perf_counter() - t0)
    return {}
"""


def kollm_project(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "input.txt").write_text("안녕하세요 " * 100, encoding="utf-8")
    (root / "bench_steps.py").write_text(STEP_MODULE)
    steps = []
    for i in range(N_STEPS):
        inputs = "{src: source}" if i == 0 else "{src: corpus}"
        wire = "inputs: {src: raw}" if i == 0 else f"inputs: {{src: s{i - 1}}}"
        # params.i gives each step its own cache key: otherwise steps 2-6 (same code, config and input bytes) would
        # share step 1's key and be reused on the first run, while dvc runs all six commands
        steps.append(
            f"  - {{kind: python, name: s{i}, {wire}, config: {{callable: 'bench_steps:noop', inputs: {inputs}, outputs: {{out: corpus}}, params: {{i: {i}}}}}}}"
        )
    (root / "kollm.yaml").write_text(
        "project: bench\ndata: {raw: {path: input.txt}}\nsteps:\n" + "\n".join(steps) + "\n", encoding="utf-8"
    )


def dvc_project(root: Path, dvc_bin: str) -> None:
    root.mkdir(parents=True)
    (root / "input.txt").write_text("안녕하세요 " * 100, encoding="utf-8")
    stages = []
    prev = "input.txt"
    for i in range(N_STEPS):
        out = f"s{i}.txt"
        stages.append(f"  s{i}:\n    cmd: cp {prev} {out}\n    deps: [{prev}]\n    outs: [{out}]")
        prev = out
    (root / "dvc.yaml").write_text("stages:\n" + "\n".join(stages) + "\n")
    subprocess.run([dvc_bin, "init", "--no-scm", "-q"], cwd=root, check=True)
    subprocess.run([dvc_bin, "config", "core.analytics", "false"], cwd=root, check=True)


def in_dir(folder: Path, fn):
    """Call fn() with `folder` as the working directory (dvc works on the current folder)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        return fn()
    finally:
        os.chdir(before)


def wall(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def quickstart(repeats: int, out: Path, kollm_bin: str, dvc_bin: str | None) -> None:
    """The quickstart's fully cached rerun as a process (and in-process) against `dvc repro` of a cached pipeline
    with the same number of stages."""
    import kollm
    from kollm.examples import init_project

    base = Path(tempfile.mkdtemp(prefix="kollm-bench-qs-"))
    res: dict[str, list[float]] = {"k_cached_cli": [], "k_cached_inproc": [], "d_cached_cli": []}
    try:
        proj = init_project(base / "qs", "korean-quickstart")
        t0 = time.perf_counter()
        subprocess.run([kollm_bin, "run", "--quiet"], cwd=proj, check=True, capture_output=True)
        first_s = time.perf_counter() - t0
        n_steps = len(kollm.load(proj).steps)
        if dvc_bin:
            global N_STEPS
            N_STEPS = n_steps
            dproj = base / "dvc"
            dvc_project(dproj, dvc_bin)
            subprocess.run([dvc_bin, "repro", "-q"], cwd=dproj, check=True, capture_output=True)
        for _ in range(repeats):
            res["k_cached_cli"].append(wall([kollm_bin, "run", "--quiet"], proj))
            if dvc_bin:
                res["d_cached_cli"].append(wall([dvc_bin, "repro", "-q"], dproj))
        for _ in range(repeats):
            t0 = time.perf_counter()
            again = kollm.run(proj)
            res["k_cached_inproc"].append(time.perf_counter() - t0)
            assert all(s.cache_hit for s in again.steps.values())
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) if v else None for k, v in res.items()}
    k, d = med["k_cached_cli"], med["d_cached_cli"]
    print(
        f"\nquickstart — {n_steps} steps, first run {first_s:.0f}s, median of {repeats} cached reruns ({os.cpu_count()} cores)"
    )
    print(f"{'measure':34} {'kollm':>9} {'dvc':>9} {'dvc/kollm':>10}  note")
    ratio = f"{d / k:.2f}x" if d else "-"
    print(
        f"{'cached rerun as a process (s)':34} {k:9.3f} {d if d is not None else float('nan'):9.3f} {ratio:>10}  target: kollm <= dvc"
    )
    print(f"{'cached rerun in-process (s)':34} {med['k_cached_inproc']:9.3f} {'':>9} {'':>10}  imports done")
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "case": "quickstart",
        "steps": n_steps,
        "first_run_s": first_s,
        "repeats": repeats,
        "median": med,
        "raw": res,
    }
    out.write_text(json.dumps(doc, indent=2))
    print(f"results: {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--quickstart", action="store_true", help="the Korean quickstart's cached rerun (a full first run first)"
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    import kollm

    kollm_bin = str(Path(sys.executable).parent / "kollm")
    local_dvc = Path(sys.executable).parent / "dvc"
    dvc_bin = str(local_dvc) if local_dvc.exists() else shutil.which("dvc")
    if args.quickstart:
        quickstart(
            args.repeats, args.out or Path("benchmarks/results/pipeline_overhead_quickstart.json"), kollm_bin, dvc_bin
        )
        return
    args.out = args.out or Path("benchmarks/results/pipeline_overhead.json")
    base = Path(tempfile.mkdtemp(prefix="kollm-bench-"))
    res: dict[str, list[float]] = {
        k: []
        for k in (
            "k_overhead",
            "k_first",
            "k_cached_inproc",
            "k_cached_cli",
            "d_first",
            "d_cached_inproc",
            "d_cached_cli",
        )
    }
    try:
        warm = base / "warm"
        kollm_project(warm)
        kollm.run(warm)  # creates the MLflow database, imports everything once
        if dvc_bin:
            from dvc.cli import main as dvc_main

            dwarm = base / "dwarm"
            dvc_project(dwarm, dvc_bin)
            subprocess.run([dvc_bin, "repro", "-q"], cwd=dwarm, check=True, capture_output=True)
            in_dir(dwarm, lambda: dvc_main(["repro", "-q"]))  # dvc imports lazily: warm it up once, like kollm
        for r in range(args.repeats):
            proj = base / f"k{r}"
            kollm_project(proj)
            t0 = time.perf_counter()
            first = kollm.run(proj)
            res["k_first"].append(time.perf_counter() - t0)
            spent = list(sys.modules["bench_steps"].SPENT)  # the module the runner imported from this project
            res["k_overhead"] += [d - s for d, s in zip(first.durations.values(), spent)]
            t0 = time.perf_counter()
            again = kollm.run(proj)
            res["k_cached_inproc"].append(time.perf_counter() - t0)
            assert all(s.cache_hit for s in again.steps.values())
            res["k_cached_cli"].append(wall([kollm_bin, "run", "--quiet"], proj))
            if dvc_bin:
                dproj = base / f"d{r}"
                dvc_project(dproj, dvc_bin)
                res["d_first"].append(wall([dvc_bin, "repro", "-q"], dproj))
                res["d_cached_cli"].append(wall([dvc_bin, "repro", "-q"], dproj))
                t0 = time.perf_counter()
                assert in_dir(dproj, lambda: dvc_main(["repro", "-q"])) == 0
                res["d_cached_inproc"].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    med = {k: statistics.median(v) if v else None for k, v in res.items()}
    rows = [
        ("median per-step overhead (ms)", med["k_overhead"] * 1000, None, "target < 100 ms"),
        ("first run, 6 steps (s)", med["k_first"], med["d_first"], "kollm in-process; dvc as a process"),
        (
            "cached rerun in-process (s)",
            med["k_cached_inproc"],
            med["d_cached_inproc"],
            "target < 1 s; imports done, no interpreter start",
        ),
        ("cached rerun as a process (s)", med["k_cached_cli"], med["d_cached_cli"], "both include interpreter start"),
    ]
    print(f"\npipeline overhead — {N_STEPS} no-op steps, median of {args.repeats} repeats ({os.cpu_count()} cores)")
    print(f"{'measure':34} {'kollm':>9} {'dvc':>9} {'dvc/kollm':>10}  note")
    for name, k, d, note in rows:
        ratio = f"{d / k:.2f}x" if d else "-"
        print(f"{name:34} {k:9.3f} {d if d is not None else float('nan'):9.3f} {ratio:>10}  {note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"steps": N_STEPS, "repeats": args.repeats, "median": med, "raw": res}, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
