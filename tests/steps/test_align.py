"""`align` through the real runner: DPO after cpt -> sft, reward margins in the step metrics, a loadable model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kollm
import kollm.errors

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
    assert meta["data"]["data"]["digest"] == result.steps["gen"].outputs["prefs"].digest
    assert rec.metrics["eval_reward_accuracy"] >= 0.5
    assert rec.metrics["eval_reward_margin"] > 0
    lines = [json.loads(x) for x in (root / ".kollm" / "logs" / "training" / "align.jsonl").read_text().splitlines()]
    assert lines[-1]["reward_margin"] > lines[0]["reward_margin"]


REWARD_PY = '''
def short_and_polite(prompts, completions, answer, **_):
    """Reward replies that end politely (다.) and share words with the reference answer."""
    out = []
    for c, a in zip(completions, answer):
        out.append(float("다" in c) + len(set(c.split()) & set(a.split())) / 4)
    return out
'''


@pytest.mark.slow
def test_grpo_with_a_user_reward_function(tmp_path):
    import uuid

    module = f"rewards_{uuid.uuid4().hex[:8]}"
    root = _project(
        tmp_path,
        f'{{method: grpo, reward: "{module}:short_and_polite", seq_len: 160, max_new_tokens: 12, num_generations: 4, '
        "max_steps: 6, lr: 5.0e-3, batch_size: 2, log_every: 2}",
    )
    (root / f"{module}.py").write_text(REWARD_PY, encoding="utf-8")
    (root / "kollm.yaml").write_text(
        (root / "kollm.yaml").read_text().replace("- kind: align\n", "- kind: align\n    inputs: {data: gen.chats}\n"), encoding="utf-8"
    )
    result = kollm.run(root)
    rec = result.steps["align"]
    assert rec.outputs["model"].meta["method"] == "grpo"
    assert "eval_reward" in rec.metrics
    lines = [json.loads(x) for x in (root / ".kollm" / "logs" / "training" / "align.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4, 6] and all("reward" in x for x in lines)


def test_grpo_without_reward_is_a_config_error(tmp_path):
    root = _project(tmp_path, "{method: grpo}")
    with pytest.raises(kollm.errors.ConfigError, match="reward"):
        kollm.run(root)
