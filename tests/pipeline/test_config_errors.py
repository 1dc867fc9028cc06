"""Bad kollm.yaml files: one message each, with the YAML path and a fix hint; exit code 2, no traceback."""

from __future__ import annotations

import subprocess

import pytest

from kollm.errors import ConfigError
from kollm.pipeline.spec import load_pipeline

MLFLOW_RULE = "use letters, digits, '_', '-' and '.', starting with a letter or digit, at most 256 characters"
GOOD_STEP = '{kind: python, name: a, config: {callable: "mod_ok:f", outputs: {out: corpus}}}'

CASES = [
    (
        "wrong type in a step config",
        '{kind: python, name: a, retries: "many", config: {callable: "mod_ok:f"}}',
        'steps[0].retries: expected an integer, got "many"',
    ),
    (
        "unknown key in a step config, with suggestion",
        '{kind: python, name: a, config: {callable: "mod_ok:f", output: {}}}',
        "steps[0].config.output: unknown key; did you mean 'outputs'?",
    ),
    (
        "unknown key at the top level of a step",
        "{kind: python, name: a, confg: {}}",
        "steps[0].confg: unknown key; did you mean 'config'?",
    ),
    (
        "unknown step kind",
        "{kind: sftt}",
        "steps[0].kind: unknown step kind 'sftt'; did you mean 'sft'?",
    ),
    (
        "missing required config field",
        "{kind: python, name: a, config: {}}",
        "steps[0].config.callable: required field is missing",
    ),
    (
        "bad callable format",
        '{kind: python, name: a, config: {callable: "nocolon"}}',
        "steps[0].config.callable: expected 'module:function', got \"nocolon\"",
    ),
    (
        "callable module that does not exist",
        '{kind: python, name: a, config: {callable: "no_such_module_xyz:f"}}',
        "steps[0].config: cannot find module 'no_such_module_xyz' (is it in the project folder or installed?)",
    ),
    (
        "miswired input: a later step",
        GOOD_STEP.replace("name: a,", "name: a, inputs: {x: b},").replace(
            "outputs: {out: corpus}", "inputs: {x: corpus}"
        )
        + '\n  - {kind: python, name: b, config: {callable: "mod_ok:f", outputs: {o: corpus}}}',
        "steps[0].inputs.x: step 'b' runs later; an input can only come from an earlier step",
    ),
    (
        "miswired input: wrong artifact type",
        GOOD_STEP + '\n  - {kind: python, name: b, inputs: {m: a}, config: {callable: "mod_ok:f", inputs: {m: model}}}',
        "steps[1].inputs.m: step 'a' produces no model (its outputs: out: corpus)",
    ),
    (
        "input with nothing to wire to",
        '{kind: python, name: b, config: {callable: "mod_ok:f", inputs: {m: model}}}',
        "steps[0].inputs.m: needs an artifact of type model and no earlier step produces one; add a step that does before 'b' or set `inputs: {m: STEP}`",
    ),
    (
        "input name the kind does not have",
        '{kind: python, name: a, inputs: {zz: raw}, config: {callable: "mod_ok:f"}}',
        "steps[0].inputs.zz: step kind has no input 'zz' (its inputs: none)",
    ),
    (
        "duplicate step names",
        GOOD_STEP + "\n  - " + GOOD_STEP,
        "steps[1]: a step named 'a' already exists at steps[0]; give each step a unique `name:`",
    ),
    (
        "unknown artifact type",
        '{kind: python, name: a, config: {callable: "mod_ok:f", outputs: {o: modle}}}',
        "steps[0].config.outputs: 'o' has unknown artifact type 'modle'; use one of source, corpus, instructions, preferences, model, metrics, report",
    ),
    (
        "output name an absolute path",
        '{kind: python, name: a, config: {callable: "mod_ok:f", outputs: {"/abs/dir": report}}}',
        "steps[0].config.outputs: output name '/abs/dir' is not a plain name; use letters, digits, '_' and '-' "
        "(no '/', '.', '..' or absolute path: it names a folder in the artifact store)",
    ),
    (
        "output name going up",
        '{kind: python, name: a, config: {callable: "mod_ok:f", outputs: {"../up": report}}}',
        "steps[0].config.outputs: output name '../up' is not a plain name; use letters, digits, '_' and '-' "
        "(no '/', '.', '..' or absolute path: it names a folder in the artifact store)",
    ),
    (
        "output name a dot-dot",
        '{kind: python, name: a, config: {callable: "mod_ok:f", outputs: {"..": report}}}',
        "steps[0].config.outputs: output name '..' is not a plain name; use letters, digits, '_' and '-' "
        "(no '/', '.', '..' or absolute path: it names a folder in the artifact store)",
    ),
    (
        "output name with a slash",
        '{kind: python, name: a, config: {callable: "mod_ok:f", outputs: {"a/b": report}}}',
        "steps[0].config.outputs: output name 'a/b' is not a plain name; use letters, digits, '_' and '-' "
        "(no '/', '.', '..' or absolute path: it names a folder in the artifact store)",
    ),
]


def write(tmp_path, steps: str, data: str = "data: {raw: {path: data.txt}}") -> None:
    (tmp_path / "data.txt").write_text("안녕\n", encoding="utf-8")
    (tmp_path / "mod_ok.py").write_text("def f(ctx):\n    return {}\n")
    (tmp_path / "kollm.yaml").write_text(f"project: t\n{data}\nsteps:\n  - {steps}\n", encoding="utf-8")


@pytest.mark.parametrize("what,steps,message", CASES, ids=[c[0] for c in CASES])
def test_bad_step(tmp_path, what, steps, message):
    write(tmp_path, steps)
    with pytest.raises(ConfigError) as e:
        load_pipeline(tmp_path)
    assert e.value.problems == [message]


@pytest.mark.parametrize(
    "text,message",
    [
        ("project: t\nsteps: []\n", "steps: list should have at least 1 item after validation, not 0"),
        ("steps:\n  - {kind: python, config: {callable: 'mod_ok:f'}}\n", "project: required field is missing"),
        (
            "project: t\nexecutor: k8s\nsteps:\n  - {kind: python, config: {callable: 'mod_ok:f'}}\n",
            "executor.kind: expected one of 'local' or 'ray', got \"k8s\"",
        ),
        (
            "project: t\ndata: {raw: {path: missing/*.txt}}\nsteps:\n  - {kind: python, config: {callable: 'mod_ok:f'}}\n",
            None,
        ),
        ("project: [unclosed\n", "not valid YAML at line 2, column 1: expected ',' or ']', but got '<stream end>'"),
        ("- just\n- a list\n", "expected a mapping with keys project, steps (and optionally tracking, data, executor)"),
        *[
            (
                f"project: {written}\nsteps:\n  - {{kind: python, config: {{callable: 'mod_ok:f'}}}}\n",
                f'project: "{name}" cannot be an MLflow model name; {MLFLOW_RULE}',
            )
            for written, name in [('"it\'s"', "it's"), ("team/model", "team/model"), ('"<b>"', "<b>"), ("m@x", "m@x")]
        ],
        (
            "project: t\nsteps:\n  - {kind: register, name: reg, config: {name: 'a:b'}}\n",
            f'steps[0].config.name: "a:b" cannot be an MLflow model name; {MLFLOW_RULE}',
        ),
        (
            "project: t\ntracking: {experiment: ''}\nsteps:\n  - {kind: python, config: {callable: 'mod_ok:f'}}\n",
            "tracking.experiment: string should have at least 1 character",
        ),
    ],
)
def test_bad_file(tmp_path, text, message):
    (tmp_path / "mod_ok.py").write_text("def f(ctx):\n    return {}\n")
    (tmp_path / "kollm.yaml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_pipeline(tmp_path)
    if message is None:
        assert e.value.problems == [
            f"data.raw.path: no file matches 'missing/*.txt' (relative to {tmp_path.resolve()})"
        ]
    else:
        assert e.value.problems == [message]


def test_all_problems_reported_at_once(tmp_path):
    write(tmp_path, '{kind: python, name: a, config: {callable: "mod_ok:f", lr: 1}}\n  - {kind: nope}')
    with pytest.raises(ConfigError) as e:
        load_pipeline(tmp_path)
    assert len(e.value.problems) == 2


def test_cli_exit_code_and_no_traceback(tmp_path, kollm_bin):
    write(tmp_path, '{kind: python, name: a, retries: "fast", config: {callable: "mod_ok:f"}}')
    proc = subprocess.run([kollm_bin, "validate", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert 'steps[0].retries: expected an integer, got "fast"' in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    missing = subprocess.run([kollm_bin, "run", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no kollm.yaml at" in missing.stderr and "Traceback" not in missing.stderr
    usage = subprocess.run([kollm_bin, "runs", "--limit", "abc"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "Invalid value for '--limit'" in usage.stderr and "Traceback" not in usage.stderr


def test_schema_covers_step_kinds(tmp_path, kollm_bin):
    import json

    proc = subprocess.run([kollm_bin, "schema"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert "PythonStepConfig" in schema["$defs"]
    assert schema["$defs"]["StepSpec"]["properties"]["kind"]["enum"][0] == "prepare"
