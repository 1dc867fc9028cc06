"""Cache keys that never lie, per-key locks, parallel steps, a store given as a URL, and `kollm step run --input`.
Each of the first tests reproduces a wrong answer of the previous runner (issue #13)."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

import kollm
from kollm import registry
from kollm.errors import ConfigError, GateFailed
from kollm.pipeline.plan import plan
from kollm.pipeline.spec import load_pipeline
from kollm.pipeline.step import StepKind
from kollm.steps import KINDS, load_kind
from tests.steps.evalproject import make_project as make_eval_project

from .helpers import calls, make_project


def test_every_step_kind_implements_the_protocol():
    import inspect

    for kind in KINDS:
        module = load_kind(kind)
        assert isinstance(module, StepKind), kind
        assert module.KIND == kind
        for fn in ("inputs", "outputs", "code", "references", "run"):
            params = list(inspect.signature(getattr(module, fn)).parameters)
            assert params == list(inspect.signature(getattr(StepKind, fn)).parameters)[1:], (kind, fn, params)


def test_moving_champion_re_checks_a_relative_gate(tmp_path):
    """Found 1: `registry promote` moved champion, yet `kollm run` reused the cached evaluate and register."""
    project = make_eval_project(tmp_path / "p", gate=["perplexity <= champion * 0.5"])
    first = kollm.run(project)  # no champion yet: the relative rule is skipped, v1 registered as challenger
    assert registry.show("evaltest", "challenger", project).version == "1"
    registry.promote("evaltest", reason="test", project_dir=project)
    # champion is now this very model, so "at most half the champion's perplexity" must fail, with or without --force
    with pytest.raises(GateFailed, match="perplexity"):
        kollm.run(project)
    with pytest.raises(GateFailed, match="perplexity"):
        kollm.run(project, force=["evaluate"])
    assert len(registry.list_versions("evaltest", project)) == 1
    keys = json.loads((first.steps["evaluate"].outputs["metrics"].path.parent / "step.json").read_text())["references"]
    assert keys == {"registry:evaltest@champion": "none"}


CPT_PROJECT = """\
project: noop
data:
  corpus: {{path: data/corpus.txt}}
steps:
  - kind: prepare
    name: prep
    config: {{dataset: corpus, txt_mode: paragraph, split: {{eval_fraction: 0.2}}, filters: {{min_chars: 20}}}}
  - kind: cpt
    config: {{base_model: scratch, preset: tiny, vocab_size: 300, seq_len: 32, max_steps: 3, batch_size: 2, checkpoint_every: 0{extra}}}
  - kind: evaluate
    config: {{gate: ["perplexity <= 1000000"]}}
  - kind: register
"""


def _cpt_project(root: Path, extra: str = "") -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    if not (root / "data" / "corpus.txt").exists():
        import random

        rng = random.Random(0)
        syl = "가나다라마바사아자차카타파하서울부산한국어문장입니다오늘날씨좋네요학교공부책"
        docs = [
            " ".join("".join(rng.choice(syl) for _ in range(rng.randint(2, 4))) for _ in range(12)) for _ in range(40)
        ]
        (root / "data" / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")
    (root / "kollm.yaml").write_text(CPT_PROJECT.format(extra=extra), encoding="utf-8")
    return root


def test_no_op_changes_stop_the_cascade(tmp_path):
    """Found 2: `log_every: 2` re-ran cpt with identical weights, then sft, evaluate, register and a new version;
    one appended corpus row that the filters reject did the same (digests covered kollm.json / stats.json)."""
    root = _cpt_project(tmp_path / "p")
    first = kollm.run(root)
    _cpt_project(root, extra=", log_every: 2")
    second = kollm.run(root)
    hits = {n: r.cache_hit for n, r in second.steps.items()}
    assert hits == {"prep": True, "cpt": False, "evaluate": True, "register": True}
    assert second.steps["cpt"].outputs["model"].digest == first.steps["cpt"].outputs["model"].digest
    with open(root / "data" / "corpus.txt", "a", encoding="utf-8") as f:
        f.write("\n\n짧음\n")  # rejected by min_chars
    third = kollm.run(root)
    hits = {n: r.cache_hit for n, r in third.steps.items()}
    assert hits == {"prep": False, "cpt": True, "evaluate": True, "register": True}
    stats = json.loads((third.steps["prep"].outputs["dataset"].path / "stats.json").read_text())
    assert stats != json.loads((first.steps["prep"].outputs["dataset"].path / "stats.json").read_text())
    assert len(registry.list_versions("noop", root)) == 1


def test_local_base_model_folder_is_keyed_by_content_and_named_in_lineage(tmp_path):
    """Found 3: a local base_model folder was keyed by its path, and lineage named the previous step's model."""
    from tests.tiny import save_tiny

    root = tmp_path / "p"
    (root / "data").mkdir(parents=True)
    (root / "data" / "chat.jsonl").write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"질문 {i}"},
                        {"role": "assistant", "content": f"대답 {i}입니다"},
                    ]
                },
                ensure_ascii=False,
            )
            for i in range(30)
        ),
        encoding="utf-8",
    )
    save_tiny(root / "base", seed=0)
    (root / "kollm.yaml").write_text(
        textwrap.dedent("""\
        project: basefolder
        data: {chat: {path: data/chat.jsonl}}
        steps:
          - {kind: prepare, name: prep, config: {dataset: instructions, split: {eval_fraction: 0.1}, filters: {min_chars: 1, min_hangul_ratio: 0}}}
          - {kind: sft, name: first, config: {base_model: base, seq_len: 32, max_steps: 1, batch_size: 2}}
          - {kind: sft, name: second, config: {base_model: base, seq_len: 32, max_steps: 2, batch_size: 2}}
        """),
        encoding="utf-8",
    )
    pipe = load_pipeline(root)
    assert "model" not in pipe.steps[2].inputs  # trained from base/, not from `first`'s model
    first = kollm.run(root)
    assert json.loads((first.steps["second"].outputs["model"].path / "kollm.json").read_text())["base_model"][
        "source"
    ].endswith("/base")
    assert kollm.run(root).steps["second"].cache_hit
    save_tiny(root / "base", seed=1)  # new weights saved into the same folder
    again = kollm.run(root)
    assert not again.steps["first"].cache_hit and not again.steps["second"].cache_hit


def test_evaluate_error_paths_are_clear_messages(tmp_path):
    """Found 5: two error paths in evaluate raised TypeError (ConfigError took no hint=)."""
    project = make_eval_project(tmp_path / "p", gate=[], register=False)
    (project / "data" / "suite.jsonl").unlink()
    (project / "data" / "suite").mkdir()
    (project / "data" / "suite" / "notes.txt").write_text("not a suite")
    text = (project / "kollm.yaml").read_text().replace("suite: {path: data/suite.jsonl}", "suite: {path: data/suite}")
    (project / "kollm.yaml").write_text(text)
    with pytest.raises(ConfigError, match="has no .jsonl file") as e:
        kollm.run(project)
    assert e.value.hint == "point it at the suite JSONL"


def test_independent_steps_run_at_the_same_time(tmp_path):
    steps = """\
- {kind: python, name: a, config: {callable: "mysteps:nap", outputs: {m: metrics}, params: {seconds: 2}}}
- {kind: python, name: b, config: {callable: "mysteps:nap", outputs: {m: metrics}, params: {seconds: 2.1}}}
"""
    root = make_project(tmp_path / "p", steps_yaml=steps)
    result = kollm.run(root)
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/.kollm/mlflow.db")
    a, b = (client.get_run(result.steps[n].run_id).info for n in ("a", "b"))
    assert a.start_time < b.end_time and b.start_time < a.end_time  # the intervals MLflow recorded overlap
    ma, mb = result.steps["a"].metrics, result.steps["b"].metrics
    assert ma["started"] < mb["ended"] and mb["started"] < ma["ended"]


def test_cached_independent_steps_are_read_here_without_child_processes(tmp_path):
    """Independent steps run in child processes (`kollm step run`); when they are cached, the rerun reads them in
    this process instead: a child's interpreter start and imports cost seconds per step (the quickstart's cached
    rerun took 15-20 s in-process, now a fraction of a second)."""
    steps = """\
- {kind: python, name: a, config: {callable: "mysteps:nap", outputs: {m: metrics}, params: {seconds: 0.1}}}
- {kind: python, name: b, config: {callable: "mysteps:nap", outputs: {m: metrics}, params: {seconds: 0.1}}}
"""
    root = make_project(tmp_path / "p", steps_yaml=steps)
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/.kollm/mlflow.db")
    first = kollm.run(root)
    pids = {n: client.get_run(first.steps[n].run_id).data.tags["kollm.pid"] for n in ("a", "b")}
    assert str(os.getpid()) not in pids.values()  # computed in child processes
    again = kollm.run(root)
    assert all(r.cache_hit for r in again.steps.values())
    for n in ("a", "b"):
        assert client.get_run(again.steps[n].run_id).data.tags["kollm.pid"] == str(os.getpid())
    forced = kollm.run(root, force=["a", "b"])
    assert str(os.getpid()) not in {client.get_run(forced.steps[n].run_id).data.tags["kollm.pid"] for n in "ab"}


def test_steps_wait_for_resources(tmp_path):
    steps = """\
- {kind: python, name: a, resources: {cpus: 64}, config: {callable: "mysteps:nap", outputs: {m: metrics}, params: {seconds: 0.5}}}
- {kind: python, name: b, config: {callable: "mysteps:nap", outputs: {m: metrics}, params: {seconds: 0.6}}}
"""
    root = make_project(tmp_path / "p", steps_yaml=steps)
    r = kollm.run(root).steps
    assert r["a"].metrics["ended"] <= r["b"].metrics["started"] or r["b"].metrics["ended"] <= r["a"].metrics["started"]


def test_overrides_change_the_key_and_name_the_path(tmp_path):
    root = make_project(tmp_path / "p")
    pipe = load_pipeline(root)
    assert plan(pipe, {"count.params": {"scale": 5}}).step("count").config.params == {"scale": 5}
    with pytest.raises(ConfigError, match="override nope.x: expected STEP.FIELD"):
        plan(pipe, {"nope.x": 1})
    with pytest.raises(ConfigError, match="override count.callable"):
        plan(pipe, {"count.callable": 3})
    base = kollm.run(root)
    scaled = kollm.run(root, overrides={"count.params": {"scale": 5}})
    assert (
        scaled.steps["count"].key != base.steps["count"].key
        and scaled.steps["count"].metrics["chars"] == 5 * base.steps["count"].metrics["chars"]
    )


def _kollm(kollm_bin, *args, env=None, check=True):
    proc = subprocess.run([kollm_bin, *args], capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_step_by_step_with_explicit_inputs_matches_a_normal_run(tmp_path, kollm_bin):
    """The pipeline run step by step (`kollm step run --input`) in separate processes against a store given as a
    file:// URL gives the same output digests as a normal run."""
    normal = kollm.run(make_project(tmp_path / "normal", module="steps_same"))
    root = make_project(tmp_path / "split", module="steps_same")
    store = (tmp_path / "shared-store").as_uri()
    out = tmp_path / "corpus.json"
    corpus = json.loads(
        _kollm(
            kollm_bin, "step", "run", str(root), "--step", "corpus", "--store", store, "--outputs-json", str(out)
        ).stdout
    )
    assert json.loads(out.read_text()) == corpus and corpus["outputs"]["data"]["uri"].startswith(store)
    digests = {"corpus": corpus["outputs"]["data"]["digest"]}
    for name in ("count", "count2"):
        rec = json.loads(
            _kollm(
                kollm_bin,
                "step",
                "run",
                str(root),
                "--step",
                name,
                "--store",
                store,
                "--attempt",
                "0",
                "--input",
                f"data={corpus['outputs']['data']['uri']}",
            ).stdout
        )
        assert not rec["cache_hit"]
        digests[name] = rec["outputs"]["m"]["digest"]
    assert digests == {
        "corpus": normal.steps["corpus"].outputs["data"].digest,
        "count": normal.steps["count"].outputs["m"].digest,
        "count2": normal.steps["count2"].outputs["m"].digest,
    }
    assert not (root / ".kollm" / "steps").exists()  # everything went to the store
    again = json.loads(
        _kollm(
            kollm_bin,
            "step",
            "run",
            str(root),
            "--step",
            "count",
            "--store",
            store,
            "--input",
            f"data={corpus['outputs']['data']['uri']}",
        ).stdout
    )
    assert again["cache_hit"]
    bad = _kollm(kollm_bin, "step", "run", str(root), "--step", "count", "--input", f"data={tmp_path}", check=False)
    assert bad.returncode == 1 and "is not a kollm artifact" in bad.stderr and "Traceback" not in bad.stderr
    bad = _kollm(kollm_bin, "step", "run", str(root), "--step", "count", "--input", "nope=x", check=False)
    assert bad.returncode == 2 and "has no input 'nope'" in bad.stderr


def test_two_runners_on_one_project(tmp_path, kollm_bin):
    """Found 4: two independent `kollm step run` calls on one project could not run at once. Now a step in flight
    is locked by its key only: another step runs beside it, and a second runner reaching it waits and reuses it."""
    root = make_project(tmp_path / "p")
    corpus = json.loads(_kollm(kollm_bin, "step", "run", str(root), "--step", "corpus").stdout)
    uri = corpus["outputs"]["data"]["uri"]
    marker, release = tmp_path / "marker", tmp_path / "release"
    env = {
        **os.environ,
        "KOLLM_TEST_MARKER": str(marker),
        "KOLLM_TEST_SLOW_STEP": "count",
        "KOLLM_TEST_RELEASE": str(release),
    }
    slow = subprocess.Popen(
        [kollm_bin, "step", "run", str(root), "--step", "count", "--input", f"data={uri}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    waiter = None
    try:
        deadline = time.time() + 300
        while not marker.exists():  # `count` is at work (and holds its key) until we create `release`
            assert slow.poll() is None and time.time() < deadline, (
                slow.stderr.read() if slow.poll() is not None else "timeout"
            )
            time.sleep(0.05)
        other = _kollm(kollm_bin, "step", "run", str(root), "--step", "count2", "--input", f"data={uri}")
        assert not json.loads(other.stdout)["cache_hit"] and slow.poll() is None  # count2 ran while count was at work
        waiter = subprocess.Popen(
            [kollm_bin, "run", str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        logs = root / ".kollm" / "logs" / "system"
        while not any("step_waiting" in f.read_text() for f in logs.glob("*.jsonl")):  # it reached `count` in flight
            assert waiter.poll() is None and time.time() < deadline, (
                waiter.stderr.read() if waiter.poll() is not None else "timeout"
            )
            time.sleep(0.05)
        release.write_text("go")
        assert slow.wait(120) == 0
        _, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err
        assert "✓ count (cached" in err  # reused, not computed twice
    finally:
        for p in (slow, waiter):
            if p is not None:
                p.kill()
    assert calls(root) == ["make_corpus", "count:count2", "count:count"]


KILL_AT = """
import os, signal, sys
from mlflow import MlflowClient
import kollm, kollm.registry as registry

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[2] == "before_version":
    MlflowClient.create_model_version = die
else:
    registry._move = die
kollm.run(sys.argv[1])
"""


@pytest.mark.parametrize("point", ["before_version", "before_alias"])
def test_kill_9_inside_register_leaves_one_version(tmp_path, point):
    """Found 6: a kill -9 inside register left two registry versions and two artifact copies after the rerun."""
    import sys

    project = make_eval_project(tmp_path / "p", gate=["perplexity <= 100000"])
    script = tmp_path / "killer.py"
    script.write_text(KILL_AT)
    proc = subprocess.run(
        [sys.executable, str(script), str(project), point],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == -9, proc.stderr
    result = kollm.run(project)
    versions = registry.list_versions("evaltest", project)
    assert [v.version for v in versions] == ["1"]
    assert registry.show("evaltest", "challenger", project).version == "1"
    assert [e.version for e in registry.audit_trail("evaltest", project) if e.alias == "challenger"][-1] == "1"
    client = registry.client(project)
    exp = client.get_experiment_by_name("evaltest").experiment_id
    logged = client.search_runs([exp], filter_string="tags.`kollm.model_logged` = 'true'")
    assert len(logged) == 1  # one copy of the model files
    assert kollm.run(project).steps["register"].cache_hit
    assert result.steps["register"].metrics["registered_version"] == 1
