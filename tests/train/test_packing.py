"""Packing: per-document attention and labels, so a packed batch trains exactly like its documents unpacked."""

from __future__ import annotations

import numpy as np
import torch

from kollm.train.data import encode_corpus, pack_examples, pack_stream
from kollm.train.kernels import IGNORE_INDEX, lm_loss


def test_pack_stream_restarts_positions_and_ignores_document_starts(tokenizer, texts):
    docs = encode_corpus(texts(20), tokenizer)
    rows = pack_stream(docs, seq_len=64, pad_id=tokenizer.pad_token_id)
    assert rows.input_ids.shape[1] == 64
    assert rows.stats.tokens == sum(len(d) for d in docs)
    assert rows.stats.rows * 64 - rows.stats.tokens < 64  # only the last row is padded
    # The concatenation of all rows (minus the padding tail) is the concatenation of all documents.
    flat = rows.input_ids.reshape(-1)[: rows.stats.tokens]
    assert np.array_equal(flat, np.concatenate(docs))
    # Every position-0 token has an ignored label; every other real token is its own label.
    starts = rows.position_ids == 0
    assert (rows.labels[starts] == IGNORE_INDEX).all()
    real = np.arange(rows.input_ids.size).reshape(rows.input_ids.shape) < rows.stats.tokens
    inner = real & ~starts
    assert (rows.labels[inner] == rows.input_ids[inner]).all()
    # Document starts fall exactly where documents begin in the stream (plus row starts).
    bounds = set(np.cumsum([0] + [len(d) for d in docs[:-1]]).tolist()) | set(range(0, rows.stats.tokens, 64))
    assert set(np.flatnonzero(starts.reshape(-1)[: rows.stats.tokens]).tolist()) == bounds


def test_pack_examples_never_splits_and_fills_rows(tokenizer, texts):
    rng = np.random.default_rng(0)
    examples = []
    for n in rng.integers(5, 40, size=30):
        ids = rng.integers(10, 300, size=n).astype(np.int32)
        labels = ids.copy()
        labels[: n // 2] = IGNORE_INDEX
        examples.append((ids, labels))
    rows = pack_examples(examples, seq_len=64, pad_id=0)
    assert rows.stats.tokens == sum(len(e[0]) for e in examples)
    assert len(rows) <= -(-rows.stats.tokens // 64) + 2  # close to the minimum number of rows
    segments = []
    for r in range(len(rows)):
        starts = list(np.flatnonzero(rows.position_ids[r] == 0)) + [64]
        for a, b in zip(starts, starts[1:]):
            segments.append(tuple(rows.input_ids[r, a:b]))
    for ids, _ in examples:
        assert tuple(ids) in segments  # each example is one whole segment
    unpacked = pack_examples(examples, seq_len=64, pad_id=0, packing=False)
    assert len(unpacked) == len(examples)


def _per_doc_logits(model, docs):
    with torch.no_grad():
        return [model(input_ids=torch.tensor(d, dtype=torch.long)[None]).logits[0] for d in docs]


def test_no_attention_across_documents(tiny_model, tokenizer, texts):
    """Logits of a packed row equal each document's logits computed alone: nothing attends across documents."""
    docs = encode_corpus(texts(6, seed=3), tokenizer)
    total = sum(len(d) for d in docs)
    rows = pack_stream(docs, seq_len=total, pad_id=tokenizer.pad_token_id)
    assert len(rows) == 1
    ids = torch.tensor(rows.input_ids, dtype=torch.long)
    pos = torch.tensor(rows.position_ids, dtype=torch.long)
    with torch.no_grad():
        # use_cache=False as in training: transformers detects packed position_ids only without a KV cache.
        packed = tiny_model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
        plain = tiny_model(input_ids=ids, use_cache=False).logits[
            0
        ]  # without per-document positions: attention crosses documents
    alone = torch.cat(_per_doc_logits(tiny_model, docs))
    assert torch.allclose(packed, alone, atol=1e-4), (packed - alone).abs().max()
    assert not torch.allclose(plain[len(docs[0]) :], alone[len(docs[0]) :], atol=1e-3)  # the test can fail


def test_packed_loss_equals_unpacked_loss(tiny_model, tokenizer, texts):
    docs = encode_corpus(texts(10, seed=5), tokenizer)
    rows = pack_stream(docs, seq_len=sum(len(d) for d in docs) // 3 + 1, pad_id=tokenizer.pad_token_id)
    assert len(rows) == 3
    ids, labels, pos = (torch.tensor(a, dtype=torch.long) for a in (rows.input_ids, rows.labels, rows.position_ids))
    with torch.no_grad():
        packed_sum, packed_n = lm_loss(tiny_model, ids, labels, pos, None)
    # Unpacked: every segment of every row (documents split at row ends become two segments) alone.
    sums, count = 0.0, 0
    for r in range(len(rows)):
        starts = list(np.flatnonzero(rows.position_ids[r] == 0)) + [rows.input_ids.shape[1]]
        for a, b in zip(starts, starts[1:]):
            seg_ids, seg_labels = ids[r : r + 1, a:b], labels[r : r + 1, a:b]
            with torch.no_grad():
                s, n = lm_loss(tiny_model, seg_ids, seg_labels, None, None)
            sums += float(s)
            count += int(n)
    assert int(packed_n) == count
    assert abs(float(packed_sum) / int(packed_n) - sums / count) < 1e-4
