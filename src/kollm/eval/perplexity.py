"""Perplexity of a causal LM on held-out text.

perplexity = exp(mean negative log-likelihood per target token), in nats, summed over every target token of
every sequence (not averaged per sequence), which is what training loss curves show.

What counts as a target token:
- corpus (`text`): each document is tokenized like continued pretraining does (the tokenizer's BOS when it
  adds one, the text, then EOS); every token but the first is predicted. Documents longer than
  `max_length` are cut into consecutive windows of `max_length` tokens; each window's first token is context only.
- instructions (`messages`): the conversation is rendered with the model's chat template. With
  `targets="assistant"` (the default) only assistant replies and their end-of-turn marker are scored,
  exactly the tokens supervised fine-tuning trains on; with `targets="all"` every token of the rendered text.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kollm.errors import StepFailed

Targets = Literal["assistant", "all"]


@dataclass(frozen=True)
class Encoded:
    """One scored sequence: token ids and, per position, whether that token is predicted (a target)."""

    ids: list[int]
    target: list[bool]


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per target token (nats)
    tokens: int  # target tokens scored
    sequences: int


def encode_corpus(tokenizer: Any, texts: Iterable[str], max_length: int) -> list[Encoded]:
    eos = tokenizer.eos_token_id
    out = []
    for text in texts:
        if not text or not text.strip():
            continue
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        if eos is not None and ids[-1:] != [eos]:
            ids.append(eos)
        for start in range(0, len(ids), max_length):
            window = ids[start : start + max_length]
            if len(window) > 1:
                out.append(Encoded(window, [False] + [True] * (len(window) - 1)))
    return out


def render_chat(tokenizer: Any, messages: list[dict[str, str]], *, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_tokens(
    tokenizer: Any, messages: list[dict[str, str]], *, only_last: bool = False, hint: str
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation rendered with the chat template, and per token whether it belongs to an
    assistant reply (the reply and its end-of-turn marker; with only_last, the last reply only). The one
    definition of what SFT trains on (kollm.train.data.encode_chat) and evaluation scores (encode_chat here).

    Assistant spans are found by rendering the conversation up to each assistant turn (with the generation prompt)
    and up to the end of that turn; this works with any template that renders earlier turns unchanged. A token
    counts when it overlaps a span: a token may join the prompt's trailing space with the reply's first letter.
    """
    text = render_chat(tokenizer, messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or (only_last and i != len(messages) - 1):
            continue
        prefix = render_chat(tokenizer, messages[:i], generation_prompt=True)
        upto = render_chat(tokenizer, messages[: i + 1])
        if not (text.startswith(upto) and upto.startswith(prefix)):
            raise StepFailed(
                "the chat template renders earlier turns differently once later turns are added, so assistant "
                "tokens cannot be located",
                hint=hint,
            )
        spans.append((len(prefix), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    return ids, [any(start < b and end > a for a, b in spans) for start, end in enc["offset_mapping"]]


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], targets: Targets, max_length: int) -> Encoded | None:
    """Render one conversation; mark assistant tokens (or all tokens) as targets. None when nothing is scored."""
    if not tokenizer.chat_template:
        raise StepFailed(
            "the model's tokenizer has no chat template, so instruction data cannot be rendered",
            hint="train the model with kollm (its tokenizers carry a template) or evaluate a corpus dataset instead",
        )
    if targets == "all":
        ids = list(tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"])[:max_length]
        target = [i > 0 for i in range(len(ids))]
    else:
        hint = "set `perplexity_targets: all` in the evaluate step to score the whole rendered conversation"
        ids, mask = assistant_tokens(tokenizer, messages, hint=hint)
        ids = ids[:max_length]
        target = [i > 0 and m for i, m in enumerate(mask[:max_length])]  # token 0 has nothing before it
    return Encoded(ids, target) if any(target) else None


def encode_chats(
    tokenizer: Any, conversations: Iterable[list[dict[str, str]]], targets: Targets, max_length: int
) -> list[Encoded]:
    return [e for conv in conversations if (e := encode_chat(tokenizer, conv, targets, max_length)) is not None]


def _identity(items: Iterable[Any], *, total: int | None = None, description: str = "") -> Iterator[Any]:
    yield from items


def perplexity(
    model: Any,
    sequences: Sequence[Encoded],
    *,
    batch_size: int = 4,
    pad_id: int = 0,
    progress: Callable[..., Iterator[Any]] = _identity,
) -> PerplexityResult:
    """Sum the NLL of every target token (batched, right-padded; padding never attends or is scored)."""
    import torch

    if not sequences:
        raise StepFailed("nothing to score: the held-out split has no rows with target tokens")
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].ids))  # similar lengths share a batch
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    model.eval()
    for batch in progress(batches, total=len(batches), description="perplexity"):
        width = max(len(sequences[i].ids) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        target = torch.zeros((len(batch), width), dtype=torch.bool)
        for row, i in enumerate(batch):
            seq = sequences[i]
            n = len(seq.ids)
            ids[row, :n] = torch.tensor(seq.ids)
            attention[row, :n] = 1
            target[row, :n] = torch.tensor(seq.target)
        ids, attention, target = ids.to(device), attention.to(device), target.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
        # the token at position t is predicted from the logits at t-1
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        token_lp = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        mask = target[:, 1:]
        total_nll -= float(token_lp[mask].double().sum())
        total_tokens += int(mask.sum())
    nll = total_nll / total_tokens
    return PerplexityResult(
        perplexity=math.exp(nll) if nll < 700 else math.inf, nll=nll, tokens=total_tokens, sequences=len(sequences)
    )
