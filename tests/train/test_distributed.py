"""The distributed path on CPU: the cpt training function on 2 processes (gloo, DDP) matches one process
that sees the same global batches."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from kollm.pipeline.step import Artifact
from kollm.steps import cpt
from kollm.train.recipe import Env, Job, launch


def _job(tmp_path, texts, name: str, batch_size: int) -> Job:
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        pd.DataFrame({"text": texts(80)}).to_parquet(data / "train.parquet")
        pd.DataFrame({"text": texts(8, seed=9)}).to_parquet(data / "eval.parquet")
    config = cpt.Config(
        base_model="scratch",
        vocab_size=400,
        seq_len=48,
        max_steps=4,
        lr=3e-3,
        batch_size=batch_size,
        log_every=1,
        checkpoint_every=2,
    )
    art = Artifact("corpus", data, "sha256:test")
    return Job(
        step=name,
        kind="cpt",
        config=config,
        data=art,
        base_model="scratch",
        base_artifact=None,
        tokenizer_corpus=art,
        output_dir=tmp_path / name / "model",
        checkpoint_dir=tmp_path / name / "ckpt",
        log_file=tmp_path / "logs" / f"{name}.jsonl",
    )


@pytest.mark.slow(reason="two gloo training processes and a single-process run")
def test_two_gloo_processes_match_one_process(tmp_path, texts):
    seen = []
    ddp = launch(
        cpt.train,
        _job(tmp_path, texts, "ddp", batch_size=2),
        world=2,
        backend="gloo",
        progress=lambda it, **kw: (seen.append(x) or x for x in it),
    )
    single = cpt.train(_job(tmp_path, texts, "single", batch_size=4), Env(device=torch.device("cpu")))
    assert seen == [1, 2, 3, 4]  # rank 0's log lines reached the parent's progress bar
    assert ddp.metrics["steps"] == single.metrics["steps"] == 4
    assert ddp.metrics["total_tokens"] == single.metrics["total_tokens"]
    assert ddp.metrics["train_loss"] == pytest.approx(single.metrics["train_loss"], rel=1e-4)
    assert ddp.metrics["eval_loss"] == pytest.approx(single.metrics["eval_loss"], rel=1e-4)
    a, b = (
        load_file(tmp_path / "ddp" / "model" / "model.safetensors"),
        load_file(tmp_path / "single" / "model" / "model.safetensors"),
    )
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k
    logs = [json.loads(x) for x in (tmp_path / "logs" / "ddp.jsonl").read_text().splitlines()]
    assert [x["global_step"] for x in logs if "global_step" in x] == [1, 2, 3, 4]  # only rank 0 logs
