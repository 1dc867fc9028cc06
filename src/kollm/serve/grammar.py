"""JSON-constrained decoding for the native engine (`response_format` json_object / json_schema), with xgrammar.

Public API:
    available()                                whether xgrammar imports (the `json` extra)
    Grammars(tokenizer, vocab_size, stop_ids)  grammars compiled for one tokenizer (xgrammar caches them by schema)
    Grammars.constraint(kind, schema)          a request's constraint; ValueError naming what is wrong with a schema
    Constraint.mask(row)                       sets the logits of every token the grammar refuses now to -inf
    Constraint.accept(token) -> bool           moves past a sampled token (False: the grammar refuses it)
    Constraint.done                            a stop token ended the JSON text

Why xgrammar: it is vLLM's default structured-output backend, so both serving backends constrain the same way;
it reads byte-level BPE and SentencePiece vocabularies from the tokenizer, and its per-token work (a bitmask
of the allowed tokens) is small beside a decode step. json_object is the schema {"type": "object"}: OpenAI's
JSON mode promises an object, not any JSON value.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from typing import Any

import torch

JSON_OBJECT = '{"type": "object"}'


def available() -> bool:
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        return False
    return True


class Constraint:
    """One request's place in its grammar. Used from the engine thread only."""

    def __init__(self, compiled: Any, vocab_size: int):
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        self._bits = xgr.allocate_token_bitmask(1, vocab_size)  # int32 [1, ceil(V / 32)], on the host
        self._shifts = torch.arange(32, dtype=torch.int32)
        self._vocab_size = vocab_size

    def mask(self, row: torch.Tensor) -> None:
        """row: one row of logits [V] (float, on any device), changed in place. The packed bits go to the row's
        device (V / 8 bytes) and are unpacked there."""
        self._matcher.fill_next_token_bitmask(self._bits)
        if self._shifts.device != row.device:
            self._shifts = self._shifts.to(row.device)
        bits = self._bits[0].to(row.device)
        refused = ((bits[:, None] >> self._shifts) & 1).flatten()[: self._vocab_size] == 0
        row.masked_fill_(refused, float("-inf"))

    def accept(self, token: int) -> bool:
        return bool(self._matcher.accept_token(token))

    @property
    def done(self) -> bool:
        return bool(self._matcher.is_terminated())


class Grammars:
    """The grammar compiler of one tokenizer; `constraint` may be called from any thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int]):
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids))
        self._compiler = xgr.GrammarCompiler(info)
        self._vocab_size = vocab_size
        self._lock = threading.Lock()

    def constraint(self, kind: str, schema: str | None) -> Constraint:
        """kind "json_object" or "json_schema" (schema: the JSON schema as text)."""
        text = JSON_OBJECT if kind == "json_object" else schema
        if text is None:
            raise ValueError("type json_schema needs a schema")
        try:
            json.loads(text)
            with self._lock:
                compiled = self._compiler.compile_json_schema(text)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError with its own message
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(e).strip())  # xgrammar's "[time] file.cc:line: "
            raise ValueError(f"the JSON schema cannot constrain the output: {reason}") from None
        return Constraint(compiled, self._vocab_size)
