"""`align` through the real runner: DPO after cpt -> sft, reward margins in the step metrics, a loadable model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kollm

HERE = Path(__file__).parent


def _project(tmp_path: Path, align_config: str) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_test_helpers", HERE / "test_sft.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    steps = (
        helpers.CPT
        + "- kind: sft\n  config: {seq_len: 128, max_steps: 6, lr: 5.0e-3, batch_size: 4, log_every: 3}\n"
        + f"- kind: align\n  config: {align_config}\n"
    )
    return helpers.make_project(tmp_path / "p", steps)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_align_after_sft(tmp_path, method):
    root = _project(tmp_path, f"{{method: {method}, beta: 0.5, seq_len: 128, max_steps: 10, lr: 5.0e-3, batch_size: 4, log_every: 2}}")
    result = kollm.run(root)
    rec = result.steps["align"]
    model = rec.outputs["model"]
    assert model.meta["method"] == method
    meta = json.loads((model.path / "kollm.json").read_text())
    assert meta["base_model"]["digest"] == result.steps["sft"].outputs["model"].digest
    assert meta["data"]["data"]["digest"] == result.steps["data"].outputs["prefs"].digest
    assert rec.metrics["eval_reward_accuracy"] >= 0.5
    assert rec.metrics["eval_reward_margin"] > 0
    lines = [json.loads(x) for x in (root / ".kollm" / "logs" / "training" / "align.jsonl").read_text().splitlines()]
    assert lines[-1]["reward_margin"] > lines[0]["reward_margin"]
