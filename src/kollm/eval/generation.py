"""Generation suites: prompts from JSONL, batched greedy generation, and per-case metrics.

A suite is a JSONL file, one case per line:

    {"prompt": "대한민국의 수도는?", "expected": "서울", "metric": "contains"}
    {"prompt": [{"role": "user", "content": "인사해 주세요"}], "expected": ["안녕하세요", "반갑습니다"]}
    {"id": "date-1", "prompt": "오늘 날짜:", "expected": "\\d{4}-\\d{2}-\\d{2}", "metric": "regex"}

- `prompt`: a string, or a list of chat messages ({role, content}) rendered with the model's chat template.
  String prompts use the chat template too when `chat` is true (auto: when the tokenizer has one).
- `expected`: a string or a list of acceptable strings (for `regex`: patterns).
- `metric` (optional): exact | contains | chrf | regex, or a list; a case without one is scored with the
  step's `metrics` (default: exact, contains, chrf).

Metrics (each the mean over the cases scored with it):
- exact: 1 if the output equals an expected string (after NFC, trimming and collapsing whitespace), else 0.
- contains: 1 if an expected string occurs in the output (same normalization), else 0.
- chrf: sentence chrF (sacrebleu, character 6-grams, beta 2) against the expected strings, 0-100.
- regex: 1 if a pattern matches anywhere in the output (re.search), else 0.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kollm.errors import ConfigError, StepFailed

Metric = Literal["exact", "contains", "chrf", "regex"]
METRICS: tuple[str, ...] = ("exact", "contains", "chrf", "regex")


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class Case(BaseModel):
    """One line of a suite file."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = Field(None, description="A name for the case in the report (default: its line number).")
    prompt: str | list[Message] = Field(..., description="A prompt string or chat messages.")
    expected: str | list[str] = Field(..., description="Acceptable answers (regex: patterns).")
    metric: Metric | list[Metric] | None = Field(
        None, description="How to score this case (default: the step's metrics)."
    )

    @field_validator("expected")
    @classmethod
    def _not_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("needs at least one expected string")
        return v

    def expected_list(self) -> list[str]:
        return [self.expected] if isinstance(self.expected, str) else list(self.expected)

    def metrics(self, default: Sequence[str]) -> list[str]:
        if self.metric is None:
            return list(default)
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)


@dataclass(frozen=True)
class CaseResult:
    id: str
    prompt: str  # as shown to the model (after the chat template)
    expected: list[str]
    output: str
    scores: dict[str, float]


@dataclass
class SuiteResult:
    metrics: dict[str, float]  # metric -> mean over the cases scored with it
    counts: dict[str, int]  # metric -> number of cases scored with it
    cases: list[CaseResult] = field(default_factory=list)


def load_suite(path: Path) -> list[Case]:
    """Read and validate a suite file; every bad line is reported as `file:line: field: problem`."""
    from kollm.config import pydantic_problems

    problems: list[str] = []
    cases: list[Case] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"{path}: the evaluation suite does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save the suite as UTF-8 JSON lines") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path.name}:{n}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        try:
            case = Case.model_validate(raw)
        except ValidationError as e:
            problems.extend(f"{path.name}:{n}: {p}" for p in pydantic_problems(e, model=Case))
            continue
        if case.id is None:
            case = case.model_copy(update={"id": f"line {n}"})
        if "regex" in case.metrics(()):
            for pattern in case.expected_list():
                try:
                    re.compile(pattern)
                except re.error as e:
                    problems.append(f"{path.name}:{n}: expected: invalid regular expression {pattern!r}: {e}")
        cases.append(case)
    if problems:
        raise ConfigError(
            problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else []), source=str(path)
        )
    if not cases:
        raise ConfigError(f"{path}: the evaluation suite has no cases; add JSON lines with prompt and expected")
    return cases


# --- metrics ----------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """NFC, trimmed, whitespace runs collapsed to one space (Korean text is compared composed)."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def score_exact(output: str, expected: Sequence[str]) -> float:
    out = normalize(output)
    return float(any(out == normalize(e) for e in expected))


def score_contains(output: str, expected: Sequence[str]) -> float:
    out = normalize(output)
    return float(any(normalize(e) in out for e in expected))


def score_chrf(output: str, expected: Sequence[str]) -> float:
    import sacrebleu

    return float(
        sacrebleu.sentence_chrf(
            unicodedata.normalize("NFC", output), [unicodedata.normalize("NFC", e) for e in expected]
        ).score
    )


def score_regex(output: str, expected: Sequence[str]) -> float:
    out = unicodedata.normalize("NFC", output)
    return float(any(re.search(p, out) for p in expected))


SCORERS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact": score_exact,
    "contains": score_contains,
    "chrf": score_chrf,
    "regex": score_regex,
}


def score(
    cases: Sequence[Case], prompts: Sequence[str], outputs: Sequence[str], default_metrics: Sequence[str]
) -> SuiteResult:
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    results = []
    for case, prompt, output in zip(cases, prompts, outputs, strict=True):
        scores = {m: SCORERS[m](output, case.expected_list()) for m in case.metrics(default_metrics)}
        for m, s in scores.items():
            sums[m] = sums.get(m, 0.0) + s
            counts[m] = counts.get(m, 0) + 1
        results.append(CaseResult(str(case.id), prompt, case.expected_list(), output, scores))
    return SuiteResult({m: sums[m] / counts[m] for m in sums}, counts, results)


# --- generation -------------------------------------------------------------------------------------------


def render_prompts(tokenizer: Any, cases: Sequence[Case], chat: bool | None) -> tuple[list[str], list[bool]]:
    """The text each case sends to the model and whether it came from the chat template.

    chat=None (auto): string prompts use the chat template when the tokenizer has one.
    """
    use_chat = bool(tokenizer.chat_template) if chat is None else chat
    texts, templated = [], []
    for case in cases:
        if isinstance(case.prompt, list) or use_chat:
            if not tokenizer.chat_template:
                raise StepFailed(
                    f"suite case '{case.id}' needs a chat template, but the model's tokenizer has none",
                    hint="use string prompts with `chat: false`, or a model trained with kollm",
                )
            messages = (
                [m.model_dump() for m in case.prompt]
                if isinstance(case.prompt, list)
                else [{"role": "user", "content": case.prompt}]
            )
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            templated.append(True)
        else:
            texts.append(case.prompt)
            templated.append(False)
    return texts, templated


def _identity(items: Iterable[Any], *, total: int | None = None, description: str = "") -> Iterator[Any]:
    yield from items


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    templated: Sequence[bool] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: Callable[..., Iterator[Any]] = _identity,
) -> list[str]:
    """Greedy continuations of `prompts`, batched with left padding; stops at the model's EOS token(s).

    Chat-templated prompts are tokenized without extra special tokens (the template has them); plain
    prompts get the tokenizer's usual special tokens (as in training). Prompts longer than `max_length`
    keep their last tokens.
    """
    import torch

    templated = templated or [False] * len(prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise StepFailed("the tokenizer has neither a pad nor an EOS token; batched generation needs one")
    encoded = [
        list(tokenizer(p, add_special_tokens=not t)["input_ids"]) for p, t in zip(prompts, templated, strict=True)
    ]
    if max_length:
        encoded = [ids[-max(1, max_length - max_new_tokens) :] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    device = next(model.parameters()).device
    outputs: dict[int, str] = {}
    model.eval()
    for batch in progress(batches, total=len(batches), description="generation"):
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: the prompt ends where generation starts
            n = len(encoded[i])
            ids[row, width - n :] = torch.tensor(encoded[i])
            attention[row, width - n :] = 1
        with torch.no_grad():
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        for i, text in zip(batch, texts, strict=True):
            outputs[i] = text
    return [outputs[i] for i in range(len(prompts))]


def run_suite(
    model: Any,
    tokenizer: Any,
    cases: Sequence[Case],
    *,
    default_metrics: Sequence[str] = ("exact", "contains", "chrf"),
    chat: bool | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: Callable[..., Iterator[Any]] = _identity,
) -> SuiteResult:
    prompts, templated = render_prompts(tokenizer, cases, chat)
    outputs = generate(
        model,
        tokenizer,
        prompts,
        templated=templated,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        max_length=max_length,
        progress=progress,
    )
    return score(cases, prompts, outputs, default_metrics)
