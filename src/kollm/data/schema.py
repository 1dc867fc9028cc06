"""The three dataset kinds and their schemas; raw rows -> canonical rows, or a rejection reason.

Canonical columns (the agreed dataset format):
- corpus:       `text` (str)
- instructions: `messages` (list of {role: system|user|assistant, content: str}, ending with an assistant turn)
- preferences:  `prompt` (list of messages ending with a user turn), `chosen` (str), `rejected` (str)

Accepted raw shapes:
- corpus: a `text` column (or the column named by `text_field`).
- instructions: `messages` in chat format, or `instruction` / `input` / `output` (and optional `system`),
  which become a system (optional), user and assistant message.
- preferences: `prompt` (a string or a list of messages), `chosen` and `rejected` (a string, an assistant
  message, or a list of messages whose last is the assistant reply). Without `prompt`, the messages that
  `chosen` and `rejected` share before the reply are the prompt (the TRL "implicit prompt" format).

Every transform here is a pure function over pandas batches. A rejected row keeps flowing with its reason
in the `_reject` column; it is set aside (and counted) by the step, never silently lost.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import pandas as pd

Kind = Literal["corpus", "instructions", "preferences"]
KINDS: tuple[str, ...] = ("corpus", "instructions", "preferences")
COLUMNS: dict[str, tuple[str, ...]] = {
    "corpus": ("text",),
    "instructions": ("messages",),
    "preferences": ("prompt", "chosen", "rejected"),
}
ROLES = ("system", "user", "assistant")
REJECT = "_reject"  # reason a row was rejected ("" when it is kept)
SOURCE = "_source"  # the file (or URL) a row came from


class RowError(ValueError):
    """A row breaks the schema; `reason` is a short stable key such as `schema:missing_text`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_list(value: Any) -> list[Any] | None:
    if isinstance(value, np.ndarray):
        return list(value)
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:  # a CSV cell holding JSON
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, list) else None
    return None


def _text(value: Any, field: str) -> str:
    if _is_missing(value):
        raise RowError(f"schema:missing_{field}")
    if not isinstance(value, str):
        raise RowError(f"schema:{field}_not_text")
    if not value.strip():
        raise RowError(f"schema:empty_{field}")
    return value


def _message(value: Any, field: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise RowError(f"schema:{field}_not_messages")
    role = value.get("role", value.get("from"))
    if not isinstance(role, str):  # a list or an object is no role (and unhashable: it must not reach the lookups)
        raise RowError(f"schema:{field}_bad_role")
    role = {"human": "user", "gpt": "assistant", "bot": "assistant"}.get(role, role)
    if role not in ROLES:
        raise RowError(f"schema:{field}_bad_role")
    content = value.get("content", value.get("value"))
    if _is_missing(content) or not isinstance(content, str) or not content.strip():
        raise RowError(f"schema:{field}_empty_content")
    return {"role": role, "content": content}


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    items = _as_list(value)
    if items is None:
        raise RowError(f"schema:missing_{field}" if _is_missing(value) else f"schema:{field}_not_messages")
    if not items:
        raise RowError(f"schema:empty_{field}")
    msgs = [_message(m, field) for m in items]
    if any(m["role"] == "system" for m in msgs[1:]):
        raise RowError(f"schema:{field}_system_not_first")
    return msgs


def _reply(value: Any, field: str) -> str:
    """A preference reply: a string, an assistant message, or messages whose last one is the reply."""
    if isinstance(value, dict):
        value = [value]
    items = _as_list(value)
    if items is None:
        return _text(value, field)
    msgs = _messages(items, field)
    if msgs[-1]["role"] != "assistant":
        raise RowError(f"schema:{field}_not_assistant")
    return msgs[-1]["content"]


def canonical_row(row: dict[str, Any], kind: str, text_field: str = "text") -> dict[str, Any]:
    """One raw row -> its canonical columns. Raises RowError with the reason when it breaks the schema."""
    if kind == "corpus":
        return {"text": _text(row.get(text_field), "text" if text_field == "text" else text_field)}
    if kind == "instructions":
        if not _is_missing(row.get("messages")):
            msgs = _messages(row.get("messages"), "messages")
        elif not _is_missing(row.get("instruction")) or not _is_missing(row.get("output")):
            instruction = _text(row.get("instruction"), "instruction")
            extra = row.get("input")
            user = instruction if _is_missing(extra) or not str(extra).strip() else f"{instruction}\n\n{extra}"
            msgs = [
                {"role": "user", "content": user},
                {"role": "assistant", "content": _text(row.get("output"), "output")},
            ]
            system = row.get("system")
            if isinstance(system, str) and system.strip():
                msgs.insert(0, {"role": "system", "content": system})
        else:
            raise RowError("schema:missing_messages")
        if not any(m["role"] == "user" for m in msgs):
            raise RowError("schema:messages_no_user_turn")
        if msgs[-1]["role"] != "assistant":
            raise RowError("schema:messages_no_assistant_reply")
        return {"messages": msgs}
    if kind == "preferences":
        prompt_raw = row.get("prompt")
        if _is_missing(prompt_raw):
            chosen_l, rejected_l = _as_list(row.get("chosen")), _as_list(row.get("rejected"))
            if chosen_l is None or rejected_l is None:
                raise RowError("schema:missing_prompt")
            c, r = _messages(chosen_l, "chosen"), _messages(rejected_l, "rejected")
            n = 0
            while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
                n += 1
            if n == 0:
                raise RowError("schema:missing_prompt")
            prompt = c[:n]
            chosen, rejected = _reply(c[n:], "chosen"), _reply(r[n:], "rejected")
        else:
            items = _as_list(prompt_raw)
            prompt = (
                _messages(items, "prompt")
                if items is not None
                else [{"role": "user", "content": _text(prompt_raw, "prompt")}]
            )
            chosen, rejected = _reply(row.get("chosen"), "chosen"), _reply(row.get("rejected"), "rejected")
        if prompt[-1]["role"] != "user":
            raise RowError("schema:prompt_not_ending_with_user")
        if chosen.strip() == rejected.strip():
            raise RowError("schema:chosen_equals_rejected")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    raise ValueError(f"unknown dataset kind {kind!r}")


def to_schema_batch(raw: pd.DataFrame, kind: str, text_field: str = "text") -> pd.DataFrame:
    """Raw rows -> canonical columns plus `_reject` (the reason, or "") and `_source`.

    A batch that already has a `_reject` column (e.g. lines that were not valid JSON) keeps those reasons.
    """
    cols = COLUMNS[kind]
    out: dict[str, list[Any]] = {c: [] for c in cols}
    reasons: list[str] = []
    raws: list[str | None] = []
    prior = raw[REJECT].tolist() if REJECT in raw.columns else [""] * len(raw)
    for row, reason in zip(raw.to_dict("records"), prior):
        if reason:
            canon: dict[str, Any] = {c: None for c in cols}
        else:
            try:
                canon = canonical_row(row, kind, text_field)
            except RowError as e:
                canon, reason = {c: None for c in cols}, e.reason
        raws.append(_raw_repr(row) if reason else None)
        for c in cols:
            out[c].append(canon[c])
        reasons.append(reason)
    result = pd.DataFrame(out, index=raw.index)
    result[SOURCE] = raw[SOURCE].tolist() if SOURCE in raw.columns else ""
    result[REJECT] = reasons
    result["_raw"] = raws
    return result


def _raw_repr(row: dict[str, Any]) -> str:
    """A short JSON view of a rejected raw row, for the report."""
    shown = {k: v for k, v in row.items() if not str(k).startswith("_")}
    return json.dumps(shown, ensure_ascii=False, default=str)[:500]


def map_texts(batch: pd.DataFrame, kind: str, fn: Callable[[str], str]) -> pd.DataFrame:
    """Apply a str -> str function to every text of the kept rows of a canonical batch (message contents
    included). Pure: returns a new batch."""
    return map_texts_indexed(batch, kind, lambda _i, text: fn(text))


def map_texts_indexed(batch: pd.DataFrame, kind: str, fn: Callable[[int, str], str]) -> pd.DataFrame:
    """Like `map_texts`, but `fn` also gets the row's position in the batch."""
    out = batch.copy()
    live = [i for i, r in enumerate(out[REJECT]) if not r] if REJECT in out.columns else range(len(out))

    def msgs(i: int, value: Any) -> list[dict[str, str]]:
        return [{"role": m["role"], "content": fn(i, m["content"])} for m in value]

    for col in COLUMNS[kind]:
        values = out[col].tolist()
        for i in live:
            values[i] = msgs(i, values[i]) if col in ("messages", "prompt") else fn(i, values[i])
        out[col] = pd.Series(values, index=out.index, dtype=object)
    return out


def row_texts(batch: pd.DataFrame, kind: str) -> list[list[str]]:
    """Every text of each row (message contents in order). For filters and PII scans."""
    if kind == "corpus":
        return [[t] for t in batch["text"]]
    if kind == "instructions":
        return [[m["content"] for m in v] for v in batch["messages"]]
    return [[m["content"] for m in p] + [c, r] for p, c, r in zip(batch["prompt"], batch["chosen"], batch["rejected"])]


def content_text(batch: pd.DataFrame, kind: str) -> list[str]:
    """One string per row: what quality filters and deduplication look at."""
    return ["\n".join(texts) for texts in row_texts(batch, kind)]


def filter_text(batch: pd.DataFrame, kind: str) -> list[str]:
    """What quality filters look at: every text, except a preference's rejected reply (meant to be worse)."""
    if kind == "preferences":
        return ["\n".join([*(m["content"] for m in p), c]) for p, c in zip(batch["prompt"], batch["chosen"])]
    return content_text(batch, kind)


def split_key_text(batch: pd.DataFrame, kind: str) -> list[str]:
    """What the train/eval split hashes: the text for a corpus, the prompt side otherwise, so rows that share a
    prompt (several answers, several preference pairs) land in the same split and eval prompts never leak."""
    if kind == "corpus":
        return list(batch["text"])
    if kind == "instructions":
        return ["\n".join(m["content"] for m in v if m["role"] != "assistant") or "" for v in batch["messages"]]
    return ["\n".join(m["content"] for m in p) for p in batch["prompt"]]
