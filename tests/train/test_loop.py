"""The training loop: learning, exact gradient accumulation, LoRA, and checkpoint/resume after a real SIGKILL."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from kollm.train import checkpoint as ckpt
from kollm.train.data import RowDataset, encode_corpus, pack_stream
from kollm.train.loop import LoopConfig, train
from kollm.train.modeling import apply_lora, scratch_model

CPU = torch.device("cpu")


@pytest.fixture()
def rows(tokenizer, texts):
    return pack_stream(encode_corpus(texts(120), tokenizer), 48, tokenizer.pad_token_id)


def test_loss_decreases(tiny_model, rows):
    logs = []
    result = train(
        tiny_model,
        RowDataset(rows),
        LoopConfig(max_steps=25, lr=3e-3, batch_size=8, log_every=5),
        device=CPU,
        on_log=logs.append,
    )
    assert result.steps == 25 and len(result.losses) == 25
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 0.5
    assert [e.step for e in logs] == [5, 10, 15, 20, 25]
    assert all(e.learning_rate > 0 and e.grad_norm > 0 and e.tokens_per_s > 0 for e in logs)
    assert 25 * 4 * 48 < logs[-1].tokens <= 25 * 8 * 48  # batches at an epoch end may be partial


def test_gradient_accumulation_is_exact_token_mean(tokenizer, rows):
    """Two micro-batches of 4 rows give the same update as one batch of 8 even when they hold very different
    numbers of loss tokens: gradients are divided by the step's total token count, not averaged per micro-batch."""
    import copy

    import numpy as np

    from kollm.train.kernels import IGNORE_INDEX

    uneven = copy.deepcopy(rows)
    uneven.labels[:4, 8:] = IGNORE_INDEX  # the first micro-batch carries far fewer loss tokens
    a = scratch_model("tiny", tokenizer, seed=1, attn_implementation="sdpa")
    b = scratch_model("tiny", tokenizer, seed=1, attn_implementation="sdpa")
    ds = RowDataset(uneven)
    la, lb = [], []
    ra = train(
        a, ds, LoopConfig(max_steps=3, lr=1e-3, batch_size=8, grad_accum=1, shuffle=False), device=CPU, on_log=la.append
    )
    rb = train(
        b, ds, LoopConfig(max_steps=3, lr=1e-3, batch_size=4, grad_accum=2, shuffle=False), device=CPU, on_log=lb.append
    )
    assert np.count_nonzero(uneven.labels[:4] != IGNORE_INDEX) * 3 < np.count_nonzero(
        uneven.labels[4:8] != IGNORE_INDEX
    )
    assert ra.losses == pytest.approx(rb.losses, rel=1e-5)
    assert [e.grad_norm for e in la] == pytest.approx([e.grad_norm for e in lb], rel=1e-4)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-4), (n, (pa - pb).abs().max())


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("max_norm", [0.0, 0.05, 1e3])
def test_one_divisor_does_what_mean_then_clip_grad_norm_does(fused, max_norm):
    """The loop turns summed gradients into the clipped mean gradient with one divisor, which the fused AdamW
    kernel applies as it reads them (optimizer.grad_scale): the same update as dividing, clip_grad_norm_, step."""
    from kollm.train.loop import _mean_and_clip

    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 4), (4,), (3, 5)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    summed = [torch.randn(s, generator=gen) * 7 for s in shapes]
    denom = torch.tensor(12.0)

    ref = [torch.nn.Parameter(t.clone()) for t in start]
    for p, g in zip(ref, summed):
        p.grad = g / denom
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm if max_norm > 0 else float("inf"))
    torch.optim.AdamW(ref, lr=0.1).step()

    got = [torch.nn.Parameter(t.clone()) for t in start]
    grads = [g.clone() for g in summed]
    norm, divisor = _mean_and_clip(grads, denom, max_norm)
    for p, g in zip(got, grads):
        p.grad = g
    opt = torch.optim.AdamW(got, lr=0.1, fused=fused)
    if fused:
        opt.grad_scale = divisor
    else:
        torch._foreach_div_(grads, divisor)
    opt.step()

    assert float(norm) == pytest.approx(float(ref_norm), rel=1e-6)
    assert (float(divisor) > float(denom)) == (0 < max_norm < float(ref_norm))
    for a, b, s0 in zip(got, ref, start):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)  # AdamW's update alone hardly shows a scale
        assert torch.allclose(a, b, atol=1e-6) and not torch.equal(a, s0)


def test_lora_changes_every_trainable_parameter_and_no_frozen_one(tiny_model, rows):
    model = apply_lora(tiny_model, r=4, alpha=8, dropout=0.0, target_modules="all-linear", quantized=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    train(model, RowDataset(rows), LoopConfig(max_steps=3, lr=1e-2, batch_size=4), device=CPU)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in trainable), f"{n}: changed={changed}, trainable={n in trainable}"


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, time, json, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from conftest import korean_texts
    from kollm.train.modeling import train_tokenizer, scratch_model
    from kollm.train.data import encode_corpus, pack_stream, RowDataset
    from kollm.train.loop import LoopConfig, train

    ckpt_dir, out, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    tok = train_tokenizer(korean_texts(300), 400)
    model = scratch_model("tiny", tok, seed=0, attn_implementation="sdpa")
    rows = pack_stream(encode_corpus(korean_texts(120), tok), 48, tok.pad_token_id)
    cfg = LoopConfig(max_steps=10, lr=3e-3, batch_size=8, checkpoint_every=3, warmup_steps=2)
    result = train(model, RowDataset(rows), cfg, device=torch.device("cpu"),
                   checkpoint_dir=None if ckpt_dir == "-" else __import__("pathlib").Path(ckpt_dir),
                   on_log=lambda e: time.sleep(delay))
    json.dump({{"losses": result.losses, "resumed_from": result.resumed_from,
               "weight": float(sum(p.double().sum() for p in model.parameters()))}}, open(out, "w"))
    """
)


def _run(script: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), *args], env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow(reason="a training process killed mid-run, then resumed")
def test_killed_run_resumes_from_its_checkpoint(tmp_path):
    import json

    script = tmp_path / "job.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(Path(__file__).parent)))
    ckpt_dir = tmp_path / "ckpt"
    # 1. Start a run that logs slowly, and SIGKILL it once a checkpoint exists (mid-training, for real).
    proc = _run(script, str(ckpt_dir), str(tmp_path / "killed.json"), "0.4")
    deadline = time.time() + 120
    while not ckpt.list_checkpoints(ckpt_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert ckpt.list_checkpoints(ckpt_dir), "no checkpoint appeared"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed.json").exists()  # it really died before finishing
    first = ckpt.list_checkpoints(ckpt_dir)[-1]
    # 2. Re-run: resumes from the newest checkpoint; 3. an uninterrupted run for reference (in parallel).
    resumed = _run(script, str(ckpt_dir), str(tmp_path / "resumed.json"), "0")
    fresh = _run(script, "-", str(tmp_path / "fresh.json"), "0")
    assert resumed.wait(timeout=180) == 0 and fresh.wait(timeout=180) == 0
    r = json.loads((tmp_path / "resumed.json").read_text())
    f = json.loads((tmp_path / "fresh.json").read_text())
    assert r["resumed_from"] is not None and r["resumed_from"] >= int(first.name.split("-")[1])
    assert f["resumed_from"] is None
    assert len(r["losses"]) == len(f["losses"]) == 10
    assert r["losses"] == pytest.approx(f["losses"], rel=1e-4)
    assert r["weight"] == pytest.approx(f["weight"], rel=1e-5)


def test_checkpoint_write_is_atomic_and_pruned(tmp_path, tiny_model, rows):
    cfg = LoopConfig(max_steps=7, lr=1e-3, batch_size=4, checkpoint_every=2, keep_checkpoints=2)
    train(tiny_model, RowDataset(rows), cfg, device=CPU, checkpoint_dir=tmp_path)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    # A half-written checkpoint (no state.pt) is ignored.
    (tmp_path / "step-00000008").mkdir()
    assert ckpt.latest(tmp_path).name == "step-00000006"


def test_gradient_checkpointing_recomputes_layers_and_trains_identically(tokenizer, rows, monkeypatch):
    """gradient_checkpointing: every decoder layer's MLP runs again in the backward pass while the attention
    kernel's output is kept, and the updates are the same."""
    from kollm.train import loop

    decisions: list[tuple[str, str]] = []
    keep_attention = loop._keep_attention

    def recording_policy(ctx, op, *args, **kwargs):
        policy = keep_attention(ctx, op, *args, **kwargs)
        decisions.append((str(op), policy.name))
        return policy

    monkeypatch.setattr(loop, "_keep_attention", recording_policy)
    calls = {"plain": 0, "checkpointed": 0}
    models, results = {}, {}
    for name in calls:
        model = scratch_model("tiny", tokenizer, seed=3, attn_implementation="sdpa")
        model.get_decoder().layers[0].mlp.register_forward_pre_hook(
            lambda *_, n=name: calls.__setitem__(n, calls[n] + 1)
        )
        cfg = LoopConfig(
            max_steps=3, lr=1e-3, batch_size=4, shuffle=False, gradient_checkpointing=name == "checkpointed"
        )
        results[name] = train(model, RowDataset(rows), cfg, device=CPU)
        models[name] = model
    assert calls == {"plain": 3, "checkpointed": 6}
    saved = {op for op, policy in decisions if policy == "MUST_SAVE"}
    assert saved and all("attention" in op for op in saved)  # the attention op is kept ...
    assert any(policy == "PREFER_RECOMPUTE" and "mm" in op for op, policy in decisions)  # ... the matmuls recomputed
    assert results["checkpointed"].losses == pytest.approx(results["plain"].losses, rel=1e-5)
    for pa, pb in zip(models["plain"].parameters(), models["checkpointed"].parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-5)
    assert all("forward" not in vars(layer) for layer in models["checkpointed"].get_decoder().layers)  # left as it came


def test_gradient_checkpointing_under_bf16_keeps_the_residual_stream_in_bf16(tokenizer, rows):
    """Under bf16 autocast the checkpointed layers see (and keep) bf16 inputs; without checkpointing they are fp32."""
    seen: dict[bool, set[torch.dtype]] = {True: set(), False: set()}
    for checkpointing in seen:
        model = scratch_model("tiny", tokenizer, seed=3, attn_implementation="sdpa")
        model.get_decoder().layers[0].register_forward_pre_hook(
            lambda m, args, kw, c=checkpointing: seen[c].add(kw.get("hidden_states", args[0] if args else None).dtype),
            with_kwargs=True,
        )
        cfg = LoopConfig(max_steps=2, lr=1e-3, batch_size=4, precision="bf16", gradient_checkpointing=checkpointing)
        result = train(model, RowDataset(rows), cfg, device=CPU)
        assert all(math.isfinite(x) for x in result.losses)
        assert model.get_input_embeddings()._forward_hooks == {}  # the cast is removed after training
    assert seen == {True: {torch.bfloat16}, False: {torch.float32}}


def test_checkpoints_in_the_store_resume_on_another_node(tmp_path, tiny_model, tokenizer, rows):
    """With `checkpoint_remote` (the artifact store's folder; fsspec's memory:// here, S3 in
    tests/executors/test_ray_lost_node.py) checkpoints are uploaded, pruned there too, and a run with an empty local
    folder (another node) resumes from the newest complete one."""
    import uuid

    import fsspec

    remote = f"memory://kollm-test-{uuid.uuid4().hex[:8]}/checkpoints/k"
    cfg = LoopConfig(max_steps=7, lr=1e-3, batch_size=4, checkpoint_every=2, keep_checkpoints=2)
    train(tiny_model, RowDataset(rows), cfg, device=CPU, checkpoint_dir=tmp_path / "node-a", checkpoint_remote=remote)
    fs, root = fsspec.core.url_to_fs(remote)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == ["step-00000004", "step-00000006"]
    fs.pipe(f"{root}/step-00000008/weights.pt", b"half uploaded")  # no state.pt: a node died mid-upload
    longer = LoopConfig(max_steps=9, lr=1e-3, batch_size=4, checkpoint_every=2, keep_checkpoints=2)
    fresh = scratch_model("tiny", tokenizer, seed=1, attn_implementation="sdpa")
    result = train(
        fresh, RowDataset(rows), longer, device=CPU, checkpoint_dir=tmp_path / "node-b", checkpoint_remote=remote
    )
    assert result.resumed_from == 6 and result.steps == 9
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "node-b")][0] == "step-00000006"


@pytest.mark.parametrize("remote", [False, True])
def test_an_attempt_left_running_writes_no_checkpoint_once_its_step_is_published(tmp_path, tiny_model, rows, remote):
    """An attempt left running (a Ray Train run whose coordinator died) beside its step's retry: both write the
    step's checkpoint folder while the step is not published (one key, one training); once the retry published it
    (the runner removes the folder, every attempt's lease with it) the attempt stops at its next checkpoint write
    (Superseded) and writes nothing into the folder (the store's, with checkpoints in the artifact store)."""
    import shutil
    import uuid

    import fsspec

    from kollm.errors import Superseded
    from kollm.pipeline.lease import Lease

    folder = tmp_path / "step-ckpt"
    url = f"memory://kollm-test-{uuid.uuid4().hex[:8]}/checkpoints/k" if remote else None
    fs, root = fsspec.core.url_to_fs(url or "memory://unused")
    left_running = Lease.new(0, folder, url).claim()
    Lease.new(1, folder, url).claim()  # the retry's
    seen: list[str] = []

    def on_log(entry):
        if entry.step == 3:  # the retry publishes the step; the runner then removes its checkpoint folder
            seen.extend(sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) if url else [])
            seen.extend(p.name for p in ckpt.list_checkpoints(folder))
            shutil.rmtree(folder, ignore_errors=True)
            if url:
                fs.rm(root, recursive=True)

    cfg = LoopConfig(max_steps=6, lr=1e-3, batch_size=4, checkpoint_every=2, log_every=1)
    local = tmp_path / "node-scratch" if url else folder  # with a store: a node's scratch copy, as on Ray
    with pytest.raises(Superseded, match="without writing the checkpoint of step 4: its lease on the step's"):
        train(tiny_model, RowDataset(rows), cfg, device=CPU, checkpoint_dir=local, checkpoint_remote=url,
              lease=left_running, on_log=on_log)  # fmt: skip
    assert "step-00000002" in seen  # written while the step was not published, the retry's lease beside it
    assert not folder.exists() and not (url and fs.exists(root))


def test_a_checkpoint_written_as_its_step_was_published_is_removed(tmp_path):
    """The check after a write (kollm.pipeline.lease.Lease.written), for a step published between the check before
    the write and the write: what was written is removed again (and the folder, empty then), unless a new run of the
    step already uses the folder (the same key, so the same training: the checkpoint resumes it as well)."""
    import shutil

    from kollm.errors import Superseded
    from kollm.pipeline.lease import Lease

    folder = tmp_path / "ckpt"
    lease = Lease.new(0, folder).claim()
    written = folder / "step-00000002"
    written.mkdir()
    lease.written("a checkpoint", [written])  # still held: kept
    assert written.is_dir()
    (folder / "attempts" / lease.token).unlink()  # published ...
    Lease.new(0, folder).claim()  # ... and run again since (--force)
    with pytest.raises(Superseded, match="without writing a checkpoint"):
        lease.written("a checkpoint", [written])
    assert written.is_dir()
    shutil.rmtree(folder / "attempts")  # published, nothing else
    with pytest.raises(Superseded, match="without writing a checkpoint"):
        lease.written("a checkpoint", [written])
    assert not folder.exists()
