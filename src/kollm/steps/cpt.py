"""`cpt`: continued pretraining (causal LM) on a corpus dataset.

    - kind: cpt
      config:
        base_model: scratch      # or a hub name / folder; default: the `model` input if wired, else scratch
        preset: tiny             # scratch size: tiny, small, base
        seq_len: 256
        max_steps: 60
        lr: 1.0e-3
        lora: {r: 16}            # optional: LoRA instead of full training

Documents are packed into fixed-length rows with per-document attention (positions restart at each
document, no attention crosses a boundary). Output `model`: a Hugging Face folder plus kollm.json.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from kollm.pipeline.step import STRICT, InputSpec, StepContext, StepResult
from kollm.train.config import TrainingConfig, base_model_reference, model_input

KIND = "cpt"


class Config(TrainingConfig):
    model_config = STRICT
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")


def inputs(config: Config) -> dict[str, InputSpec]:
    return {
        "data": InputSpec(("corpus",), help="The text corpus to train on."),
        **model_input(config, "A model to continue from (default: scratch)."),
    }


def references(config: Config, project_dir: Path) -> dict[str, str]:
    return base_model_reference(config.base_model, project_dir)


def outputs(config: Config) -> dict[str, str]:
    return {"model": "model"}


def code(config: Config) -> tuple[str, ...]:
    return ("kollm.steps.cpt", "kollm.train")


def run(ctx: StepContext) -> StepResult:
    from kollm.train import recipe

    job = recipe.make_job(ctx, default_scratch=True)
    return recipe.execute(ctx, job, train)


def train(job, env) -> StepResult:  # noqa: ANN001 - recipe.Job, recipe.Env (imported lazily: torch is heavy)
    from kollm.errors import StepFailed
    from kollm.train import recipe
    from kollm.train.data import RowDataset, encode_corpus, pack_stream, read_split
    from kollm.train.loop import evaluate
    from kollm.train.loop import train as train_loop

    texts = read_split(job.data.path, "train", "text")
    if not texts:
        raise StepFailed(f"the corpus {job.data.path} has no training rows")
    model, tokenizer, base = recipe.load_base(job, env, lambda: texts)
    cfg = job.config
    rows = pack_stream(encode_corpus(texts, tokenizer), cfg.seq_len, tokenizer.pad_token_id)
    eval_texts = read_split(job.data.path, "eval", "text")
    eval_rows = (
        pack_stream(encode_corpus(eval_texts, tokenizer), cfg.seq_len, tokenizer.pad_token_id) if eval_texts else None
    )
    loop = recipe.loop_config(cfg, len(rows), env.world)
    env.log_params(
        recipe.params_for_tracking(
            job, loop, rows=len(rows), train_tokens=rows.stats.tokens, trainable_params=base["trainable_params"]
        )
    )
    result = train_loop(
        model,
        RowDataset(rows),
        loop,
        device=env.device,
        checkpoint_dir=job.checkpoint_dir,
        checkpoint_remote=job.checkpoint_remote,
        lease=job.lease,
        progress=env.progress,
        on_log=env.on_log,
        description=f"{job.step}: training",
    )
    eval_loss = None
    if eval_rows is not None:
        eval_loss, _ = evaluate(
            model, RowDataset(eval_rows), device=env.device, batch_size=cfg.batch_size, precision=cfg.precision
        )
    metrics = recipe.step_metrics(result, eval_loss, {"train_rows": float(len(rows)), "packing_fill": rows.stats.fill})
    meta = recipe.save_model(model, tokenizer, job, env, base=base, result=result, metrics=metrics)
    return StepResult(metrics=metrics, meta={"model": meta})
