"""Serving registry URIs: the alias resolves to a version, and that version is what responses name."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from kollm import registry
from kollm.errors import NotFound
from kollm.serve import create_app, describe_model_uri, load_engine, resolve

pytestmark = pytest.mark.slow(reason="registers and loads models through MLflow's registry")


def test_models_uri_resolves_alias_to_version(tmp_path, tiny_model_dir):
    project = tmp_path / "proj"
    project.mkdir()
    (project / "kollm.yaml").write_text(
        "project: serve-test\nsteps:\n  - kind: python\n    config: {callable: 'm:f'}\n"
    )
    c = registry.client(project)
    exp_id = c.create_experiment("serve-test", artifact_location=(project / "mlartifacts").as_uri())
    for alias in ("champion", "challenger"):
        registry.register_folder(
            "ko-tiny",
            tiny_model_dir,
            run_id=c.create_run(exp_id).info.run_id,
            tags={},
            alias=alias,
            project_dir=project,
        )

    assert describe_model_uri("models:/ko-tiny@champion", project) == ("ko-tiny", "1")
    assert describe_model_uri("models:/ko-tiny@challenger", project) == ("ko-tiny", "2")
    assert describe_model_uri("models:/ko-tiny/2", project) == ("ko-tiny", "2")
    assert describe_model_uri(str(tiny_model_dir)) == ("model", "local")
    with pytest.raises(NotFound, match="no alias 'canary'"):
        describe_model_uri("models:/ko-tiny@canary", project)

    folder = resolve("models:/ko-tiny@champion", project)
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    name, version = describe_model_uri("models:/ko-tiny@champion", project)
    with TestClient(create_app(load_engine(folder, device="cpu"), model_name=name, model_version=version)) as client:
        r = client.post("/v1/completions", json={"model": "ko-tiny", "prompt": "안녕", "max_tokens": 3})
        assert r.status_code == 200 and r.headers["x-kollm-model-version"] == "1"
        assert r.json()["system_fingerprint"] == "1"
