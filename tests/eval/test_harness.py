"""The optional lm-evaluation-harness path: result flattening and the error when lm-eval is missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kollm.errors import ConfigError
from kollm.eval.harness import LmEvalConfig, flatten_results, run_lm_eval


def test_flatten_results_keeps_scores_and_drops_stderr():
    out = {
        "results": {
            "kobest_boolq": {
                "alias": "kobest_boolq",
                "acc,none": 0.62,
                "acc_stderr,none": 0.01,
                "f1,none": 0.55,
                "f1_stderr,none": "N/A",
            },
            "kobest_copa": {"acc": 0.7, "acc_stderr": 0.02},  # older lm-eval: no filter suffix
        }
    }
    assert flatten_results(out) == {"kobest_boolq.acc": 0.62, "kobest_boolq.f1": 0.55, "kobest_copa.acc": 0.7}


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed here")
def test_missing_lm_eval_is_a_clear_config_error(tmp_path):
    with pytest.raises(Exception, match="lm-eval is not installed.*pip install lm-eval"):
        LmEvalConfig(tasks=["kobest_boolq"])
    cfg = LmEvalConfig.model_construct(
        tasks=["kobest_boolq"], num_fewshot=None, limit=None, batch_size=8, include_path=None
    )
    with pytest.raises(ConfigError, match="pip install lm-eval"):
        run_lm_eval(Path(tmp_path), cfg, tmp_path, "cpu")
