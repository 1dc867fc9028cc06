"""Build small projects with `python` steps for runner tests."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

STEPS_PY = """
import json, os, time
from pathlib import Path

def make_corpus(ctx):
    lines = []
    for f in ctx.inputs["src"].meta["files"]:
        lines += Path(f).read_text(encoding="utf-8").splitlines()
    out = ctx.output_path("data")
    (out / "lines.txt").write_text("\\n".join(l.upper() for l in lines), encoding="utf-8")
    _touch(ctx, "make_corpus")
    return {"rows": len(lines)}

def count(ctx):
    text = (ctx.inputs["data"].path / "lines.txt").read_text(encoding="utf-8")
    marker = os.environ.get("KOLLM_TEST_MARKER")
    if marker and ctx.name == os.environ.get("KOLLM_TEST_SLOW_STEP"):
        Path(marker).write_text(str(os.getpid()))
        release = os.environ.get("KOLLM_TEST_RELEASE")  # wait until the test creates this file (at most 5 min)
        deadline = time.time() + (300 if release else 60)
        while time.time() < deadline and not (release and os.path.exists(release)):
            time.sleep(0.05)
    (ctx.output_path("m") / "metrics.json").write_text(json.dumps({"n": len(text)}))
    _touch(ctx, "count:" + ctx.name)
    return {"chars": len(text) * ctx.config.params.get("scale", 1)}

def flaky(ctx):
    state = ctx.project_dir / "flaky-count"
    n = int(state.read_text()) if state.exists() else 0
    state.write_text(str(n + 1))
    if n < ctx.config.params["fail_times"]:
        raise RuntimeError(f"transient failure {n + 1}")
    (ctx.output_path("m") / "ok.txt").write_text("ok")
    return {"attempts": n + 1}

def published_meanwhile(ctx):
    # Another attempt of this step (a retry that went on while this one was left running) publishes it while this
    # one runs, as the runner does: the outputs, then the checkpoint folder removed (and this attempt's lease with it).
    import shutil
    from kollm.pipeline.store import LocalStore
    if ctx.config.params.get("publish", True):
        store = LocalStore(ctx.state_dir)
        other = store.stage(ctx.key)
        (other / "m").mkdir()
        (other / "m" / "who.txt").write_text("the other attempt")
        outputs = {"m": {"type": "metrics", "digest": "sha256:other", "meta": {}}}
        store.publish(ctx.key, other, {"name": ctx.name, "kind": ctx.kind, "key": ctx.key, "outputs": outputs,
                                       "metrics": {"who": 2.0}})
    shutil.rmtree(ctx.checkpoint_dir)
    (ctx.output_path("m") / "who.txt").write_text("this attempt")
    return {"who": 1.0}

def nap(ctx):
    import time as _t
    started = _t.time()
    _t.sleep(ctx.config.params.get("seconds", 1.5))
    (ctx.output_path("m") / "t.json").write_text(json.dumps({"name": ctx.name}))
    _touch(ctx, "nap:" + ctx.name)
    return {"started": started, "ended": _t.time()}

def forgets_output(ctx):
    return {}

def _touch(ctx, what):
    with open(ctx.project_dir / "calls.log", "a") as f:
        f.write(what + "\\n")
"""


def make_project(root: Path, *, steps_yaml: str | None = None, scale: int = 1, module: str | None = None) -> Path:
    """A project with a 3-step pipeline of `python` steps. Each project gets its own module name, because
    Python caches imported modules by name for the life of the test process."""
    module = module or f"steps_{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "a.txt").write_text("안녕하세요\n반갑습니다\n", encoding="utf-8")
    (root / "data" / "b.txt").write_text("한국어 말뭉치\n", encoding="utf-8")
    (root / f"{module}.py").write_text(STEPS_PY, encoding="utf-8")
    steps_yaml = steps_yaml or textwrap.dedent(
        f"""\
        - kind: python
          name: corpus
          inputs: {{src: raw}}
          config: {{callable: "mysteps:make_corpus", inputs: {{src: source}}, outputs: {{data: corpus}}}}
        - kind: python
          name: count
          config: {{callable: "mysteps:count", inputs: {{data: corpus}}, outputs: {{m: metrics}}, params: {{scale: {scale}}}}}
        - kind: python
          name: count2
          config: {{callable: "mysteps:count", inputs: {{data: corpus}}, outputs: {{m: metrics}}}}
        """
    )
    steps_yaml = steps_yaml.replace("mysteps:", f"{module}:")
    (root / "kollm.yaml").write_text(
        "project: testproj\ndata:\n  raw: {path: data/*.txt}\nsteps:\n" + textwrap.indent(steps_yaml, "  "),
        encoding="utf-8",
    )
    return root


def calls(root: Path) -> list[str]:
    log = root / "calls.log"
    return log.read_text().split() if log.exists() else []
