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


@pytest.mark.slow(reason="sft then an align method through the runner")
@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_align_after_sft(tmp_path, method):
    root = _project(
        tmp_path,
        f"{{method: {method}, beta: 0.5, seq_len: 128, max_steps: 10, lr: 5.0e-3, batch_size: 4, log_every: 2}}",
    )
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


@pytest.mark.slow(reason="sft then GRPO (sampling completions) through the runner")
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
        (root / "kollm.yaml").read_text().replace("- kind: align\n", "- kind: align\n    inputs: {data: gen.chats}\n"),
        encoding="utf-8",
    )
    result = kollm.run(root)
    rec = result.steps["align"]
    assert rec.outputs["model"].meta["method"] == "grpo"
    assert "eval_reward" in rec.metrics
    lines = [json.loads(x) for x in (root / ".kollm" / "logs" / "training" / "align.jsonl").read_text().splitlines()]
    assert [x["global_step"] for x in lines] == [2, 4, 6] and all("reward" in x for x in lines)


def test_grpo_without_reward_is_a_config_error(tmp_path):
    root = _project(tmp_path, "{method: grpo}")
    with pytest.raises(kollm.errors.ConfigError, match="reward"):
        kollm.run(root)


# --- per-method settings: `config` is a discriminated union on `method` (one model per method) --------------------
# These load kollm.yaml (validation and wiring only): nothing trains.

ALIGN = 3  # the align step's index in _project: gen, cpt, sft, align


@pytest.mark.parametrize(
    "config,message",
    [
        (
            "{method: dpo, beta: 0.1, num_generations: 4}",
            "num_generations: not a setting of method dpo (it belongs to grpo)",
        ),
        (
            "{num_generations: 4}",
            "num_generations: not a setting of method dpo (it belongs to grpo)",
        ),  # dpo is the default
        (
            '{method: grpo, reward: "my_rewards:score", beta: 0.1}',
            "beta: not a setting of method grpo (it belongs to dpo, orpo and kto)",
        ),
        ("{method: orpo, label_smoothing: 0.1}", "label_smoothing: not a setting of method orpo (it belongs to dpo)"),
        ('{method: kto, reward: "my_rewards:score"}', "reward: not a setting of method kto (it belongs to grpo)"),
        ("{method: ppo}", "method: expected one of 'dpo', 'orpo', 'kto' or 'grpo', got \"ppo\""),
        ("{method: dpo, betta: 0.2}", "betta: unknown key; did you mean 'beta'?"),
        ("{method: kto, lora: {rr: 8}}", "lora.rr: unknown key; did you mean 'r'?"),
        ("{method: dpo, beta: -1}", "beta: input should be greater than 0"),
        ("{method: grpo}", "reward: required field is missing"),
        ('{method: grpo, reward: "nocolon"}', "reward: expected 'module:function', got \"nocolon\""),
    ],
)
def test_a_setting_of_another_method_is_refused_with_its_yaml_path(tmp_path, config, message):
    from kollm.pipeline.spec import load_pipeline

    with pytest.raises(kollm.errors.ConfigError) as e:
        load_pipeline(_project(tmp_path, config))
    assert e.value.problems == [f"steps[{ALIGN}].config.{message}"]


def test_kollm_validate_refuses_a_dpo_step_with_grpo_settings(tmp_path, kollm_bin):
    import subprocess

    root = _project(tmp_path, "{method: dpo, beta: 0.1, num_generations: 4, temperature: 0.7}")
    proc = subprocess.run([kollm_bin, "validate", str(root)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"steps[{ALIGN}].config.num_generations: not a setting of method dpo (it belongs to grpo)" in proc.stderr
    assert f"steps[{ALIGN}].config.temperature: not a setting of method dpo (it belongs to grpo)" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    "config,model,settings",
    [
        ("{}", "DpoConfig", {"method": "dpo", "beta": 0.1, "label_smoothing": 0.0, "lr": 5e-5, "batch_size": 4}),
        ("{method: dpo, beta: 0.5, label_smoothing: 0.1}", "DpoConfig", {"beta": 0.5, "label_smoothing": 0.1}),
        ("{method: orpo, beta: 0.5, seq_len: 128}", "OrpoConfig", {"method": "orpo", "beta": 0.5, "seq_len": 128}),
        ("{method: kto}", "KtoConfig", {"method": "kto", "beta": 0.1, "lr": 5e-5}),
        (
            '{method: grpo, reward: "my_rewards:score", num_generations: 8}',
            "GrpoConfig",
            {
                "method": "grpo",
                "reward": "my_rewards:score",
                "num_generations": 8,
                "max_new_tokens": 64,
                "temperature": 1.0,
            },
        ),
    ],
)
def test_each_method_takes_its_own_settings(tmp_path, config, model, settings):
    from kollm.pipeline.spec import load_pipeline
    from kollm.pipeline.step import parse_config
    from kollm.steps import align

    root = _project(tmp_path, config)
    (root / "my_rewards.py").write_text(REWARD_PY.replace("short_and_polite", "score"), encoding="utf-8")
    step = load_pipeline(root).steps[ALIGN]
    assert type(step.config) is getattr(align, model)
    assert {k: getattr(step.config, k) for k in settings} == settings
    dump = step.config.model_dump(mode="json")  # what the step's cache key hashes: this method's settings only
    assert parse_config(align.Config, dump) == step.config
    grpo_only = {"reward", "num_generations", "max_new_tokens", "temperature"}
    assert grpo_only <= set(dump) if model == "GrpoConfig" else not grpo_only & set(dump)
    data_types = step.module.inputs(step.config)["data"].types
    assert data_types == (("preferences", "instructions") if model == "GrpoConfig" else ("preferences",))


def test_the_quickstart_align_step_loads_as_before(tmp_path):
    from kollm.examples import init_project
    from kollm.pipeline.spec import load_pipeline
    from kollm.steps import align
    from kollm.train.config import TrainingConfig

    root = tmp_path / "qs"
    init_project(root, "korean-quickstart")
    step = next(s for s in load_pipeline(root).steps if s.kind == "align")
    assert type(step.config) is align.DpoConfig
    dump = step.config.model_dump(mode="json")
    assert set(dump) == set(TrainingConfig.model_fields) | {"method", "beta", "label_smoothing"}
    assert {k: dump[k] for k in ("method", "beta", "label_smoothing", "seq_len", "batch_size", "max_steps", "lr")} == {
        "method": "dpo",
        "beta": 0.1,
        "label_smoothing": 0.0,
        "seq_len": 256,
        "batch_size": 8,
        "max_steps": 20,
        "lr": 2.0e-4,
    }


def test_a_sweep_and_overrides_over_align_settings_are_checked_against_the_method(tmp_path):
    from kollm.pipeline.plan import apply_overrides
    from kollm.pipeline.spec import load_pipeline
    from kollm.pipeline.sweep import sample_trials
    from kollm.steps import align

    def with_sweep(root: Path, sweep: str) -> Path:
        text = (root / "kollm.yaml").read_text(encoding="utf-8")
        (root / "kollm.yaml").write_text(
            text.replace("- kind: align\n", f"- kind: align\n    sweep: {sweep}\n"), encoding="utf-8"
        )
        return root

    good = "{params: {beta: {choice: [0.05, 0.5]}, lr: {loguniform: [1.0e-5, 1.0e-4]}, method: {grid: [dpo, orpo]}}, metric: eval_loss}"
    pipe = load_pipeline(with_sweep(_project(tmp_path / "good", "{method: dpo, beta: 0.1, max_steps: 4}"), good))
    step = pipe.steps[ALIGN]
    assert step.sweep is not None and set(step.sweep.params) == {"beta", "lr", "method"}
    for values in sample_trials(step.sweep):  # what run_sweep does for each trial's key: the overrides, validated again
        trial = apply_overrides(pipe, {f"align.{p}": v for p, v in values.items()})[ALIGN]
        assert type(trial.config) is {"dpo": align.DpoConfig, "orpo": align.OrpoConfig}[values["method"]]
        assert trial.config.beta == values["beta"] and trial.config.max_steps == 4
    with pytest.raises(kollm.errors.ConfigError) as e:
        apply_overrides(pipe, {"align.num_generations": 8})
    assert e.value.problems == ["override align.num_generations: not a setting of method dpo (it belongs to grpo)"]

    bad = (
        "{params: {num_generations: {choice: [2, 4]}, beta: {choice: [-1.0]}, betta: {choice: [1]}}, metric: eval_loss}"
    )
    with pytest.raises(kollm.errors.ConfigError) as e:
        load_pipeline(with_sweep(_project(tmp_path / "bad", "{method: dpo}"), bad))
    assert e.value.problems == [
        f"steps[{ALIGN}].sweep.params.num_generations: not a setting of method dpo (it belongs to grpo)",
        f"steps[{ALIGN}].sweep.params.beta: the value -1.0 is not valid for 'beta': Input should be greater than 0",
        f"steps[{ALIGN}].sweep.params.betta: the align step's config has no setting 'betta'",
    ]


def test_the_schema_has_one_align_config_per_method():
    from kollm.pipeline.schema import json_schema

    defs = json_schema()["$defs"]
    union = defs["AlignStepConfig"]
    assert [r["$ref"] for r in union["oneOf"]] == [f"#/$defs/{m}Config" for m in ("Dpo", "Orpo", "Kto", "Grpo")]
    assert (
        "num_generations" in defs["GrpoConfig"]["properties"]
        and "num_generations" not in defs["DpoConfig"]["properties"]
    )
    assert "required" not in defs["DpoConfig"] and defs["GrpoConfig"]["required"] == ["method", "reward"]
