"""The loop on CPU, on a running gateway: `kollm serve models:/N@champion --canary models:/N@challenger` serves the
champion under load; new data arrives -> `kollm watch` retrains (kollm.run) and registers a challenger -> the
gateway, following the challenger alias, loads it as its canary -> the rollout promotes it. Then a challenger that
passes the gate but fails half its requests (fault injection on the canary) is rolled back. No request on the
stable arm fails."""

from __future__ import annotations

import json
import random
import shutil
import textwrap
from pathlib import Path

import pytest

from kollm.monitor.watch import WatchSettings, run_cycle
from tests.rollout.conftest import Load, Server

pytestmark = pytest.mark.slow(reason="a gateway under load, two retrainings and two rollouts")

STEPS_PY = """
from looptiny import save_tiny

def build(ctx):
    seed = int(ctx.inputs["data"].digest.split(":")[1][:6], 16) % 1000  # new data, new model
    save_tiny(ctx.output_path("model"), seed=seed, init_range=0.5)
    return {"seed": seed}
"""
DOCS = [
    "서울은 대한민국의 수도입니다",
    "오늘은 날씨가 맑고 따뜻합니다",
    "한국어 언어 모델을 평가합니다",
    "도서관에서 책을 빌려 읽었습니다",
]


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
    (root / "data" / "suite.jsonl").write_text(
        json.dumps({"prompt": "대한민국의 수도는?", "expected": "서울", "metric": "contains"}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    shutil.copy(Path(__file__).parents[1] / "tiny.py", root / "looptiny.py")
    (root / "loopsteps.py").write_text(STEPS_PY, encoding="utf-8")
    (root / "kollm.yaml").write_text(
        textwrap.dedent("""\
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
        """),
        encoding="utf-8",
    )
    return root


def _gateway(project: Path, *, faults: str | None = None):
    """What `kollm serve models:/looptest@champion --canary models:/looptest@challenger [--inject-faults F]` builds:
    it follows the challenger alias (every 0.3 s here), so a version `watch` registers later becomes its canary."""
    from kollm.rollout.serving import build_canary_gateway
    from kollm.serve.faults import parse_faults

    return build_canary_gateway(
        "models:/looptest@champion",
        "models:/looptest@challenger",
        project_dir=project,
        follow_interval=0.3,
        canary_faults=parse_faults(faults) if faults else None,
        device="cpu",
        max_batch_size=8,
    )


def test_watch_retrains_and_the_canary_promotes_then_a_faulty_challenger_is_rolled_back(tmp_path):
    import kollm
    from kollm import registry

    project = _project(tmp_path / "loop")
    kollm.run(project)
    registry.promote("looptest", "1", reason="first model", project_dir=project)
    settings = WatchSettings(
        project_dir=project,
        model_name="looptest",
        rollout_steps="50",
        rollout_pause="1s",
        rollout_min_requests=3,
        rollout_timeout_s=300,
        canary_load_timeout_s=120,
        poll_s=0.2,
    )
    assert run_cycle(settings).kind == "baseline"

    # the gateway serves the champion (the challenger alias names it too: no canary yet) while new data arrives;
    # `watch` retrains, registers version 2, the gateway loads it as its canary, and the rollout promotes it
    with Server(_gateway(project)) as srv, Load(srv.url, "looptest", threads=2) as load:
        settings.gateway = srv.url
        gw = get_status(srv.url)["gateway"]
        assert (gw["stable_version"], gw["canary_version"]) == ("1", None)
        _append(project, 1000, 30)
        promoted = run_cycle(settings)
        assert promoted.kind == "promoted", promoted.message
        assert (
            promoted.version == "2" and [t.kind for t in promoted.triggers] == ["data"] and "prep" in promoted.steps_run
        )
        assert get_status(srv.url)["gateway"]["stable_version"] == "2"
    assert registry.show("looptest", "champion", project).version == "2"
    assert load.result.failed == [] and load.result.ok > 0
    assert set(load.result.versions()) == {"1", "2"}

    # a gateway whose canaries fail half their requests: version 3 passes the gate and is rolled back
    with Server(_gateway(project, faults="error_rate=0.5,seed=1")) as srv, Load(srv.url, "looptest", threads=2) as load:
        settings.gateway = srv.url
        _append(project, 2000, 30)
        rolled_back = run_cycle(settings)
        assert rolled_back.kind == "rolled_back" and rolled_back.version == "3", rolled_back.message
    assert registry.show("looptest", "champion", project).version == "2"
    assert load.result.failed == [], load.result.failed[:5]  # no failed request on the stable arm
    assert load.result.canary_errors > 0


def get_status(url: str) -> dict:
    from kollm.rollout.client import command

    return command("status", gateway=url)
