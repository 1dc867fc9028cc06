"""`kollm run --executor ray`: steps as Ray tasks on the session's local Ray instance, same keys and digests as
the local executor, resources checked against the cluster before anything runs, clear errors."""

from __future__ import annotations

import time

import pytest

import kollm
from kollm.errors import ConfigError, KollmError
from tests.pipeline.helpers import calls, make_project


def test_ray_run_matches_local_and_caches(tmp_path, ray_cluster):
    local = kollm.run(make_project(tmp_path / "local", module="steps_rayexec"))
    root = make_project(tmp_path / "ray", module="steps_rayexec")
    first = kollm.run(root, executor="ray")
    assert {n: r.outputs[o].digest for n, r in first.steps.items() for o in r.outputs} == {
        n: r.outputs[o].digest for n, r in local.steps.items() for o in r.outputs
    }
    assert not any(r.cache_hit for r in first.steps.values())
    assert sorted(calls(root)) == ["count:count", "count:count2", "make_corpus"]
    again = kollm.run(root, executor="ray")
    assert all(r.cache_hit for r in again.steps.values())
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root}/.kollm/mlflow.db")
    run = client.get_run(first.steps["count"].run_id)
    assert run.data.tags["kollm.executor"] == "ray" and run.data.tags["mlflow.parentRunId"] == first.run_id


def test_ray_resources_are_checked_before_anything_runs(tmp_path, ray_cluster):
    steps = """\
- {kind: python, name: big, resources: {gpus: 4, memory: 1000Gi}, config: {callable: "mysteps:nap", outputs: {m: metrics}}}
"""
    root = make_project(tmp_path / "p", steps_yaml=steps)
    t0 = time.time()
    with pytest.raises(ConfigError) as e:
        kollm.run(root, executor="ray")
    assert "steps.big.resources.gpus is 4 but the Ray cluster has 0 GPU(s)" in str(e.value)
    assert "steps.big.resources.memory is 1000Gi" in str(e.value)
    assert time.time() - t0 < 30 and calls(root) == []


def test_unreachable_cluster_and_local_state_are_clear_errors(tmp_path):
    pytest.importorskip("ray")
    root = make_project(tmp_path / "p")
    with pytest.raises(ConfigError) as e:  # a remote cluster cannot see this machine's files
        kollm.run(root, executor="ray", address="ray://127.0.0.1:1")
    assert "tracking.uri is sqlite" in str(e.value) and "--store s3://" in str(e.value)
    cfg = (
        (root / "kollm.yaml")
        .read_text()
        .replace("project: testproj\n", "project: testproj\ntracking: {uri: 'http://127.0.0.1:1'}\n")
    )
    (root / "kollm.yaml").write_text(cfg)
    t0 = time.time()
    with pytest.raises(KollmError, match="cannot reach the Ray cluster at ray://127.0.0.1:1"):
        kollm.run(root, executor="ray", address="ray://127.0.0.1:1", store=str(tmp_path / "shared"))
    assert time.time() - t0 < 30
