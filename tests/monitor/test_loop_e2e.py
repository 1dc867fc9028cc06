"""The loop on CPU: new data -> `kollm watch` retrains (kollm.run) and registers a challenger -> the canary gateway
(`kollm serve models:/N@champion --canary models:/N@challenger`, started after registration) rolls it out under
load and promotes it; then a challenger that passes the gate but fails half its requests (fault injection) is
rolled back. No request on the stable arm fails."""

from __future__ import annotations

import json
import random
import shutil
import textwrap
from pathlib import Path

import pytest

from kollm.monitor.watch import WatchSettings, roll_out, run_cycle
from tests.rollout.conftest import Load, Server

pytestmark = pytest.mark.slow

STEPS_PY = '''
from looptiny import save_tiny

def build(ctx):
    seed = int(ctx.inputs["data"].digest.split(":")[1][:6], 16) % 1000  # new data, new model
    save_tiny(ctx.output_path("model"), seed=seed, init_range=0.5)
    return {"seed": seed}
'''
DOCS = ["서울은 대한민국의 수도입니다", "오늘은 날씨가 맑고 따뜻합니다", "한국어 언어 모델을 평가합니다", "도서관에서 책을 빌려 읽었습니다"]


def _append(root: Path, start: int, n: int) -> None:
    with open(root / "data" / "corpus.jsonl", "a", encoding="utf-8") as f:
        for i in range(start, start + n):
            # six words of random syllables: no row near-duplicates another, so prepare's eval split keeps its rows
            rng = random.Random(i)
            words = " ".join("".join(chr(0xAC00 + rng.randrange(11172)) for _ in range(3)) for _ in range(6))
            f.write(json.dumps({"text": f"{DOCS[i % 4]}. {words}. 문서 번호 {i}번입니다."}, ensure_ascii=False) + "\n")


def _project(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    _append(root, 0, 60)
    (root / "data" / "suite.jsonl").write_text(json.dumps({"prompt": "대한민국의 수도는?", "expected": "서울", "metric": "contains"},
                                                          ensure_ascii=False) + "\n", encoding="utf-8")
    shutil.copy(Path(__file__).parents[1] / "tiny.py", root / "looptiny.py")
    (root / "loopsteps.py").write_text(STEPS_PY, encoding="utf-8")
    (root / "kollm.yaml").write_text(textwrap.dedent("""\
        project: looptest
        data:
          corpus: {path: data/corpus.jsonl}
          suite: {path: data/suite.jsonl}
        steps:
          - kind: prepare
            name: prep
            inputs: {source: corpus}
            config: {dataset: corpus, split: {eval_fraction: 0.2}, filters: {min_chars: 5}}
          - kind: python
            name: build
            inputs: {data: prep.dataset}
            config: {callable: "loopsteps:build", inputs: {data: corpus}, outputs: {model: model}}
          - kind: evaluate
            inputs: {suite: suite}
            config: {generation: {max_new_tokens: 4}, gate: ["perplexity <= 100000"]}
          - kind: register
        """), encoding="utf-8")
    return root


def _gateway(project: Path, *, faults: str | None = None):
    """What `kollm serve models:/looptest@champion --canary models:/looptest@challenger` builds; with `faults`, the
    canary's engine is wrapped like `kollm serve --inject-faults` does."""
    from kollm.rollout.api import attach_rollout
    from kollm.serve import create_app, describe_model_uri, load_engine, resolve
    from kollm.serve.faults import FaultyEngine, parse_faults
    from kollm.serve.gateway import Arm, Gateway

    arms = []
    for uri, bad in (("models:/looptest@champion", None), ("models:/looptest@challenger", faults)):
        _, version = describe_model_uri(uri, project)
        engine = load_engine(resolve(uri, project), device="cpu", max_batch_size=8)
        if bad:
            engine = FaultyEngine(engine, parse_faults(bad))
        arms.append(Arm(create_app(engine, model_name="looptest", model_version=version), version=version, model_name="looptest"))
    gw = Gateway(*arms)
    attach_rollout(gw, project_dir=project, model_name="looptest")
    return gw


def test_watch_retrains_and_the_canary_promotes_then_a_faulty_challenger_is_rolled_back(tmp_path):
    import kollm
    from kollm import registry

    project = _project(tmp_path / "loop")
    kollm.run(project)
    registry.promote("looptest", "1", reason="first model", project_dir=project)
    settings = WatchSettings(project_dir=project, model_name="looptest", rollout_steps="50", rollout_pause="1s",
                             rollout_min_requests=3, rollout_timeout_s=300, poll_s=0.2)
    assert run_cycle(settings).kind == "baseline"

    _append(project, 1000, 30)  # new Korean data arrives
    outcome = run_cycle(settings)
    assert outcome.kind == "registered" and outcome.version == "2", outcome.message
    assert [t.kind for t in outcome.triggers] == ["data"] and "prep" in outcome.steps_run

    with Server(_gateway(project)) as srv, Load(srv.url, "looptest", threads=2) as load:
        settings.gateway = srv.url
        promoted = roll_out(settings, "looptest", "2")
    assert promoted.kind == "promoted", promoted.message
    assert registry.show("looptest", "champion", project).version == "2"
    assert load.result.failed == [] and load.result.ok > 0

    settings.gateway = None
    _append(project, 2000, 30)
    outcome = run_cycle(settings)
    assert outcome.kind == "registered" and outcome.version == "3", outcome.message  # it passed the gate
    with Server(_gateway(project, faults="error_rate=0.5,seed=1")) as srv, Load(srv.url, "looptest", threads=2) as load:
        settings.gateway = srv.url
        rolled_back = roll_out(settings, "looptest", "3")
    assert rolled_back.kind == "rolled_back", rolled_back.message
    assert registry.show("looptest", "champion", project).version == "2"
    assert load.result.failed == [], load.result.failed[:5]  # no failed request on the stable arm
    assert load.result.canary_errors > 0
