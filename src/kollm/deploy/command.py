"""The command line of one attempt of one step, `kollm step run ... --input NAME=URI`, built in one place for the
compiled orchestrators (`kollm compile airflow`, `kollm compile kfp`).

The compiled files run where kollm may not be importable (an Airflow worker in Airflow's own environment, a KFP
component that ships only its own source), so the compilers copy this function's source (`SOURCE`) into what they
write rather than importing it: one definition, the same text in every compiled file. It uses only builtins (and
builtin generics in its annotations, which Python 3.9 and later evaluate).
"""

from __future__ import annotations

import inspect


def step_command(
    kollm: list[str], config: str, step: str, inputs: dict[str, str], attempt: int, outputs_json: str, store: str = ""
) -> list[str]:
    """`kollm step run CONFIG --step STEP --input NAME=URI ... --attempt N --outputs-json FILE [--store URL]`.

    KOLLM: the command that runs kollm (a list); INPUTS: NAME -> URI of earlier steps' outputs (an empty URI is left
    out: the input comes from the data source kollm.yaml names); STORE empty: the project's own store."""
    cmd = [*kollm, "step", "run", str(config), "--step", step]
    for name, uri in sorted(inputs.items()):
        if uri:
            cmd += ["--input", name + "=" + uri]
    cmd += ["--attempt", str(attempt), "--outputs-json", str(outputs_json)]
    if store:
        cmd += ["--store", store]
    return cmd


SOURCE = inspect.getsource(step_command)
