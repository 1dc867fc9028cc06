"""Rollout settings and persisted rollout state (.kollm/rollouts/<name>.json, written atomically)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from kollm.config import pydantic_problems
from kollm.errors import ConfigError, KollmError
from kollm.eval.judge import Rubric, env_key
from kollm.pipeline.step import STRICT
from kollm.rollout.analysis import (
    DEFAULT_ANALYSIS,
    DEFAULT_FAILURE_LIMIT,
    DEFAULT_MIN_REQUESTS,
    DEFAULT_PAUSE,
    DEFAULT_STEPS,
    AnalysisResult,
    parse_analysis,
)

Status = Literal["progressing", "paused", "promoted", "rolled_back", "aborted"]
ACTIVE: tuple[Status, ...] = ("progressing", "paused")


class RolloutConflict(KollmError):
    """The command does not fit the rollout's current status (e.g. resume a rollout that is not paused).
    The admin API answers it with 409; the client raises it again from a 409."""

    exit_code = 1


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


def parse_duration(text: str | float | int, *, what: str = "--pause") -> float:
    """Seconds from '2m', '30s', '1.5h', '500ms' or a bare number of seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        m = _DURATION.match(text)
        if not m:
            raise ConfigError(f"{what}: {text!r} is not a duration; write e.g. 2m, 30s, 500ms or 1h")
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
    if seconds <= 0:
        raise ConfigError(f"{what}: must be longer than 0 seconds")
    return seconds


def parse_steps(text: str) -> list[float]:
    """'20,40,60,80' -> [20.0, 40.0, 60.0, 80.0]; strictly increasing percentages in (0, 100)."""
    out = []
    for part in text.split(","):
        try:
            out.append(float(part.strip().rstrip("%")))
        except ValueError:
            raise ConfigError(
                f"--steps: {part.strip()!r} is not a number; write canary weights in percent, e.g. 20,40,60,80"
            ) from None
    return out


class ProbePrompt(BaseModel):
    model_config = STRICT
    prompt: str = Field(..., min_length=1, description="A user message sent to the canary.")
    expect: str | None = Field(
        None, description="A substring the reply must contain (default: any non-empty reply passes)."
    )


class CanaryJudge(BaseModel):
    """The canary judge: each analysis window, a sample of the canary's chat requests is answered again by both
    arms and the two answers are judged pairwise (both orders) by an OpenAI-compatible judge endpoint; the
    window's `judge_win_rate` is the canary's (wins + ties/2) / judged pairs."""

    model_config = STRICT
    base_url: str = Field(
        ..., min_length=1, description="The judge's OpenAI-compatible endpoint, e.g. http://127.0.0.1:8001/v1."
    )
    model: str = Field(..., min_length=1, description="The judge's model name at base_url.")
    api_key_env: str | None = Field(
        None, description="Environment variable (of the gateway process) holding the judge's API key (none: no key)."
    )
    max_calls: int = Field(
        16,
        ge=2,
        le=1000,
        description="Most judge calls per analysis window; each sampled request costs two (both orders), so a "
        "window samples max_calls // 2 of its canary chat requests.",
    )
    answer_max_tokens: int = Field(
        128, ge=1, le=4096, description="max_tokens of each arm's answer to a sampled request."
    )
    rubric: Rubric | None = Field(None, description="Criteria and instructions (default: the Korean rubric).")
    max_tokens: int = Field(512, gt=0, description="Most tokens of one verdict.")
    max_reason_chars: int = Field(400, gt=0, le=4000, description="Longest reason the verdict schema allows.")
    timeout: float = Field(60.0, gt=0, description="Seconds per judge request.")
    max_retries: int = Field(2, ge=0, le=10, description="Retries of a judge request after a 429, 5xx or timeout.")
    backoff: float = Field(1.0, ge=0, description="Seconds before the first retry; doubled each retry.")

    @property
    def pairs(self) -> int:
        """Sampled requests per window."""
        return self.max_calls // 2

    def api_key(self) -> str | None:
        return env_key(
            self.api_key_env,
            "--judge-key-env: the environment variable {var} is not set in the gateway's process",
            "start `kollm serve` with {var} set, or leave --judge-key-env out",
        )


class RolloutSpec(BaseModel):
    """How a rollout proceeds. The defaults (kollm.rollout.analysis) are `--steps 20,40,60,80 --pause 2m
    --analysis "success_rate>=0.95,p95_ms<=2000" --failure-limit 2`."""

    model_config = STRICT
    steps: list[float] = Field(
        parse_steps(DEFAULT_STEPS), min_length=1, description="Canary weights in percent, one per step, increasing."
    )
    pause_s: float = Field(
        parse_duration(DEFAULT_PAUSE),
        gt=0,
        description="Seconds each step holds its weight; the canary's requests in that window are analysed at its end.",
    )
    analysis: str = Field(
        DEFAULT_ANALYSIS, description='Conditions every window must meet, e.g. "success_rate>=0.95,p95_ms<=2000".'
    )
    failure_limit: int = Field(
        DEFAULT_FAILURE_LIMIT, ge=1, description="Failed analyses (over the whole rollout) that roll the canary back."
    )
    min_requests: int = Field(
        DEFAULT_MIN_REQUESTS,
        ge=1,
        description="Fewer canary requests in a window make it inconclusive: the step is held and re-analysed.",
    )
    alert_webhook: str | None = Field(
        None,
        description="Slack-compatible webhook for rollback/abort/promotion alerts (default: $KOLLM_ALERT_WEBHOOK).",
    )
    probe: list[ProbePrompt] = Field(
        default_factory=list,
        description="Quality probe: prompts sent to the canary every window (metric probe_pass_rate).",
    )
    probe_max_tokens: int = Field(32, ge=1, le=4096, description="max_tokens for each probe prompt.")
    judge: CanaryJudge | None = Field(
        None, description="Canary judge (metric judge_win_rate): sampled canary requests answered by both arms, judged."
    )

    @field_validator("steps")
    @classmethod
    def _steps_increase(cls, v: list[float]) -> list[float]:
        for w in v:
            if not 0 < w <= 100:
                raise ValueError(f"each weight must be between 0 (exclusive) and 100, got {w:g}")
        if any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError("weights must increase from step to step, e.g. 20,40,60,80")
        return v

    @field_validator("analysis")
    @classmethod
    def _analysis_parses(cls, v: str) -> str:
        parse_analysis(v)  # raises ConfigError with the bad part named
        return v

    @model_validator(mode="after")
    def _probe_needed(self) -> "RolloutSpec":
        uses_probe = any(c.metric == "probe_pass_rate" for c in parse_analysis(self.analysis))
        if uses_probe and not self.probe:
            raise ValueError("analysis uses probe_pass_rate but no probe prompts were given (--probe FILE.jsonl)")
        uses_judge = any(c.metric == "judge_win_rate" for c in parse_analysis(self.analysis))
        if uses_judge and self.judge is None:
            raise ValueError("analysis uses judge_win_rate but no judge was given (--judge-url URL --judge-model NAME)")
        return self

    @classmethod
    def build(cls, **values: object) -> "RolloutSpec":
        """Validate, turning any problem into one ConfigError naming the option."""
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            problems = [_as_option(p) for p in pydantic_problems(e, model=cls)]
            raise ConfigError(problems) from None


def _as_option(problem: str) -> str:
    """'pause_s: ...' -> '--pause: ...' (the names users typed)."""
    field_name, sep, rest = problem.partition(":")
    head = field_name.split("[")[0].split(".")[0]
    if head == "judge" and field_name.startswith("judge."):
        sub = field_name[len("judge.") :].split(".")[0]
        names = {
            "base_url": "url",
            "api_key_env": "key-env",
            "max_calls": "calls",
            "answer_max_tokens": "answer-tokens",
        }
        option = "--judge-" + names.get(sub, sub).replace("_", "-")
        return option + field_name[len("judge.") + len(sub) :] + sep + rest
    if head in RolloutSpec.model_fields:
        option = "--" + {"pause_s": "pause", "probe_max_tokens": "probe-max-tokens"}.get(head, head).replace("_", "-")
        return option + field_name[len(head) :] + sep + rest
    return problem


@dataclass
class StepRecord:
    """One analysed window."""

    step: int  # 1-based
    weight: float
    at: float
    result: AnalysisResult
    note: str = ""
    judged: list[dict] = field(default_factory=list)  # the canary judge's pairs: question, answers, outcome, reasons

    def to_json(self) -> dict:
        return {
            "step": self.step,
            "weight": self.weight,
            "at": self.at,
            "result": self.result.to_json(),
            "note": self.note,
            "judged": self.judged,
        }

    @classmethod
    def from_json(cls, d: dict) -> "StepRecord":
        result = AnalysisResult.from_json(d["result"])
        return cls(d["step"], d["weight"], d["at"], result, d.get("note", ""), list(d.get("judged", [])))


@dataclass
class Alert:
    """One alert the rollout sent (or tried to send) to its webhook."""

    at: float
    text: str
    delivered: bool
    error: str | None = None


@dataclass
class RolloutState:
    """Everything needed to resume a rollout after a restart."""

    name: str
    stable_version: str
    canary_version: str
    spec: RolloutSpec
    status: Status = "progressing"
    step: int = 0  # index into spec.steps
    weight: float = 0.0
    failures: int = 0
    message: str = ""
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    window_started_at: float = field(default_factory=time.time)
    ended_at: float | None = None  # when it was promoted, rolled back or aborted (traffic already switched)
    history: list[StepRecord] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def to_json(self) -> dict:
        """As `kollm rollout status --json` and the state file show it: `step` is 1-based like the text output
        ("step 2/4") and like each history entry's `step`; `step_index` is its index into spec.steps."""
        d = asdict(self)
        d["step"], d["step_index"] = self.step + 1, self.step
        d["spec"] = self.spec.model_dump()
        d["history"] = [h.to_json() for h in self.history]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "RolloutState":
        d = dict(d)
        # files written before step_index existed hold the 0-based index in `step`
        d["step"] = d.pop("step_index") if "step_index" in d else d["step"]
        d["spec"] = RolloutSpec.model_validate(d["spec"])
        d["history"] = [StepRecord.from_json(h) for h in d.get("history", [])]
        d["alerts"] = [Alert(**a) for a in d.get("alerts", [])]
        return cls(**d)


class RolloutStore:
    """Rollout state files in one folder, one per registered model name."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        safe = re.sub(r"[^\w.-]", "_", name)
        if safe != name:  # keep names that differ only in odd characters apart
            safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
        return self.folder / f"{safe}.json"

    def load(self, name: str) -> RolloutState | None:
        p = self.path(name)
        if not p.exists():
            return None
        try:
            return RolloutState.from_json(json.loads(p.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, ValidationError) as e:
            raise ConfigError(f"{p}: unreadable rollout state ({e}); move the file away to start over") from None

    def save(self, state: RolloutState) -> None:
        state.updated_at = time.time()
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(state.name)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(state.to_json(), f, ensure_ascii=False, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
