"""`align`: preference alignment with DPO, ORPO or KTO on a preferences dataset (prompt, chosen, rejected),
or GRPO with your own reward function on prompts (a preferences or instructions dataset).

    - kind: align
      config:
        method: dpo              # dpo (the default) | orpo | kto | grpo
        beta: 0.1
        max_steps: 30
        lr: 5.0e-5
        seq_len: 256             # the longest prompt + reply kept

The base model defaults to the previous step's `model` output. DPO and KTO compare against the starting
model as the frozen reference (its log-probabilities are computed once before training); ORPO needs none.

GRPO samples `num_generations` replies per prompt and scores them with `reward: module:function` (the
project folder is on sys.path), called as `fn(prompts=[messages...], completions=[str...], **columns)`
where columns are the dataset's other columns (chosen/rejected, or `answer`: the reference reply of an
instructions dataset), returning one float per completion.

Each method has its own settings: `Config` is a discriminated union on `method` of one model per method
(DpoConfig, OrpoConfig, KtoConfig, GrpoConfig) over the settings they share (AlignSettings: the training
settings, lr, batch_size), so a setting of another method (`method: dpo` with `num_generations`) is an error
that names it. The step's functions receive the chosen method's model (`kollm.pipeline.step.parse_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, RootModel, field_validator, model_validator

from kollm._pydantic import module_function
from kollm.pipeline.step import STRICT, InputSpec, StepContext, StepResult
from kollm.train.config import TrainingConfig, base_model_reference, model_input

KIND = "align"
DEFAULT_METHOD = "dpo"


class AlignSettings(TrainingConfig):
    """The settings every method has: the training settings, with align's own defaults for lr and batch_size."""

    model_config = STRICT
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    batch_size: int = Field(4, ge=1, description="Preference pairs (GRPO: prompts) per micro-batch per GPU.")


class DpoConfig(AlignSettings):
    method: Literal["dpo"] = Field("dpo", description="The preference objective: dpo (the default), orpo, kto or grpo.")
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull toward the reference model (higher: stay closer to it)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Assumed probability that a preference label is flipped (conservative DPO)."
    )


class OrpoConfig(AlignSettings):
    method: Literal["orpo"] = Field(description="The preference objective: dpo (the default), orpo, kto or grpo.")
    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term (ORPO needs no reference model).")


class KtoConfig(AlignSettings):
    method: Literal["kto"] = Field(description="The preference objective: dpo (the default), orpo, kto or grpo.")
    beta: float = Field(
        0.1, gt=0, description="Strength of the pull toward the reference model (higher: stay closer to it)."
    )


class GrpoConfig(AlignSettings):
    method: Literal["grpo"] = Field(description="The preference objective: dpo (the default), orpo, kto or grpo.")
    reward: str = Field(..., description="The reward function, module:function (the project folder is on sys.path).")
    num_generations: int = Field(4, ge=2, description="Replies sampled per prompt (a group).")
    max_new_tokens: int = Field(64, ge=1, description="Longest sampled reply.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")

    _module_function = field_validator("reward")(module_function)


AlignConfig = DpoConfig | OrpoConfig | KtoConfig | GrpoConfig


class Config(RootModel[Annotated[AlignConfig, Field(discriminator="method")]]):
    """The `config:` of an align step: the model of its `method` (DPO when `method` is not given)."""

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, data: Any) -> Any:
        if isinstance(data, dict) and "method" not in data:
            return {**data, "method": DEFAULT_METHOD}
        return data


def inputs(config: AlignConfig) -> dict[str, InputSpec]:
    return {
        "data": InputSpec(
            ("preferences", "instructions") if config.method == "grpo" else ("preferences",),
            help="Preference pairs (prompt, chosen, rejected); GRPO also takes instructions (their prompts).",
        ),
        **model_input(config, "The model to align (default: the previous step's model)."),
    }


def references(config: AlignConfig, project_dir: Path) -> dict[str, str]:
    return base_model_reference(config.base_model, project_dir)


def outputs(config: AlignConfig) -> dict[str, str]:
    return {"model": "model"}


def code(config: AlignConfig) -> tuple[str, ...]:
    reward_module = (config.reward.split(":")[0],) if isinstance(config, GrpoConfig) else ()
    return ("kollm.steps.align", "kollm.train", *reward_module)


def run(ctx: StepContext) -> StepResult:
    from kollm.train import recipe

    job = recipe.make_job(ctx, default_scratch=False)
    return recipe.execute(ctx, job, train)


def train(job, env) -> StepResult:  # noqa: ANN001 - recipe.Job, recipe.Env (imported lazily: torch is heavy)
    from functools import partial

    from kollm.errors import StepFailed
    from kollm.train import prefs, recipe
    from kollm.train.data import PreferenceDataset, collate_preferences, encode_preferences, read_preferences
    from kollm.train.loop import evaluate
    from kollm.train.loop import train as train_loop

    cfg = job.config
    if cfg.method == "grpo":
        return _train_grpo(job, env)
    records = read_preferences(job.data.path, "train")
    if not records:
        raise StepFailed(f"the preferences dataset {job.data.path} has no training rows")
    model, tokenizer, base = recipe.load_base(
        job,
        env,
        lambda: [t for r in records for t in (r["chosen"], r["rejected"], *(m["content"] for m in r["prompt"]))],
    )
    pairs, dropped = encode_preferences(tokenizer, records, cfg.seq_len)
    if not pairs:
        raise StepFailed(f"no preference pair has a reply within seq_len={cfg.seq_len} tokens; raise seq_len")
    dataset = PreferenceDataset(pairs, kl=cfg.method == "kto")
    eval_records = read_preferences(job.data.path, "eval")
    eval_pairs = encode_preferences(tokenizer, eval_records, cfg.seq_len)[0] if eval_records else []
    eval_set = PreferenceDataset(eval_pairs, kl=cfg.method == "kto") if eval_pairs else None
    collate = partial(collate_preferences, pad_id=tokenizer.pad_token_id)
    if cfg.method in ("dpo", "kto"):
        for ds in (dataset, eval_set):
            if ds is not None:
                prefs.add_reference_logps(
                    model,
                    ds,
                    device=env.device,
                    batch_size=cfg.batch_size,
                    pad_id=tokenizer.pad_token_id,
                    precision=cfg.precision,
                )
    objective = {
        "dpo": lambda: prefs.dpo(cfg.beta, cfg.label_smoothing),
        "orpo": lambda: prefs.orpo(cfg.beta),
        "kto": lambda: prefs.kto(cfg.beta),
    }[cfg.method]()
    loop = recipe.loop_config(cfg, len(dataset), env.world)
    env.log_params(
        recipe.params_for_tracking(
            job, loop, pairs=len(pairs), dropped=dropped, trainable_params=base["trainable_params"]
        )
    )
    result = train_loop(
        model,
        dataset,
        loop,
        device=env.device,
        objective=objective,
        collate=collate,
        checkpoint_dir=job.checkpoint_dir,
        checkpoint_remote=job.checkpoint_remote,
        lease=job.lease,
        progress=env.progress,
        on_log=env.on_log,
        description=f"{job.step}: {cfg.method}",
    )
    extra: dict[str, float] = {"pairs": float(len(pairs))}
    eval_loss = None
    if eval_set is not None:
        eval_loss, eval_metrics = evaluate(
            model,
            eval_set,
            device=env.device,
            batch_size=cfg.batch_size,
            objective=objective,
            collate=collate,
            precision=cfg.precision,
        )
        extra.update({f"eval_{k}": v for k, v in eval_metrics.items()})
    metrics = recipe.step_metrics(result, eval_loss, extra)
    meta = recipe.save_model(model, tokenizer, job, env, base=base, result=result, metrics=metrics)
    meta["method"] = cfg.method
    return StepResult(metrics=metrics, meta={"model": meta})


def _prompts(job, split: str) -> list[dict]:  # noqa: ANN001 - recipe.Job
    """GRPO prompts: from preferences (prompt + other columns) or instructions (the turns before the last reply)."""
    from kollm.train.data import read_preferences, read_split

    if job.data.type == "preferences":
        return read_preferences(job.data.path, split)
    out = []
    for conv in read_split(job.data.path, split, "messages"):
        msgs = [{"role": str(m["role"]), "content": str(m["content"])} for m in conv]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last:
            out.append({"prompt": msgs[:last], "answer": msgs[last]["content"]})
    return out


def _train_grpo(job, env) -> StepResult:  # noqa: ANN001 - recipe.Job, recipe.Env
    from functools import partial
    from pathlib import Path

    from kollm.errors import StepFailed
    from kollm.steps.python import resolve
    from kollm.train import modeling, prefs, recipe
    from kollm.train.loop import evaluate
    from kollm.train.loop import train as train_loop

    cfg = job.config
    reward_fn = resolve(cfg.reward, job.project_dir or Path.cwd())
    records = _prompts(job, "train")
    if not records:
        raise StepFailed(f"the dataset {job.data.path} has no prompts to train on")
    model, tokenizer, base = recipe.load_base(job, env, lambda: [m["content"] for r in records for m in r["prompt"]])
    max_prompt = max(8, cfg.seq_len - cfg.max_new_tokens)
    dataset = prefs.PromptDataset(tokenizer, records, max_prompt)
    eval_records = _prompts(job, "eval")
    eval_set = prefs.PromptDataset(tokenizer, eval_records, max_prompt) if eval_records else None
    stop = modeling.end_of_turn_ids(tokenizer)
    settings = {
        "num_generations": cfg.num_generations,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "stop_ids": stop,
    }
    objective = prefs.grpo(tokenizer, dataset, reward_fn, **settings)
    collate = partial(prefs.collate_prompts, pad_id=tokenizer.pad_token_id)
    loop = recipe.loop_config(cfg, len(dataset), env.world)
    env.log_params(
        recipe.params_for_tracking(job, loop, prompts=len(dataset), trainable_params=base["trainable_params"])
    )
    result = train_loop(
        model,
        dataset,
        loop,
        device=env.device,
        objective=objective,
        collate=collate,
        checkpoint_dir=job.checkpoint_dir,
        checkpoint_remote=job.checkpoint_remote,
        lease=job.lease,
        progress=env.progress,
        on_log=env.on_log,
        description=f"{job.step}: grpo",
    )
    extra: dict[str, float] = {"prompts": float(len(dataset))}
    eval_loss = None
    if eval_set is not None:
        eval_objective = prefs.grpo(tokenizer, eval_set, reward_fn, **settings)
        eval_loss, eval_metrics = evaluate(
            model,
            eval_set,
            device=env.device,
            batch_size=cfg.batch_size,
            objective=eval_objective,
            collate=collate,
            precision=cfg.precision,
        )
        extra.update({f"eval_{k}": v for k, v in eval_metrics.items()})
    metrics = recipe.step_metrics(result, eval_loss, extra)
    meta = recipe.save_model(model, tokenizer, job, env, base=base, result=result, metrics=metrics)
    meta["method"] = "grpo"
    return StepResult(metrics=metrics, meta={"model": meta})
