"""EleutherAI lm-evaluation-harness tasks on the step's model, through lm-eval's Hugging Face backend (`hf`).

    lm_eval:
      tasks: [ko_quickstart_mc]          # kollm's own Korean multiple-choice task (ships with kollm, offline)
      # tasks: [kobest_boolq, kobest_copa, kmmlu, haerae]   # lm-eval's Korean tasks, where their datasets can be reached
      num_fewshot: 0
      limit: 200                         # at most this many examples per task
      include_path: tasks/               # your own task YAMLs (e.g. KoBEST over local copies), relative to kollm.yaml

Metrics are named TASK.METRIC (`ko_quickstart_mc.acc`, `kobest_boolq.f1`); stderr entries are left out. They
land in metrics.json, can be used in gate rules (`ko_quickstart_mc.acc >= 0.5`), are shown in the report and
become `kollm.metric.*` tags of the registered version. kollm's task folder (kollm/eval/tasks/) is always on
lm-eval's include path; `include_path` adds yours. The harness reads task data through the `datasets`
library: with no hub access, point a task YAML at local files (README: "Korean benchmarks with lm-eval").
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

from kollm.adapter import is_adapter, load_causal_lm
from kollm.errors import ConfigError, StepFailed
from kollm.pipeline.step import STRICT

INSTALL_HINT = "install it with `pip install lm-eval==0.4.13` (or `pip install 'kollm[eval]'`), or remove `lm_eval:` from the evaluate step"
KOLLM_TASKS = Path(__file__).parent / "tasks"  # kollm's own lm-eval tasks (ko_quickstart_mc)


class LmEvalConfig(BaseModel):
    model_config = STRICT
    tasks: list[str] = Field(
        ...,
        min_length=1,
        description="lm-evaluation-harness task or group names, e.g. [ko_quickstart_mc, kobest_copa].",
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per task. Default: each task's own default."
    )
    limit: int | None = Field(None, gt=0, description="Evaluate at most this many examples per task (quick checks).")
    batch_size: int = Field(8, gt=0, description="Batch size for the harness.")
    include_path: str | None = Field(
        None, description="A folder of extra task YAMLs (relative to kollm.yaml), e.g. KoBEST over local data."
    )
    model_args: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="Extra arguments of lm-eval's hf model (e.g. {trust_remote_code: true, max_length: 2048}).",
    )

    @field_validator("tasks")
    @classmethod
    def _installed(cls, v: list[str]) -> list[str]:
        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError(f"lm-eval tasks are configured but lm-eval is not installed; {INSTALL_HINT}")
        return v


def task_manager(cfg: LmEvalConfig, project_dir: Path):
    """lm-eval's TaskManager over kollm's tasks and the configured include_path, and lm-eval's own tasks only
    when a configured name is not among those (indexing lm-eval's thousands of task files takes tens of seconds)."""
    from lm_eval.tasks import TaskManager

    paths = [str(KOLLM_TASKS)]
    if cfg.include_path:
        include = Path(cfg.include_path) if Path(cfg.include_path).is_absolute() else project_dir / cfg.include_path
        if not include.is_dir():
            raise ConfigError(
                f"lm_eval.include_path: no folder {include} (give a folder of lm-eval task YAMLs, relative to kollm.yaml)"
            )
        paths.append(str(include))
    local = TaskManager(include_path=paths, include_defaults=False)
    if set(cfg.tasks) <= set(local.all_tasks):
        return local
    return TaskManager(include_path=paths)


def check_tasks(cfg: LmEvalConfig, manager) -> None:
    """Every configured name is a task, group or tag lm-eval knows (before a model is loaded)."""
    known = set(manager.all_tasks)
    problems = []
    for i, name in enumerate(cfg.tasks):
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            problems.append(
                f"lm_eval.tasks[{i}]: unknown task '{name}'"
                + (f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "")
            )
    if problems:  # (lm-eval lists its tasks with `lm-eval ls tasks`)
        raise ConfigError(problems)


def run_lm_eval(model_path: Path, cfg: LmEvalConfig, project_dir: Path, device: str) -> dict[str, float]:
    """Run the tasks on a local HF folder with lm-eval's `hf` backend; returns {"TASK.METRIC": value}."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(f"lm_eval: lm-eval is not installed; {INSTALL_HINT}") from None
    manager = task_manager(cfg, project_dir)
    check_tasks(cfg, manager)
    model_args: dict[str, Any] = {
        "pretrained": str(model_path),
        "dtype": "bfloat16" if device == "cuda" else "float32",
        **cfg.model_args,
    }
    model: Any = "hf"
    if is_adapter(model_path):  # a LoRA adapter: lm-eval's hf model over its base with the adapter merged in
        import torch
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoTokenizer

        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        merged = load_causal_lm(model_path, dtype=dtype, project_dir=project_dir).to(device).eval()
        extra = {k: v for k, v in cfg.model_args.items() if k not in ("pretrained", "dtype")}
        model = HFLM(
            pretrained=merged,
            tokenizer=AutoTokenizer.from_pretrained(model_path),
            batch_size=cfg.batch_size,
            device=device,
            **extra,
        )
        model_args = {}
    try:
        out = lm_eval.simple_evaluate(
            model=model,
            model_args=model_args or None,
            tasks=list(cfg.tasks),
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            batch_size=cfg.batch_size,
            device=device,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,  # no stderr estimates: kollm leaves them out
        )
    except Exception as e:  # the harness raises plain exceptions for unreachable data and bad task files
        raise StepFailed(
            f"lm-eval failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
            hint="check that the tasks' data is reachable, or point a task YAML at local files (lm_eval.include_path)",
        ) from None
    return flatten_results(out or {})


def flatten_results(out: dict) -> dict[str, float]:
    """lm-eval's {"results": {task: {"acc,none": 0.7, "acc_stderr,none": 0.01, "alias": ...}}} -> {"task.acc": 0.7}."""
    metrics: dict[str, float] = {}
    for task, values in out.get("results", {}).items():
        for key, value in values.items():
            name = key.split(",")[0]
            if (
                name in ("alias", "sample_len")
                or name.endswith("_stderr")
                or isinstance(value, bool)
                or not isinstance(value, (int, float))
            ):
                continue
            metrics[f"{task}.{name}"] = float(value)
    return metrics
