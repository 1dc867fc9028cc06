"""The hot path of training: forward pass and loss for a packed causal-LM batch.

This is the seam between the training loop (kollm.train.loop, which calls `lm_loss`) and the
performance work (fused/chunked linear cross-entropy, attention kernels for packed documents,
torch.compile). Keep the signature stable; make the inside fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def attention_implementation(device: torch.device | str) -> str:
    """The `attn_implementation` to load models with for training on `device`."""
    return "sdpa"


def lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the number of tokens that carry loss.

    `input_ids`, `labels`, `position_ids`: [B, T]. `labels` are already aligned with `input_ids`
    (the shift happens here) and hold IGNORE_INDEX where no loss is wanted (prompt tokens,
    padding, document boundaries). In a packed row, `position_ids` restart at 0 at each document,
    which makes attention per-document. Returns (loss_sum, n_tokens): divide by n_tokens summed
    over gradient-accumulation micro-batches for an exact token-mean loss.
    """
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
    logits = out.logits[:, :-1, :].float()
    targets = labels[:, 1:]
    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    n_tokens = (targets != IGNORE_INDEX).sum()
    return loss_sum, n_tokens
