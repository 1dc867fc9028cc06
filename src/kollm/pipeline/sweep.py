"""Hyperparameter search: a step's `sweep:` runs as Ray Tune trials (function trainables), each one attempt of the
step with its sampled values applied as plan overrides ({"STEP.lr": 1e-3}).

- The trials are drawn here, deterministically from `sweep.seed`, so a rerun draws the same trials with the same
  cache keys: a finished trial is published under its own key like any step and reused (a killed sweep resumes
  without redoing finished trials); Tune runs them, `max_concurrent` at a time.
- Inside a trial the training loop's log hook (kollm.train.recipe.TrainingLog) calls `report_progress`, which
  forwards the logged metrics to `ray.tune.report`; ASHA stops weak trials from them. A stopped trial never
  publishes (its staged folder is discarded by the next runner of its key) and its MLflow run ends KILLED.
- Each trial is a nested MLflow run under the step's run. The best finished trial by `metric`/`mode` becomes the
  step's result: its outputs are published under the sweep step's own key, so downstream steps get the best model,
  and the step's run records the best config and the trial table (tags kollm.sweep.*).
Ray is imported only when a sweep runs.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from kollm.config import SweepParam, SweepSpec, foreign_setting
from kollm.errors import KollmError, StepFailed

if TYPE_CHECKING:
    from kollm.pipeline.runner import StepRun
    from kollm.pipeline.spec import ResolvedStep
    from kollm.pipeline.step import Artifact, StepRecord
    from kollm.pipeline.tracking import StepTracker

TRAINING_KINDS = ("cpt", "sft", "align")
# What a training step's result reports (kollm.train.recipe.step_metrics) plus what its loop logs as it goes.
STEP_METRICS = ("eval_loss", "train_loss", "loss")
PROGRESS_METRIC = "loss"  # the training loss the loop logs every `log_every` steps: what ASHA compares
_in_trial = False  # set inside a Ray Tune trial: report_progress then feeds Tune


# ---------------------------------------------------------------- validation


def check_sweep(
    spec: SweepSpec, kind: str, config_model: type[BaseModel], config: BaseModel, *, where: str
) -> list[str]:
    """Problems with a step's sweep, each naming its YAML path: the step kind, parameter paths, values, metric."""
    problems = []
    if kind not in TRAINING_KINDS:
        return [f"{where}: a sweep needs a training step ({', '.join(TRAINING_KINDS)}), not '{kind}'"]
    chosen = type(config)  # the model of the config's variant where Config is a union of them (align: one per method)
    for path, param in spec.params.items():
        if not _has_field(chosen, path.split(".")):
            problem = (
                foreign_setting(config_model, chosen, path.split(".")[0])
                or f"the {kind} step's config has no setting '{path}'"
            )
            problems.append(f"{where}.params.{path}: {problem}")
            continue
        for value in _candidates(param):
            raw = config.model_dump(mode="json", exclude_unset=True)
            _set(raw, path, value)
            try:
                config_model.model_validate(raw)
            except ValidationError as e:
                msg = e.errors()[0].get("msg", str(e))
                problems.append(f"{where}.params.{path}: the value {value!r} is not valid for '{path}': {msg}")
                break
    if spec.metric not in STEP_METRICS:
        problems.append(
            f"{where}.metric: '{spec.metric}' is not a metric the {kind} step reports; use one of {', '.join(STEP_METRICS[:2])}"
        )
    return problems


def _has_field(model: type[BaseModel], parts: list[str]) -> bool:
    field = model.model_fields.get(parts[0])
    if field is None:
        return False
    if len(parts) == 1:
        return True
    sub = field.annotation
    for arg in getattr(sub, "__args__", ()) or ():  # Optional[Model]
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            sub = arg
    return isinstance(sub, type) and issubclass(sub, BaseModel) and _has_field(sub, parts[1:])


def _candidates(param: SweepParam) -> list[Any]:
    """The values to check a parameter with: every listed value, or both bounds."""
    if param.choice is not None:
        return list(param.choice)
    if param.grid is not None:
        return list(param.grid)
    low, high = param.uniform or param.loguniform or param.randint  # type: ignore[misc]
    return [low, high - 1 if param.randint else high]


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


# ---------------------------------------------------------------- trials


def sample_trials(spec: SweepSpec) -> list[dict[str, Any]]:
    """The trials' values ({path: value}), the same for the same spec: the product of the `grid` params, each
    combination `samples` times with the other params drawn from a generator seeded with `seed`."""
    rng = random.Random(spec.seed)
    grids = {p: v.grid for p, v in spec.params.items() if v.grid is not None}
    grid_paths = list(grids)
    combos = list(itertools.product(*grids.values())) or [()]
    trials = []
    for _ in range(spec.samples):
        for combo in combos:
            values: dict[str, Any] = dict(zip(grid_paths, combo))
            for path, param in spec.params.items():
                if param.choice is not None:
                    values[path] = rng.choice(param.choice)
                elif param.uniform is not None:
                    values[path] = rng.uniform(*param.uniform)
                elif param.loguniform is not None:
                    lo, hi = param.loguniform
                    values[path] = math.exp(rng.uniform(math.log(lo), math.log(hi)))
                elif param.randint is not None:
                    values[path] = rng.randrange(*param.randint)
            trials.append({p: values[p] for p in spec.params})
    return trials


def report_progress(metrics: dict[str, float], step: int, run_id: str | None = None) -> None:
    """The training loop's log hook: inside a Ray Tune trial, hand the metrics to Tune (ASHA decides from them)."""
    if not _in_trial:
        return
    from ray import tune

    tune.report({**metrics, "kollm_step": step, "kollm_run_id": run_id or ""})


def _trial(config: dict[str, Any]) -> None:
    """One trial (a Ray Tune function trainable): one attempt of the step with the trial's overrides, through
    `run_one` (cache lookup under the trial's key, nested MLflow run under the step's run, publish)."""
    global _in_trial
    from ray import tune

    from kollm.pipeline.runner import run_one

    common, trial = config["common"], config["trial"]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _in_trial = True
    try:
        rec = run_one(
            common["file"],
            common["step"],
            inputs=common["inputs"],
            store_url=common["store"],
            parent_run_id=common["parent"],
            overrides={**common["overrides"], **{f"{common['step']}.{p}": v for p, v in trial["values"].items()}},
            sweep_trial=True,
        )
    finally:
        _in_trial = False
    # every result carries the scheduler's metric: the final one the trial's last training loss
    final_loss = rec.metrics.get("train_loss", rec.metrics.get(PROGRESS_METRIC, float("nan")))
    tune.report(
        {
            **rec.metrics,
            PROGRESS_METRIC: final_loss,
            "kollm_done": 1.0,
            "kollm_cached": float(rec.cache_hit),
            "kollm_key": rec.key,
            "kollm_run_id": rec.run_id or "",
        }
    )


def _ray(address: str | None) -> Any:
    import ray

    if not ray.is_initialized():
        src = str(Path(__file__).resolve().parents[2])
        paths = [src, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}}
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False, runtime_env=env)
    return ray


def run_sweep(
    step: ResolvedStep,
    inputs: dict[str, Artifact],
    upstream: list[StepRecord],
    r: StepRun,
    *,
    key: str,
    tracker: StepTracker,
) -> StepRecord:
    """The step's trials on Ray Tune; the best finished trial's outputs published under the step's `key`."""
    from kollm.pipeline.plan import apply_overrides, step_key

    spec = step.sweep
    assert spec is not None
    pipe = r.plan.pipeline
    trials = sample_trials(spec)
    keys = []
    for values in trials:  # each trial's key, as the trial itself will compute it
        over = {**r.plan.overrides, **{f"{step.name}.{p}": v for p, v in values.items()}}
        trial_step = next(s for s in apply_overrides(pipe, over) if s.name == step.name)
        keys.append(step_key(replace(trial_step, sweep=None), inputs, r.plan.references[step.name]))
    results = _tune(step, spec, trials, inputs, r, tracker, keys)
    rows = []
    for i, (values, k) in enumerate(zip(trials, keys)):
        res = results.get(i, {})
        manifest = r.store.lookup(k)
        status = "finished" if manifest is not None else ("stopped" if res.get("iterations") else "failed")
        metrics = manifest.get("metrics", {}) if manifest is not None else {}
        value = metrics.get(spec.metric, res.get("last", {}).get(spec.metric))
        rows.append(
            {
                "trial": i,
                "values": values,
                "key": k,
                "status": status,
                "metric": value,
                "cached": bool(res.get("cached")),
                "iterations": res.get("iterations", 0),
                "run_id": (manifest or {}).get("run_id") or res.get("run_id") or None,
            }
        )
        if status != "finished" and res.get("run_id"):  # a stopped trial's run: ended, never published
            r.tracker.writer.log_batch(res["run_id"], {}, {}, {"kollm.sweep.stopped": "true"})
            r.tracker.writer.set_terminated(res["run_id"], "KILLED")
    finished = [
        row
        for row in rows
        if row["status"] == "finished" and row["metric"] is not None and math.isfinite(row["metric"])
    ]
    if not finished:
        raise StepFailed(
            f"step '{step.name}': no trial of its sweep finished with metric '{spec.metric}'",
            hint=f"trial statuses: {', '.join(row['status'] for row in rows)}; see the trials' runs in MLflow",
        )
    best = (min if spec.mode == "min" else max)(finished, key=lambda row: row["metric"])
    rows.sort(key=lambda row: _order(row, spec.mode))
    summary = {"metric": spec.metric, "mode": spec.mode, "best": best, "trials": rows}
    tracker.set_tags(sweep_tags(summary))
    return _publish_best(step, inputs, r, key, tracker, best, summary)


def _order(row: dict[str, Any], mode: str) -> tuple[int, float]:
    v = row["metric"]
    if v is None or not math.isfinite(v):
        return (1, 0.0)
    return (0 if row["status"] == "finished" else 1, v if mode == "min" else -v)


def _tune(
    step: ResolvedStep,
    spec: SweepSpec,
    trials: list[dict[str, Any]],
    inputs: dict[str, Artifact],
    r: StepRun,
    tracker: StepTracker,
    keys: list[str],
) -> dict[int, dict[str, Any]]:
    """Run the trials on Ray Tune; per trial index: iterations reported, last result, run id, cached."""
    pipe = r.plan.pipeline
    ray = _ray(pipe.cfg.executor.address if r.executor == "ray" else None)
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    uris = {}
    for name, a in inputs.items():
        if a.type != "source" and a.path is not None:
            uris[name] = a.path.as_uri()
    common = {
        "file": str(pipe.file),
        "step": step.name,
        "inputs": uris,
        "store": r.store.url,
        "parent": tracker.run_id,
        "overrides": r.plan.overrides,
    }
    scheduler = (
        ASHAScheduler(
            metric=PROGRESS_METRIC,
            mode="min",
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
            max_t=10_000,
        )
        if spec.scheduler == "asha"
        else FIFOScheduler()
    )
    cpus = max(1.0, float(step.resources.cpus))
    trainable = tune.with_resources(_trial, {"cpu": cpus, "gpu": step.resources.gpus})
    storage = pipe.state_dir / "sweeps"
    storage.mkdir(parents=True, exist_ok=True)
    tuner = tune.Tuner(
        trainable,
        param_space={
            "common": common,
            "trial": tune.grid_search([{"index": i, "values": v} for i, v in enumerate(trials)]),
        },
        tune_config=tune.TuneConfig(
            scheduler=scheduler, max_concurrent_trials=spec.max_concurrent, num_samples=1, reuse_actors=False
        ),
        run_config=tune.RunConfig(
            name=f"{step.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=str(storage),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    try:
        grid = tuner.fit()
    except KollmError:
        raise
    except Exception as e:
        tail = [line for line in str(e).strip().splitlines() if line.strip()][-1:] or [""]
        raise StepFailed(
            f"step '{step.name}': the Ray Tune sweep failed: {type(e).__name__}: {tail[0][:300]}",
            hint=f"Ray Tune's trial folders are under {storage}",
        ) from None
    del ray
    out: dict[int, dict[str, Any]] = {}
    for i in range(len(grid)):  # a ResultGrid has __len__ and __getitem__ but no __iter__
        res = grid[i]
        assert res.config is not None  # every trial ran with a config from the param_space above
        index = res.config["trial"]["index"]
        df = res.metrics_dataframe
        last = res.metrics or {}
        run_ids = [x for x in (df["kollm_run_id"] if df is not None and "kollm_run_id" in df else []) if x]
        out[index] = {
            "iterations": int(last.get("training_iteration", 0) or 0),
            "last": {k: v for k, v in last.items() if isinstance(v, (int, float))},
            "run_id": run_ids[-1] if run_ids else None,
            "cached": bool(last.get("kollm_cached")),
        }
    return out


def _publish_best(
    step: ResolvedStep,
    inputs: dict[str, Artifact],
    r: StepRun,
    key: str,
    tracker: StepTracker,
    best: dict[str, Any],
    summary: dict[str, Any],
) -> StepRecord:
    """The best trial's outputs (copied, hard links where possible) published under the sweep step's key."""
    from kollm.pipeline.runner import _input_record
    from kollm.pipeline.step import StepRecord

    manifest = r.store.lookup(best["key"])
    assert manifest is not None
    staged = r.store.stage(key)
    try:
        for name, art in r.store.outputs(manifest).items():
            if art.path is None:
                raise StepFailed(f"step '{step.name}': the best trial's output '{name}' has no local path")
            try:
                shutil.copytree(art.path, staged / name, copy_function=os.link)
            except OSError:
                shutil.rmtree(staged / name, ignore_errors=True)
                shutil.copytree(art.path, staged / name)
        published = r.store.publish(
            key,
            staged,
            {
                "name": step.name,
                "kind": step.kind,
                "key": key,
                "config": manifest["config"],
                "outputs": {n: {k: v for k, v in o.items() if k != "uri"} for n, o in manifest["outputs"].items()},
                "metrics": manifest.get("metrics", {}),
                "inputs": {k: _input_record(a) for k, a in inputs.items()},
                "references": r.plan.references[step.name],
                "run_id": tracker.run_id,
                "attempt": 0,
                "finished_at": time.time(),
                "sweep": summary,
            },
        )
    except BaseException:
        r.store.discard(staged)
        raise
    return StepRecord(
        step.name, step.kind, key, tracker.run_id, False, r.store.outputs(published), published.get("metrics", {})
    )


def sweep_tags(summary: dict[str, Any]) -> dict[str, str]:
    """What the step's MLflow run records about its sweep: the best config and the trial table (JSON)."""
    best = summary["best"]
    return {
        "kollm.sweep.metric": f"{summary['metric']} ({summary['mode']})",
        "kollm.sweep.best_trial": str(best["trial"]),
        "kollm.sweep.best_config": json.dumps(best["values"], ensure_ascii=False),
        "kollm.sweep.trials": json.dumps(summary["trials"], ensure_ascii=False, default=str),
    }


def trial_table(tags: dict[str, str]) -> list[dict[str, Any]]:
    """The trial table a step's run recorded (best first), or [] for a step without a sweep."""
    text = tags.get("kollm.sweep.trials")
    if not text:
        return []
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return []
