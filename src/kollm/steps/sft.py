"""`sft`: supervised fine-tuning on chat-format instructions, with loss on assistant tokens only.

    - kind: sft
      config:
        seq_len: 256
        max_steps: 40
        lr: 5.0e-4
        packing: true            # several conversations per row, no attention between them
        lora: {r: 16}            # optional: LoRA; {quantize: 4bit} for QLoRA (CUDA only)

Conversations are rendered with the model's chat template (or `chat_template`); only assistant replies and
their end-of-turn tokens carry loss. The base model defaults to the previous step's `model` output.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from kollm.pipeline.step import STRICT, InputSpec, StepContext, StepResult
from kollm.train.config import TrainingConfig, base_model_reference, model_input

KIND = "sft"


class Config(TrainingConfig):
    model_config = STRICT
    packing: bool = Field(
        True, description="Pack several conversations into each row (attention stays within a conversation)."
    )


def inputs(config: Config) -> dict[str, InputSpec]:
    return {
        "data": InputSpec(("instructions",), help="Chat conversations (messages)."),
        **model_input(config, "The model to fine-tune (default: the previous step's model)."),
    }


def references(config: Config, project_dir: Path) -> dict[str, str]:
    return base_model_reference(config.base_model, project_dir)


def outputs(config: Config) -> dict[str, str]:
    return {"model": "model"}


def code(config: Config) -> tuple[str, ...]:
    return ("kollm.steps.sft", "kollm.train")


def run(ctx: StepContext) -> StepResult:
    from kollm.train import recipe

    job = recipe.make_job(ctx, default_scratch=False)
    return recipe.execute(ctx, job, train)


def train(job, env) -> StepResult:  # noqa: ANN001 - recipe.Job, recipe.Env (imported lazily: torch is heavy)
    from kollm.errors import StepFailed
    from kollm.train import recipe
    from kollm.train.data import RowDataset, encode_chats, pack_examples, read_split
    from kollm.train.loop import evaluate
    from kollm.train.loop import train as train_loop

    conversations = read_split(job.data.path, "train", "messages")
    if not conversations:
        raise StepFailed(f"the instructions dataset {job.data.path} has no training rows")
    model, tokenizer, base = recipe.load_base(job, env, lambda: [m["content"] for c in conversations for m in c])
    cfg = job.config
    examples, truncated, dropped = encode_chats(tokenizer, conversations, cfg.seq_len)
    if not examples:
        raise StepFailed(f"no conversation has an assistant reply within seq_len={cfg.seq_len} tokens; raise seq_len")
    rows = pack_examples(examples, cfg.seq_len, tokenizer.pad_token_id, packing=cfg.packing)
    eval_conv = read_split(job.data.path, "eval", "messages")
    eval_rows = None
    if eval_conv:
        eval_examples, _, _ = encode_chats(tokenizer, eval_conv, cfg.seq_len)
        eval_rows = (
            pack_examples(eval_examples, cfg.seq_len, tokenizer.pad_token_id, packing=cfg.packing)
            if eval_examples
            else None
        )
    loop = recipe.loop_config(cfg, len(rows), env.world)
    env.log_params(
        recipe.params_for_tracking(
            job,
            loop,
            rows=len(rows),
            conversations=len(examples),
            truncated=truncated,
            dropped=dropped,
            trainable_params=base["trainable_params"],
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
    metrics = recipe.step_metrics(
        result,
        eval_loss,
        {
            "train_rows": float(len(rows)),
            "conversations": float(len(examples)),
            "truncated": float(truncated),
            "packing_fill": rows.stats.fill,
        },
    )
    meta = recipe.save_model(model, tokenizer, job, env, base=base, result=result, metrics=metrics)
    return StepResult(metrics=metrics, meta={"model": meta})
