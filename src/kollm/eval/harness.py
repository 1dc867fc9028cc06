"""Optional: EleutherAI lm-evaluation-harness tasks (e.g. KoBEST) when `lm-eval` is installed.

    lm_eval:
      tasks: [kobest_boolq, kobest_copa]
      num_fewshot: 0
      include_path: tasks/      # your own task YAMLs (e.g. KoBEST pointing at local data), relative to kollm.yaml

Metrics are named TASK.METRIC (e.g. `kobest_boolq.acc`) and can be used in gate rules. The harness reads
task data through its own loaders: with no hub access, point `include_path` at task YAMLs over local files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from kollm.errors import ConfigError, StepFailed
from kollm.pipeline.step import STRICT

INSTALL_HINT = "install it with `pip install lm-eval` (or remove `lm_eval:` from the evaluate step)"


class LmEvalConfig(BaseModel):
    model_config = STRICT
    tasks: list[str] = Field(..., min_length=1, description="lm-evaluation-harness task names, e.g. [kobest_boolq, kobest_copa].")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per task. Default: each task's own default.")
    limit: int | None = Field(None, gt=0, description="Evaluate at most this many examples per task (quick checks).")
    batch_size: int = Field(8, gt=0, description="Batch size for the harness.")
    include_path: str | None = Field(None, description="A folder of extra task YAMLs (relative to kollm.yaml), e.g. KoBEST over local data.")

    @field_validator("tasks")
    @classmethod
    def _installed(cls, v: list[str]) -> list[str]:
        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError(f"lm-eval tasks are configured but lm-eval is not installed; {INSTALL_HINT}")
        return v


def run_lm_eval(model_path: Path, cfg: LmEvalConfig, project_dir: Path, device: str) -> dict[str, float]:
    """Run the tasks on a local HF folder; returns {"TASK.METRIC": value} (stderr entries left out)."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(f"lm_eval: lm-eval is not installed; {INSTALL_HINT}") from None
    include = None
    if cfg.include_path:  # task YAMLs over local data (lm-eval >= 0.4.2: a TaskManager with include_path)
        from lm_eval.tasks import TaskManager

        include = Path(cfg.include_path) if Path(cfg.include_path).is_absolute() else project_dir / cfg.include_path
        if not include.is_dir():
            raise ConfigError(f"lm_eval.include_path: no folder {include}")
    extra = {"task_manager": TaskManager(include_path=str(include))} if include else {}
    try:
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={model_path}",
            tasks=list(cfg.tasks),
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            batch_size=cfg.batch_size,
            device=device,
            **extra,
        )
    except Exception as e:  # the harness raises plain exceptions for unknown tasks and unreachable data
        raise StepFailed(f"lm-eval failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                         hint="check the task names and that their data is available offline (include_path)") from None
    return flatten_results(out or {})


def flatten_results(out: dict) -> dict[str, float]:
    """lm-eval's {"results": {task: {"acc,none": 0.7, "acc_stderr,none": 0.01, "alias": ...}}} -> {"task.acc": 0.7}."""
    metrics: dict[str, float] = {}
    for task, values in out.get("results", {}).items():
        for key, value in values.items():
            name = key.split(",")[0]
            if name == "alias" or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            metrics[f"{task}.{name}"] = float(value)
    return metrics
