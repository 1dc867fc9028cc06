"""Great Expectations suites on prepared splits: `prepare`'s `expectations: suite.json` (a GX 1.x expectation
suite, as `ExpectationSuite.to_json_dict()` writes it) validated by GX's own engine on each split's pandas frame
(an ephemeral context with a pandas datasource). great_expectations is imported only here
(`pip install 'kollm[gx]'`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from kollm.errors import ConfigError, KollmError


@dataclass
class SplitResult:
    split: str
    success: bool
    result: dict[str, Any]  # GX's ExpectationSuiteValidationResult as JSON

    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.result["results"] if not r["success"]]


def load_suite(path: Path, where: str) -> dict[str, Any]:
    try:
        suite = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{where}: {path} is not a JSON expectation suite: {e}") from None
    if not isinstance(suite, dict) or not isinstance(suite.get("expectations"), list):
        raise ConfigError(f"{where}: {path} has no `expectations` list (write a GX 1.x suite's JSON)")
    return suite


def validate_splits(suite_file: Path, splits: dict[str, pd.DataFrame], where: str) -> list[SplitResult]:
    """Validate each split with the suite; an expectation GX does not know is a ConfigError naming it."""
    if importlib.util.find_spec("great_expectations") is None:
        raise KollmError(f"{where}: great_expectations is not installed", hint="pip install 'kollm[gx]'")
    data = load_suite(suite_file, where)
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no usage statistics sent from a pipeline step
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}  # type: ignore[assignment]
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    expectations = []
    for i, exp in enumerate(data["expectations"]):  # one by one: ExpectationSuite() only logs and drops a bad one
        try:
            expectations.append(
                ExpectationConfiguration(
                    type=exp["type"], kwargs=exp.get("kwargs") or {}, meta=exp.get("meta")
                ).to_domain_obj()
            )
        except Exception as e:
            what = exp.get("type") if isinstance(exp, dict) else exp
            raise ConfigError(
                f"{where}: {suite_file}: expectations[{i}] ({what}): GX cannot read it: {type(e).__name__}: {e}"
            ) from None
    suite = gx.ExpectationSuite(name=str(data.get("name") or suite_file.stem), expectations=expectations)
    source = context.data_sources.add_pandas("kollm")
    out = []
    for split, frame in splits.items():
        batch = (
            source.add_dataframe_asset(name=split)
            .add_batch_definition_whole_dataframe(split)
            .get_batch(batch_parameters={"dataframe": frame})
        )
        res = batch.validate(suite)
        out.append(SplitResult(split, bool(res.success), res.to_json_dict()))
    return out


def describe(r: dict[str, Any]) -> str:
    """One line for a failed expectation: its type, arguments and GX's observed value or unexpected count."""
    cfg = r["expectation_config"]
    kwargs = ", ".join(f"{k}={v!r}" for k, v in cfg["kwargs"].items() if k != "batch_id")
    res = r.get("result") or {}
    if r.get("exception_info", {}).get("raised_exception"):
        seen = f"error: {r['exception_info']['exception_message']}"
    elif "unexpected_count" in res:
        seen = f"{res['unexpected_count']} unexpected of {res.get('element_count')}"
        if res.get("partial_unexpected_list"):
            seen += f", e.g. {str(res['partial_unexpected_list'][0])[:80]!r}"
    else:
        seen = f"observed {res.get('observed_value')!r}"
    return f"{cfg['type']}({kwargs}): {seen}"
