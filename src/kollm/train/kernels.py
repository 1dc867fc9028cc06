"""The hot path of training: forward pass and loss for a packed causal-LM batch.

This is the seam between the training loop (kollm.train.loop, which calls `lm_loss`) and the
performance work. What is here:

- Per-document attention for packed rows. On CUDA, `attention_implementation` returns
  `"kollm_varlen"`, an attention function registered with transformers that runs FlashAttention's
  variable-length kernel (torch.nn.attention.varlen, shipped inside PyTorch) over the documents of
  the packed batch: no padding, no dense [T, T] mask, and no attention across document borders.
  Elsewhere it returns `"sdpa"`, where transformers builds the block-diagonal causal mask from the
  `position_ids` (which restart at 0 at each document).
- A chunked linear cross-entropy: the vocabulary projection and the loss are computed a chunk of
  tokens at a time, and the gradients of both are computed in the same pass (as Liger's fused
  linear cross-entropy does), so the [tokens, vocab] logits are never materialized in full.
- `compile_model`: compiles each decoder layer in place with torch.compile (one graph reused by
  every layer).

Keep the signature of `lm_loss` stable; new arguments are optional keywords.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from functools import cache
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

IGNORE_INDEX = -100
VARLEN_ATTENTION = "kollm_varlen"
DEFAULT_CHUNK_TOKENS = 8192


class CausalLM(Protocol):
    """The transformers methods kollm's training calls on its model: a PreTrainedModel, or a peft model that
    forwards them to the one it wraps. nn.Module's `__getattr__` types every such attribute `Tensor | Module`,
    so the training code, which passes the model around as an nn.Module, calls them through `causal_lm(model)`."""

    config: Any  # a transformers PretrainedConfig

    def get_decoder(self) -> nn.Module: ...

    def get_input_embeddings(self) -> nn.Module: ...

    def get_output_embeddings(self) -> nn.Module: ...

    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Module: ...

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor: ...

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None: ...


def causal_lm(model: nn.Module) -> CausalLM:
    """`model` (a transformers causal LM, or a peft model wrapping one) seen as the CausalLM it is."""
    return cast(CausalLM, model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The layers of the model's decoder (`model.model.layers` in a Llama-like causal LM)."""
    layers = causal_lm(model).get_decoder().layers
    assert isinstance(layers, nn.ModuleList), f"the decoder's layers are a {type(layers).__name__}, not a ModuleList"
    return layers


# --------------------------------------------------------------------------------------------
# Attention over the documents of a packed batch
# --------------------------------------------------------------------------------------------


def _find_varlen() -> tuple[Callable, frozenset[str]] | None:
    """PyTorch's FlashAttention varlen entry point and the keyword names it takes (they changed between releases)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


# Resolved once at import, so that compiled code sees constants.
_VARLEN = _find_varlen()


def attention_implementation(device: torch.device | str) -> str:
    """The `attn_implementation` to load models with for training on `device`."""
    if torch.device(device).type == "cuda" and _VARLEN is not None:
        return VARLEN_ATTENTION
    return "sdpa"


def document_boundaries(position_ids: torch.Tensor) -> torch.Tensor:
    """`cu_seqlens` (int32, [n_docs + 1]): where the documents of a packed [B, T] batch start, flattened.

    A document starts where the position does not continue the previous one, and at every row start.
    """
    pos = position_ids.reshape(position_ids.shape[0], -1)
    b, t = pos.shape
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    idx = torch.nonzero(starts.reshape(-1)).flatten()
    return torch.cat([idx, idx.new_tensor([b * t])]).to(torch.int32)


def _flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int, scale: float | None
) -> torch.Tensor:
    """Causal attention within each [cu[i], cu[i+1]) span. q: [N, Hq, D], k/v: [N, Hkv, D] -> [N, Hq, D]."""
    assert _VARLEN is not None
    varlen_attn, params = _VARLEN
    kwargs: dict = {"scale": scale}
    if "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        kwargs["window_size"] = (-1, 0)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def _masked_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """Reference path (CPU): the same per-document causal attention through SDPA with a block-diagonal mask."""
    n = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=q.device), (cu[1:] - cu[:-1]).to(q.device).long())
    i = torch.arange(n, device=q.device)
    mask = (doc[:, None] == doc[None, :]) & (i[:, None] >= i[None, :])
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [B, Hq, T, D], key/value [B, Hkv, T, D] -> [B, T, Hq, D].

    The documents come as `cu_seq_lens_q`/`max_length_q` (the FlashAttention keyword names transformers
    passes through the model); without them each row is one causal sequence.
    """
    if dropout:
        raise ValueError("kollm_varlen attention has no dropout; set attention_dropout to 0")
    b, hq, t, d = query.shape
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(
            query, key, value, is_causal=True, scale=scaling, enable_gqa=hq != key.shape[1]
        )
        return out.transpose(1, 2), None
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    if not q.is_cuda:
        return _masked_sdpa(q, k, v, cu_seq_lens_q, scaling).reshape(b, t, hq, d), None
    # FlashAttention takes 16-bit inputs only. Under autocast the rotary embedding leaves q and k in fp32
    # (its cos/sin follow the fp32 residual stream); run in the autocast dtype, like SDPA does under autocast.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else value.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        dtype = torch.bfloat16
    out = _flash_varlen(q.to(dtype), k.to(dtype), v.to(dtype), cu_seq_lens_q, int(max_length_q or t), scaling)
    return out.reshape(b, t, hq, d), None


AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)


# --------------------------------------------------------------------------------------------
# Chunked linear cross-entropy
# --------------------------------------------------------------------------------------------


def _ce_chunk(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of one chunk and its gradient w.r.t. the logits (in the logits' dtype)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = targets != IGNORE_INDEX
    t = torch.where(valid, targets, 0)
    lse = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(1, t[:, None]).squeeze(1)
    loss = torch.where(valid, lse - target_logit, 0.0).sum()
    p = torch.exp(x - lse[:, None])
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == t[:, None]
    grad = torch.where(hit, p - 1.0, p) * valid[:, None]
    return loss, grad.to(logits.dtype)


@cache
def _compiled_ce_chunk() -> Callable:
    return torch.compile(_ce_chunk, dynamic=False)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i), with the gradients computed chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        ce = _compiled_ce_chunk() if hidden.is_cuda else _ce_chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(hidden.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            logits = h @ weight.t()
            chunk_loss, g = ce(logits, targets[start : start + chunk])
            loss += chunk_loss
            if grad_h is not None:  # need_h
                torch.mm(g, weight, out=grad_h[start : start + chunk])
            if grad_w is not None:  # need_w
                grad_w += (g.t() @ h).to(acc)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_out.to(grad_w.dtype)
        return grad_h, grad_w, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Summed next-token cross-entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX skipped).

    `hidden`: [N, d], `weight`: [V, d], `targets`: [N]. Never holds more than `chunk_tokens` x V logits.
    """
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_tokens)


# --------------------------------------------------------------------------------------------
# The seam the training loop calls
# --------------------------------------------------------------------------------------------


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of tokens that carry loss.

    `input_ids`, `labels`, `position_ids`: [B, T]. `labels` are already aligned with `input_ids`
    (the shift happens here) and hold IGNORE_INDEX where no loss is wanted (prompt tokens,
    padding, document boundaries). In a packed row, `position_ids` restart at 0 at each document,
    which makes attention per-document. Returns (loss_sum, n_tokens): divide by n_tokens summed
    over gradient-accumulation micro-batches for an exact token-mean loss.

    Optional: `cu_seqlens` (int32 [n_docs + 1], offsets into the flattened batch), when the data
    loader already knows the document lengths; otherwise they are derived from `position_ids` (a
    device-to-host sync). `max_seqlen` is accepted for callers that have it; the row length is used. `chunk_tokens`: tokens per chunk of the loss (default DEFAULT_CHUNK_TOKENS).
    """
    lm = causal_lm(model)
    decoder = lm.get_decoder()
    kwargs: dict = {}
    if lm.config._attn_implementation == VARLEN_ATTENTION and attention_mask is None:
        if cu_seqlens is None:
            if position_ids is None:
                b, t = input_ids.shape
                cu_seqlens = torch.arange(0, b * t + 1, t, dtype=torch.int32, device=input_ids.device)
            else:
                cu_seqlens = document_boundaries(position_ids)
        cu_seqlens = cu_seqlens.to(input_ids.device, non_blocking=True)
        # The number of documents changes every batch: tell the compiler up front (no recompilation).
        torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
        # The row length bounds every document; a constant keeps compiled graphs static (FlashAttention's
        # blocks past a document's end return at once, so the bound costs next to nothing).
        kwargs = {
            "cu_seq_lens_q": cu_seqlens,
            "cu_seq_lens_k": cu_seqlens,
            "max_length_q": input_ids.shape[1],
            "max_length_k": input_ids.shape[1],
        }
    hidden = decoder(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False, **kwargs
    ).last_hidden_state
    # Shift by moving the targets left: position i predicts labels[i + 1]; the last position predicts nothing.
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1).reshape(-1)
    n_tokens = (targets != IGNORE_INDEX).sum()
    head = lm.get_output_embeddings()
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if type(head) is nn.Linear and head.bias is None:
        dtype = _compute_dtype(hidden.device, head.weight.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            loss_sum = chunked_linear_cross_entropy(
                hidden.to(dtype), head.weight.to(dtype), targets, chunk_tokens or DEFAULT_CHUNK_TOKENS
            )
        return loss_sum, n_tokens
    # Anything else in the head (an adapter, a bias): the plain path.
    logits = head(hidden).float()
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, n_tokens


def compile_model(
    model: nn.Module, *, per_layer: bool = False, activation_memory_budget: float | None = None
) -> nn.Module:
    """Compile the decoder in place with torch.compile; returns the same model.

    The whole decoder becomes one graph (forward) and one (backward): a 0.35B model runs kernels of
    tens of microseconds, and per-layer graphs leave the GPU waiting on Python. `per_layer=True`
    compiles each layer instead (faster to compile, one graph reused by every layer). Either way
    `lm_loss`'s chunked loss stays outside, and so does the boundary computation.
    `activation_memory_budget` (0..1): the fraction of activations kept for the backward pass; the
    compiler recomputes the cheapest rest (torch._functorch's memory-budget partitioner).
    """
    if activation_memory_budget is not None:
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = activation_memory_budget
    if per_layer:  # each layer's forward, not its __call__: hooks around it (FSDP's gathers) stay outside the graph
        for layer in decoder_layers(model):
            layer.forward = torch.compile(layer.forward)
    else:
        causal_lm(model).get_decoder().compile()
    return model
