"""Correctness of the training hot path (kollm.train.kernels) on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from kollm.train import kernels
from kollm.train.kernels import IGNORE_INDEX, chunked_linear_cross_entropy, document_boundaries, lm_loss


def tiny_model(attn: str, seed: int = 0, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).float().eval()


@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
def test_chunked_ce_equals_plain_ce_with_gradients(chunk: int) -> None:
    torch.manual_seed(1)
    n, d, v = 23, 16, 41
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[[0, 4, 11, 22]] = IGNORE_INDEX

    loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk)
    (loss * 0.37).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (ref * 0.37).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-10, atol=1e-10)


def test_chunked_ce_all_ignored_is_zero_with_zero_gradients() -> None:
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss = chunked_linear_cross_entropy(hidden, weight, torch.full((6,), IGNORE_INDEX), 4)
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0


def test_document_boundaries_from_position_ids() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 0, 1, 2, 3]])  # row 2 starts mid-document
    cu = document_boundaries(pos)
    assert cu.tolist() == [0, 3, 5, 6, 8, 12]
    assert cu.dtype == torch.int32


def _plain_loss(model, input_ids, labels):
    logits = model(input_ids=input_ids).logits[:, :-1].float()
    targets = labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@pytest.mark.parametrize("attn", ["sdpa", kernels.VARLEN_ATTENTION])
@pytest.mark.parametrize("tie", [False, True])
def test_packed_row_equals_separate_documents(attn: str, tie: bool) -> None:
    model = tiny_model(attn, tie=tie)
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 97, (n,), generator=g) for n in (5, 9, 3, 7)]
    # Two packed rows of 12: [5, 7] and [9, 3]; labels ignore each document's first token.
    rows = [[docs[0], docs[3]], [docs[1], docs[2]]]
    input_ids = torch.stack([torch.cat(r) for r in rows])
    position_ids = torch.stack([torch.cat([torch.arange(len(d)) for d in r]) for r in rows])
    labels = input_ids.clone()
    labels[position_ids == 0] = IGNORE_INDEX

    packed_sum, packed_n = lm_loss(model, input_ids, labels, position_ids)
    packed_sum.backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    ref_sum = torch.zeros(())
    for d in docs:
        ref_sum = ref_sum + _plain_loss(model, d[None], d[None])
    ref_sum.backward()

    assert packed_n.item() == sum(len(d) - 1 for d in docs)
    torch.testing.assert_close(packed_sum, ref_sum, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_packing_without_position_ids_would_leak_across_documents() -> None:
    """The check above can fail: dropping the document boundaries changes the loss."""
    model = tiny_model("sdpa")
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 97, (6,), generator=g), torch.randint(0, 97, (6,), generator=g)
    input_ids = torch.cat([a, b])[None]
    position_ids = torch.cat([torch.arange(6), torch.arange(6)])[None]
    labels = input_ids.clone()
    labels[position_ids == 0] = IGNORE_INDEX
    with torch.no_grad():
        per_doc, _ = lm_loss(model, input_ids, labels, position_ids)
        leaky, _ = lm_loss(model, input_ids, labels, torch.arange(12)[None])
    assert abs(per_doc.item() - leaky.item()) > 1e-3


def test_lm_loss_masks_labels_and_matches_plain_loss() -> None:
    model = tiny_model("sdpa")
    input_ids = torch.randint(0, 97, (3, 10))
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX  # a prompt
    with torch.no_grad():
        loss_sum, n = lm_loss(model, input_ids, labels, chunk_tokens=4)
        ref = _plain_loss(model, input_ids, labels)
    assert n.item() == 3 * 6
    torch.testing.assert_close(loss_sum, ref, rtol=1e-5, atol=1e-5)


def test_lm_loss_under_bf16_autocast_is_close_to_fp32() -> None:
    model = tiny_model("sdpa")
    input_ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref, _ = lm_loss(model, input_ids, input_ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = lm_loss(model, input_ids, input_ids)
    assert low.dtype == torch.float32
    assert abs(low.item() - ref.item()) / ref.item() < 2e-2


def test_attention_implementation_is_sdpa_on_cpu() -> None:
    assert kernels.attention_implementation("cpu") == "sdpa"


def test_varlen_model_saves_and_loads_without_kollm_attention(tmp_path) -> None:
    model = tiny_model(kernels.VARLEN_ATTENTION)
    model.save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text()
    assert kernels.VARLEN_ATTENTION not in cfg


# ------------------------------------------------------------------------------------------ GPU (skipped on CPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_gpu_varlen_attention_equals_masked_sdpa_with_gradients() -> None:
    torch.manual_seed(0)
    lengths = [1, 37, 128, 300, 5, 553]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    n = sum(lengths)
    q = torch.randn(n, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(n, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(n, 8, 64, device="cuda", dtype=torch.bfloat16)
    out = kernels._flash_varlen(q, k, v, cu, max(lengths), 0.125)
    (out.float() * g).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = kernels._masked_sdpa(q.double(), k.double(), v.double(), cu, 0.125)
    (ref * g.double()).sum().backward()
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(out, ref) < 1e-2
    for got, t in zip(grads, (q, k, v), strict=True):
        assert rel(got, t.grad) < 2e-2


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_packed_row_equals_separate_documents(compiled: bool) -> None:
    model = tiny_model(kernels.attention_implementation("cuda")).cuda()
    assert model.config._attn_implementation == kernels.VARLEN_ATTENTION
    if compiled:
        kernels.compile_model(model)
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, 97, (n,), generator=g) for n in (17, 15, 9, 23)]  # rows of 17 + 15 and 9 + 23
    input_ids = torch.cat(docs).view(2, 32).cuda()
    position_ids = torch.cat([torch.arange(len(d)) for d in docs]).view(2, 32).cuda()
    labels = input_ids.clone()
    labels[position_ids == 0] = IGNORE_INDEX
    with torch.autocast("cuda", dtype=torch.bfloat16):
        packed, n = lm_loss(model, input_ids, labels, position_ids)
        ref = sum(_plain_loss(model.float(), d[None].cuda(), d[None].cuda()) for d in docs)
    assert n.item() == sum(len(d) - 1 for d in docs)
    assert abs(packed.item() - ref.item()) / ref.item() < 1e-2


@pytest.mark.gpu
@cuda
def test_gpu_chunked_ce_bf16_close_to_fp32_reference() -> None:
    torch.manual_seed(0)
    h = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(32000, 256, device="cuda") * 0.05).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, 32000, (4096,), device="cuda")
    t[::7] = IGNORE_INDEX
    loss = chunked_linear_cross_entropy(h, w, t, 1024)
    loss.backward()
    hr, wr = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = F.cross_entropy(hr @ wr.t(), t, ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    assert abs(loss.item() - ref.item()) / ref.item() < 5e-3
    assert ((h.grad.float() - hr.grad).norm() / hr.grad.norm()).item() < 2e-2
    assert ((w.grad.float() - wr.grad).norm() / wr.grad.norm()).item() < 2e-2


@pytest.mark.slow(reason="the training throughput benchmark script in its own process, sft and cpt")
def test_throughput_benchmark_runs_on_cpu(tmp_path) -> None:
    """benchmarks/train_throughput.py --cpu --tiny: kollm's sft and cpt runs train, report and agree."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--cpu",
            "--tiny",
            "--runs",
            "kollm_sft,kollm_cpt",
            "--steps",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {"kollm_sft", "kollm_cpt"}
    for r in runs.values():
        assert r["error"] is None and r["tokens_per_s"] > 0 and r["real_tokens"] > 0
        assert len(r["losses"]) == 3 and all(4.0 < x < 8.0 for x in r["losses"])  # ln(512) = 6.24 at random init
    assert "kollm_sft" in proc.stdout and "tokens/s" in proc.stdout
