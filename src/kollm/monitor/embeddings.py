"""Embedding drift: do served prompts still mean what the training data meant?

Any Hugging Face model folder (a sentence encoder, or the served causal LM itself) embeds a text as the mean of its
last hidden states over the text's tokens, L2-normalised, then projected to DIM dimensions by a fixed random matrix
(seeded by the hidden size, so the server and the drift check project alike; random projections keep distances
roughly, Johnson-Lindenstrauss), which keeps each serving-log line small.

- `kollm serve MODEL --embedding-model PATH` logs each request's prompt embedding (`embedding: {model, vector}` in
  the inference log line), computed in a worker thread once the response is done: a request never waits for it.
- `kollm monitor drift --embedding-model PATH` embeds the reference texts with the same model and compares the two
  samples with a kernel two-sample test: MMD² with an RBF kernel at the median pairwise distance, and a permutation
  p-value. Drift when p < `alpha` (0.01).

Public API:
    Embedder(source, max_length=128)   .embed(texts) -> np.ndarray [n, DIM]
    mmd_test(reference, current, permutations=200, seed=0) -> (mmd2, p_value)
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from kollm.errors import ConfigError

DIM = 32
MAX_SAMPLE = 500  # per side in the two-sample test: the kernel matrix is (2 * MAX_SAMPLE)^2


class Embedder:
    def __init__(self, source: str, *, max_length: int = 128, batch_size: int = 16):
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"--embedding-model {source}: cannot load it ({str(e).splitlines()[0][:200]})",
                hint="give a local Hugging Face model folder (e.g. the served model's) or a cached hub name",
            ) from None
        self.name = source
        self.max_length, self.batch_size = max_length, batch_size
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else (self.tokenizer.eos_token_id or 0)
        )
        hidden = int(self.model.config.hidden_size)
        self.projection = np.random.default_rng(hidden).standard_normal((hidden, DIM)) / np.sqrt(DIM)
        self._lock = threading.Lock()  # one forward at a time (the server's worker threads share the model)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                ids = [
                    self.tokenizer(t, add_special_tokens=False, truncation=True, max_length=self.max_length)[
                        "input_ids"
                    ]
                    or [self.pad_id]
                    for t in texts[start : start + self.batch_size]
                ]
                width = max(len(x) for x in ids)
                batch = torch.tensor([x + [self.pad_id] * (width - len(x)) for x in ids])
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
                hidden = self.model(input_ids=batch, attention_mask=mask).last_hidden_state.float()
                mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
        vectors = np.concatenate(out) @ self.projection if out else np.zeros((0, DIM))
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def mmd_test(
    reference: np.ndarray, current: np.ndarray, *, permutations: int = 200, seed: int = 0
) -> tuple[float, float]:
    """MMD² between two samples (RBF kernel, bandwidth = median pairwise squared distance) and its permutation
    p-value; each side is subsampled to MAX_SAMPLE rows."""
    rng = np.random.default_rng(seed)
    reference, current = (
        x[rng.choice(len(x), MAX_SAMPLE, replace=False)] if len(x) > MAX_SAMPLE else x for x in (reference, current)
    )
    x = np.vstack([reference, current]).astype(np.float64)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    scale = np.median(d2[np.triu_indices(len(x), 1)]) or 1.0
    k = np.exp(-d2 / scale)
    n = len(reference)

    def stat(order: np.ndarray) -> float:
        a, b = order[:n], order[n:]
        return float(k[np.ix_(a, a)].mean() + k[np.ix_(b, b)].mean() - 2 * k[np.ix_(a, b)].mean())

    observed = stat(np.arange(len(x)))
    at_least = sum(stat(rng.permutation(len(x))) >= observed for _ in range(permutations))
    return observed, (at_least + 1) / (permutations + 1)
