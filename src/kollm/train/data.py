"""Tokenization and packing: dataset artifacts -> fixed-length rows the training loop eats without padding waste.

A packed row holds several documents back to back. `position_ids` restart at 0 at every document, which makes
attention per-document (transformers builds a block-diagonal causal mask from them when `attention_mask` is None),
and `labels` hold IGNORE_INDEX at every document start, so no token learns to predict across a boundary.
Labels are aligned with `input_ids`; the shift happens in `kollm.train.kernels.lm_loss`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from kollm.errors import StepFailed
from kollm.eval.perplexity import assistant_tokens, render_chat
from kollm.train.kernels import IGNORE_INDEX


@dataclass
class PackStats:
    documents: int  # documents (or conversations) that went into the rows
    tokens: int  # real tokens in the rows
    loss_tokens: int  # tokens that carry loss
    rows: int
    seq_len: int
    truncated: int = 0  # examples cut to fit seq_len
    dropped: int = 0  # examples left with no loss tokens

    @property
    def fill(self) -> float:
        """Fraction of row slots holding real tokens (1.0 = no padding)."""
        return self.tokens / max(1, self.rows * self.seq_len)


@dataclass
class PackedRows:
    """[N, T] int arrays; one training example per row."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    stats: PackStats

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class RowDataset(torch.utils.data.Dataset):
    def __init__(self, rows: PackedRows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self.rows
        return {
            "input_ids": torch.from_numpy(r.input_ids[i].astype(np.int64)),
            "labels": torch.from_numpy(r.labels[i].astype(np.int64)),
            "position_ids": torch.from_numpy(r.position_ids[i].astype(np.int64)),
        }


def read_split(artifact_path: Path, split: str, column: str) -> list[Any]:
    """One column of `train.parquet` / `eval.parquet` of a dataset artifact."""
    file = Path(artifact_path) / f"{split}.parquet"
    if not file.exists():
        raise StepFailed(f"dataset artifact {artifact_path} has no {split}.parquet")
    df = pd.read_parquet(file)
    if len(df) and column not in df.columns:
        raise StepFailed(
            f"{file} has no '{column}' column (columns: {', '.join(df.columns)}); is it the right dataset type?"
        )
    return df[column].tolist() if len(df) else []


def read_preferences(artifact_path: Path, split: str) -> list[dict[str, Any]]:
    file = Path(artifact_path) / f"{split}.parquet"
    if not file.exists():
        raise StepFailed(f"dataset artifact {artifact_path} has no {split}.parquet")
    df = pd.read_parquet(file)
    missing = {"prompt", "chosen", "rejected"} - set(df.columns)
    if len(df) and missing:
        raise StepFailed(f"{file} lacks preference columns {sorted(missing)}; align needs a `preferences` dataset")
    return [
        {"prompt": _messages(p), "chosen": str(c), "rejected": str(r)}
        for p, c, r in zip(df.get("prompt", []), df.get("chosen", []), df.get("rejected", []), strict=True)
    ]


def _messages(value: Any) -> list[dict[str, str]]:
    """Parquet gives lists of structs back as numpy arrays of dicts; make plain lists of {role, content}."""
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


# ---------------------------------------------------------------- corpus (cpt)


def encode_corpus(texts: Sequence[str], tokenizer: Any, batch_size: int = 1000) -> list[np.ndarray]:
    """Token ids per document (the tokenizer's BOS when it adds one, then the text, then EOS)."""
    eos = tokenizer.eos_token_id
    docs = []
    for start in range(0, len(texts), batch_size):
        batch = [t for t in texts[start : start + batch_size] if t and t.strip()]
        if not batch:
            continue
        for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            if eos is not None and (not ids or ids[-1] != eos):
                ids = [*ids, eos]
            docs.append(np.asarray(ids, dtype=np.int32))
    return docs


def pack_stream(docs: Sequence[np.ndarray], seq_len: int, pad_id: int) -> PackedRows:
    """Concatenate documents into rows of exactly `seq_len` tokens; a document that does not fit continues in
    the next row as a new segment (positions restart, its first token carries no loss). Only the last row is padded."""
    total = sum(len(d) for d in docs)
    n_rows = max(1, -(-total // seq_len))
    ids = np.full((n_rows, seq_len), pad_id, dtype=np.int32)
    labels = np.full((n_rows, seq_len), IGNORE_INDEX, dtype=np.int32)
    pos = np.zeros((n_rows, seq_len), dtype=np.int32)
    row, col = 0, 0
    for doc in docs:
        off = 0
        while off < len(doc):
            take = min(len(doc) - off, seq_len - col)
            piece = doc[off : off + take]
            ids[row, col : col + take] = piece
            labels[row, col : col + take] = piece
            labels[row, col] = IGNORE_INDEX
            pos[row, col : col + take] = np.arange(take)
            off += take
            col += take
            if col == seq_len:
                row, col = row + 1, 0
    if col:  # the padding tail of the last row is its own segment
        pos[row, col:] = np.arange(seq_len - col)
    loss_tokens = int((labels != IGNORE_INDEX).sum())
    return PackedRows(
        ids,
        labels,
        pos,
        PackStats(documents=len(docs), tokens=total, loss_tokens=loss_tokens, rows=n_rows, seq_len=seq_len),
    )


# ---------------------------------------------------------------- chat (sft, align)


def render(tokenizer: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
    return render_chat(tokenizer, messages, generation_prompt=add_generation_prompt)


def encode_chat(
    tokenizer: Any, messages: list[dict[str, str]], *, only_last: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation rendered with the chat template, and labels that keep only assistant tokens
    (kollm.eval.perplexity.assistant_tokens: the same tokens evaluation scores); everything else is IGNORE_INDEX."""
    hint = "set config.chat_template to a template that renders turns independently"
    ids, mask = assistant_tokens(tokenizer, messages, only_last=only_last, hint=hint)
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def encode_chats(
    tokenizer: Any, conversations: Sequence[Any], seq_len: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int, int]:
    """Encoded conversations (truncated to `seq_len`), plus counts of truncated and dropped (no loss left) ones."""
    out, truncated, dropped = [], 0, 0
    for conv in conversations:
        ids, labels = encode_chat(tokenizer, _messages(conv))
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += 1
        labels[0] = IGNORE_INDEX
        if all(t == IGNORE_INDEX for t in labels[1:]):
            dropped += 1
            continue
        out.append((np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)))
    return out, truncated, dropped


def pack_examples(
    examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int, *, packing: bool = True
) -> PackedRows:
    """Whole examples into rows of `seq_len` (best-fit decreasing; an example is never split). With
    `packing=False` each example gets its own padded row."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, bin index)
    for i in order:
        n = len(examples[i][0])
        k = bisect.bisect_left(free, (n, -1)) if packing else len(free)
        if k < len(free):
            cap, b = free.pop(k)
            bins[b].append(i)
            if cap - n > 0:
                bisect.insort(free, (cap - n, b))
        else:
            bins.append([i])
            if seq_len - n > 0 and packing:
                bisect.insort(free, (seq_len - n, len(bins) - 1))
    n_rows = max(1, len(bins))
    ids = np.full((n_rows, seq_len), pad_id, dtype=np.int32)
    labels = np.full((n_rows, seq_len), IGNORE_INDEX, dtype=np.int32)
    pos = np.zeros((n_rows, seq_len), dtype=np.int32)
    tokens = 0
    for r, members in enumerate(bins):
        col = 0
        for i in members:
            e_ids, e_labels = examples[i]
            n = len(e_ids)
            ids[r, col : col + n] = e_ids
            labels[r, col : col + n] = e_labels
            labels[r, col] = IGNORE_INDEX
            pos[r, col : col + n] = np.arange(n)
            col += n
        tokens += col
        pos[r, col:] = np.arange(seq_len - col)
    stats = PackStats(
        documents=len(examples),
        tokens=tokens,
        loss_tokens=int((labels != IGNORE_INDEX).sum()),
        rows=n_rows,
        seq_len=seq_len,
    )
    return PackedRows(ids, labels, pos, stats)


# ---------------------------------------------------------------- preferences (align)


@dataclass
class PreferencePair:
    chosen_ids: np.ndarray
    chosen_labels: np.ndarray  # only the chosen reply's tokens carry labels
    rejected_ids: np.ndarray
    rejected_labels: np.ndarray


def encode_preferences(
    tokenizer: Any, records: Sequence[dict[str, Any]], max_len: int
) -> tuple[list[PreferencePair], int]:
    """prompt + chosen and prompt + rejected, rendered with the chat template; labels on the reply only.
    Over-long pairs keep the end of the prompt and the start of the reply. Returns pairs and the dropped count."""
    pairs, dropped = [], 0
    for rec in records:
        sides = []
        for reply in (rec["chosen"], rec["rejected"]):
            ids, labels = encode_chat(
                tokenizer, [*rec["prompt"], {"role": "assistant", "content": reply}], only_last=True
            )
            ids, labels = _fit(ids, labels, max_len)
            sides.append((ids, labels))
        if any(all(t == IGNORE_INDEX for t in lab) for _, lab in sides):
            dropped += 1
            continue
        (ci, cl), (ri, rl) = sides
        pairs.append(PreferencePair(*(np.asarray(x, dtype=np.int32) for x in (ci, cl, ri, rl))))
    return pairs, dropped


def _fit(ids: list[int], labels: list[int], max_len: int) -> tuple[list[int], list[int]]:
    if len(ids) <= max_len:
        return ids, labels
    first_reply = next((k for k, t in enumerate(labels) if t != IGNORE_INDEX), len(ids))
    keep_prompt = min(first_reply, max_len // 2)
    start = first_reply - keep_prompt
    return ids[start : start + max_len], labels[start : start + max_len]


class PreferenceDataset(torch.utils.data.Dataset):
    """Preference pairs plus (once computed) the reference model's log-probabilities per side.

    With `kl=True` (KTO) item i also carries a mismatched sequence: the prompt of pair i with the chosen reply
    of pair i+1, used to estimate the KL reference point."""

    def __init__(self, pairs: list[PreferencePair], *, kl: bool = False):
        self.pairs = pairs
        self.kl = kl
        self.ref_chosen: torch.Tensor | None = None
        self.ref_rejected: torch.Tensor | None = None
        self.ref_kl: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"pair": self.pairs[i], "index": i}
        if self.kl:
            item["kl"] = mismatched(self.pairs[i], self.pairs[(i + 1) % len(self.pairs)])
        if self.ref_chosen is not None and self.ref_rejected is not None:
            item["ref_chosen"] = self.ref_chosen[i]
            item["ref_rejected"] = self.ref_rejected[i]
            if self.ref_kl is not None:
                item["ref_kl"] = self.ref_kl[i]
        return item


def mismatched(pair: PreferencePair, other: PreferencePair) -> tuple[np.ndarray, np.ndarray]:
    """The prompt of `pair` followed by the chosen reply of `other` (ids, labels on the reply)."""
    prompt_len = int(np.argmax(pair.chosen_labels != IGNORE_INDEX))
    start = int(np.argmax(other.chosen_labels != IGNORE_INDEX))
    ids = np.concatenate([pair.chosen_ids[:prompt_len], other.chosen_ids[start:]])
    labels = np.concatenate([np.full(prompt_len, IGNORE_INDEX, dtype=np.int32), other.chosen_labels[start:]])
    return ids, labels


def _pad(seqs: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    for r, (s_ids, s_labels) in enumerate(seqs):
        ids[r, : len(s_ids)] = torch.from_numpy(s_ids.astype(np.int64))
        labels[r, : len(s_labels)] = torch.from_numpy(s_labels.astype(np.int64))
    return ids, labels


def collate_preferences(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """[2B, T] right-padded rows: the B chosen sequences, then the B rejected ones. Right padding needs no
    attention mask for a causal model (real tokens never attend to later positions)."""
    seqs = [(it["pair"].chosen_ids, it["pair"].chosen_labels) for it in items]
    seqs += [(it["pair"].rejected_ids, it["pair"].rejected_labels) for it in items]
    ids, labels = _pad(seqs, pad_id)
    batch = {"input_ids": ids, "labels": labels, "index": torch.tensor([it["index"] for it in items])}
    if "kl" in items[0]:
        batch["kl_input_ids"], batch["kl_labels"] = _pad([it["kl"] for it in items], pad_id)
    for key in ("ref_chosen", "ref_rejected", "ref_kl"):
        if key in items[0]:
            batch[key] = torch.stack([it[key] for it in items])
    return batch


# ---------------------------------------------------------------- sampling


class ResumableSampler(torch.utils.data.Sampler[int]):
    """A seeded permutation per epoch, starting `offset` items in (to resume mid-epoch), sharded across ranks.

    Every rank gets the same number of items (the permutation is cut to a multiple of world_size)."""

    def __init__(
        self, n: int, *, seed: int, epoch: int, offset: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True
    ):
        self.n, self.seed, self.epoch, self.offset, self.rank, self.world, self.shuffle = (
            n,
            seed,
            epoch,
            offset,
            rank,
            world,
            shuffle,
        )

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
        else:
            perm = list(range(self.n))
        usable = (self.n // self.world) * self.world
        return perm[:usable]

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        yield from order[self.offset * self.world + self.rank :: self.world]

    def __len__(self) -> int:
        return max(0, self.n // self.world - self.offset)
