"""A cached rerun imports only what deciding "cached" needs: no numpy, pandas, pyarrow, torch, transformers or MLflow
(together seconds of a fresh `kollm run`; the quickstart's cached rerun is to take no longer than `dvc repro`). The
step kinds' modules load their heavy packages inside the functions that run a step."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import kollm
from kollm.examples import init_project

HEAVY = ("numpy", "pandas", "pyarrow", "torch", "transformers", "mlflow", "sqlalchemy")


def _heavy_after(script: str) -> list[str]:
    """The HEAVY modules a fresh interpreter holds after running `script`."""
    code = script + f"\nimport sys\nprint('heavy:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    return [m for m in last.removeprefix("heavy:").split(",") if m]


def test_planning_the_quickstart_imports_no_heavy_module(tmp_path):
    """Every kind of the quickstart (prepare, cpt, sft, align, evaluate, register): its config validated, its
    references resolved, and the keys of the steps that read data sources computed, as a cached rerun does."""
    proj = init_project(tmp_path / "qs", "korean-quickstart")
    script = textwrap.dedent(f"""
        from kollm.pipeline.plan import plan
        from kollm.pipeline.spec import load_pipeline

        p = plan(load_pipeline({str(proj)!r}))
        assert sorted({{s.kind for s in p.steps}}) == ["align", "cpt", "evaluate", "prepare", "register", "sft"]
        for step in p.steps:
            if all(ref.source for ref in step.inputs.values()):
                print(step.name, p.key(step, p.inputs(step, {{}})))
    """)
    assert _heavy_after(script) == []


def test_cached_rerun_with_a_prepare_step_imports_no_heavy_module(tmp_path):
    root = tmp_path / "p"
    (root / "data").mkdir(parents=True)
    syllables = "가나다라마바사아자차카타파하거너더러머버서어저처커터퍼허고노도로모보소오조초"
    rng = random.Random(7)
    paragraphs = [" ".join("".join(rng.choices(syllables, k=3)) for _ in range(12)) + "." for _ in range(12)]
    (root / "data" / "corpus.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    (root / "kollm.yaml").write_text(
        textwrap.dedent("""\
            project: cached-imports
            data: {corpus: {path: data/corpus.txt}}
            steps:
              - kind: prepare
                name: prep
                inputs: {source: corpus}
                config: {dataset: corpus, txt_mode: paragraph, split: {eval_fraction: 0.2}}
            """),
        encoding="utf-8",
    )
    first = kollm.run(root)
    assert first.steps["prep"].metrics["rows_kept"] == 12
    script = textwrap.dedent(f"""
        import kollm
        result = kollm.run({str(Path(root))!r})
        assert all(r.cache_hit for r in result.steps.values()), result.steps
    """)
    assert _heavy_after(script) == []
