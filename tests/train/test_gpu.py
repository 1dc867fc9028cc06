"""The training loop on a CUDA GPU: bf16 autocast, fused AdamW, the kernels' attention for packed rows,
torch.compile; and a throughput reading for the `base` preset (printed, never asserted). Skipped on CPU."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from kollm.pipeline.step import Artifact
from kollm.train.data import RowDataset, encode_corpus, pack_stream
from kollm.train.kernels import attention_implementation, lm_loss
from kollm.train.loop import LoopConfig, StepLog, train
from kollm.train.modeling import scratch_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def test_packed_equals_unpacked_on_gpu(tokenizer, texts):
    model = scratch_model("tiny", tokenizer, seed=0, attn_implementation=attention_implementation(CUDA)).to(CUDA)
    docs = encode_corpus(texts(12, seed=4), tokenizer)
    rows = pack_stream(docs, seq_len=sum(len(d) for d in docs), pad_id=tokenizer.pad_token_id)
    ids, labels, pos = (
        torch.tensor(a, dtype=torch.long, device=CUDA) for a in (rows.input_ids, rows.labels, rows.position_ids)
    )
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed, n = lm_loss(model, ids, labels, pos, None)
        alone, m = 0.0, 0
        start = 0
        for d in docs:
            s, k = lm_loss(model, ids[:, start : start + len(d)], labels[:, start : start + len(d)], None, None)
            alone, m, start = alone + float(s), m + int(k), start + len(d)
    assert int(n) == m
    assert float(packed) / int(n) == pytest.approx(alone / m, rel=2e-2)  # bf16


@pytest.mark.parametrize("compile", [False, True])
def test_loss_decreases_on_gpu(tokenizer, texts, compile):
    model = scratch_model("tiny", tokenizer, seed=0, attn_implementation=attention_implementation(CUDA))
    rows = pack_stream(encode_corpus(texts(200), tokenizer), 64, tokenizer.pad_token_id)
    result = train(
        model, RowDataset(rows), LoopConfig(max_steps=30, lr=3e-3, batch_size=8, compile=compile), device=CUDA
    )
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.5


def test_steps_on_gpu(tmp_path, texts):
    """cpt then DPO through the steps' training functions (no MLflow needed), on the GPU."""
    from kollm.steps import align, cpt
    from kollm.train.recipe import Env, Job

    data = tmp_path / "corpus"
    data.mkdir()
    pd.DataFrame({"text": texts(100)}).to_parquet(data / "train.parquet")
    pd.DataFrame({"text": texts(5, seed=3)}).to_parquet(data / "eval.parquet")
    corpus = Artifact("corpus", data, "sha256:c")
    job = Job(
        "cpt",
        "cpt",
        cpt.Config(base_model="scratch", vocab_size=400, seq_len=64, max_steps=10, lr=3e-3),
        corpus,
        "scratch",
        None,
        corpus,
        tmp_path / "cpt",
        tmp_path / "ck1",
        tmp_path / "cpt.jsonl",
    )
    logs: list[StepLog] = []
    res = cpt.train(job, Env(device=CUDA, on_log=logs.append))
    assert logs[-1].gpu_memory_gb and logs[-1].gpu_memory_gb > 0
    assert (tmp_path / "cpt" / "model.safetensors").exists() and res.metrics["eval_loss"] > 0
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    recs = [
        {"prompt": [{"role": "user", "content": t}], "chosen": "좋은 답입니다.", "rejected": "몰라요!!"}
        for t in texts(16)
    ]
    pd.DataFrame(recs[:12]).to_parquet(prefs / "train.parquet")
    pd.DataFrame(recs[12:]).to_parquet(prefs / "eval.parquet")
    model_art = Artifact("model", tmp_path / "cpt", "sha256:m")
    job2 = Job(
        "align",
        "align",
        align.DpoConfig(beta=0.5, seq_len=128, max_steps=10, lr=3e-3),
        Artifact("preferences", prefs, "sha256:p"),
        str(tmp_path / "cpt"),
        model_art,
        None,
        tmp_path / "align",
        tmp_path / "ck2",
        tmp_path / "align.jsonl",
    )
    res2 = align.train(job2, Env(device=CUDA))
    assert res2.metrics["eval_reward_margin"] > 0


class _Vocab:
    """Stands in for a 32k-token tokenizer: scratch_model only needs its size and special ids."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 32000


def test_base_preset_throughput(capsys):
    model = scratch_model("base", _Vocab(), seed=0, attn_implementation=attention_implementation(CUDA))
    n_params = sum(p.numel() for p in model.parameters())
    seq, rows = 2048, 64
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (rows, seq), generator=g)
    pos = torch.zeros_like(ids)
    for r in range(rows):  # documents of random lengths packed into each row
        cuts = sorted(torch.randint(1, seq, (6,), generator=g).tolist())
        starts = [0, *cuts]
        for a, b in zip(starts, [*cuts, seq]):
            pos[r, a:b] = torch.arange(b - a)
    labels = ids.clone()
    labels[pos == 0] = -100
    from kollm.train.data import PackedRows, PackStats

    packed = PackedRows(
        ids.int().numpy(), labels.int().numpy(), pos.int().numpy(), PackStats(rows, rows * seq, 0, rows, seq)
    )
    logs: list[StepLog] = []
    train(
        model,
        RowDataset(packed),
        LoopConfig(max_steps=12, lr=1e-4, batch_size=8, log_every=6),
        device=CUDA,
        on_log=logs.append,
    )
    with capsys.disabled():
        print(
            f"\nbase preset ({n_params / 1e6:.0f}M params), seq {seq}, batch 8, eager: "
            f"{logs[-1].tokens_per_s:,.0f} tokens/s (steps 7-12), peak {logs[-1].gpu_memory_gb:.1f} GiB"
        )
    assert logs[-1].loss < logs[0].loss + 1.0
