"""Per-request features of served traffic, and the same features of training data, for drift detection.

kollm serve writes `features` into each line of `.kollm/logs/inference/inference.jsonl` (the router's
generation log); `kollm monitor drift` computes the same text features over the prepared training data and
compares the two distributions (kollm.monitor.drift).

Features of the prompt text (what users send; for a chat, the system and user messages):
    prompt_chars        characters
    hangul_ratio        Hangul letters / letters (kollm.data.korean.hangul_ratio)
    pii_hits            PII values found (resident registration, phone, card, account numbers, e-mail)
    unknown_char_rate   share of characters outside Hangul, ASCII, and common CJK / general punctuation:
                        text the model was likely not trained on (other scripts, emoji, symbols)
Served-only features (no training-side counterpart unless a tokenizer is given to the drift check):
    prompt_tokens, output_tokens
    tokens_per_char     prompt tokens / prompt characters: rises when text fits the tokenizer's vocabulary
                        worse (the byte-level BPE that kollm trains has no unknown token; this is its analogue)
    output_perplexity   exp(mean negative log-likelihood of the generated tokens under the served model's raw
                        distribution), from kollm's native engine (one logsumexp per decoded token); rises when
                        the model answers outside what it learned. Absent where the backend does not give it (vLLM)

Public API:
    TEXT_FEATURES                           names of the features both sides have
    text_features(text) -> dict             the text features of one text
    request_features(body, prompt_tokens, output_tokens) -> dict   what the serving log records
    prompt_text(body) -> str                the prompt side of an OpenAI request body
    reference_texts(frame, kind) -> list[str]   the prompt-side texts of prepared rows (corpus/instructions/preferences)
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from kollm.serve.protocol import ChatCompletionRequest, CompletionRequest

TEXT_FEATURES = ("prompt_chars", "hangul_ratio", "pii_hits", "unknown_char_rate")
# Hangul (syllables, jamo, compatibility jamo), ASCII, Latin-1 punctuation, general punctuation, CJK symbols and
# punctuation, full-width forms: everything else counts as unknown.
_KNOWN = re.compile(
    r"[\u0000-\u007f\u00a0-\u00bf\u00d7\u00f7\u1100-\u11ff\u2000-\u206f\u3000-\u303f\u3130-\u318f\ua960-\ua97f"
    r"\uac00-\ud7af\ud7b0-\ud7ff\uff00-\uffef]"
)


def text_features(text: str) -> dict[str, float]:
    from kollm.data.korean import hangul_ratio
    from kollm.data.pii import scan_text

    chars = len(text)
    unknown = chars - len(_KNOWN.findall(text))
    return {
        "prompt_chars": float(chars),
        "hangul_ratio": round(hangul_ratio(text), 4),
        "pii_hits": float(sum(scan_text(text, frozenset()).found.values())),
        "unknown_char_rate": round(unknown / chars, 4) if chars else 0.0,
    }


def prompt_text(body: ChatCompletionRequest | CompletionRequest) -> str:
    """A chat's system/user/developer messages, or a completion's text prompt(s), joined by newlines (prompts given
    as token ids have no text here: they count as empty)."""
    from kollm.serve.protocol import ChatCompletionRequest

    if isinstance(body, ChatCompletionRequest):
        return "\n".join(m.text() for m in body.messages if m.role != "assistant")
    return "\n".join(p for p in body.prompts() if isinstance(p, str))


def request_features(
    body: ChatCompletionRequest | CompletionRequest,
    prompt_tokens: int,
    output_tokens: int,
    output_nll: float | None = None,
) -> dict[str, float]:
    """The features kollm serve logs for one request (see the module docstring)."""
    features = text_features(prompt_text(body))
    features["prompt_tokens"] = float(prompt_tokens)
    features["output_tokens"] = float(output_tokens)
    features["tokens_per_char"] = (
        round(prompt_tokens / features["prompt_chars"], 4) if features["prompt_chars"] else 0.0
    )
    if output_nll is not None and output_tokens:
        features["output_perplexity"] = round(math.exp(min(output_nll / output_tokens, 100.0)), 4)
    return features


def reference_texts(frame: pd.DataFrame, kind: str) -> list[str]:
    """The prompt side of prepared rows, comparable to `prompt_text` of a request: a corpus row's text, an
    instruction's non-assistant messages, a preference pair's prompt messages."""
    if kind == "corpus":
        return [str(t) for t in frame["text"]]
    column = "messages" if kind == "instructions" else "prompt"
    return ["\n".join(str(m["content"]) for m in messages if m["role"] != "assistant") for messages in frame[column]]
