"""Canary analysis: parse "success_rate>=0.95,p95_ms<=2000" and judge one interval of the canary's requests.

The gateway records, for every request the canary served, whether it succeeded (HTTP status < 500 and no
exception) and how long it took (from the request's arrival to the last byte of the response). At the end of
each interval the controller takes those samples and calls `analyse`: every criterion must hold for the
interval to pass. Too few canary requests make the interval *inconclusive* (neither a pass nor a failure).
With a canary judge (kollm.rollout.judging), `judge_win_rate` is the judged share of a sample of the interval's
canary chat requests, each answered again by both arms; an interval with no judged pair is inconclusive for it.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from kollm.errors import ConfigError
from kollm.serve.window import Sample

# A rollout's defaults, in one place (kollm rollout start, kollm deploy, RolloutSpec, the Python client)
DEFAULT_ANALYSIS = "success_rate>=0.95,p95_ms<=2000"
DEFAULT_STEPS = "20,40,60,80"  # canary weights in percent
DEFAULT_PAUSE = "2m"  # how long each step holds its weight before its analysis
DEFAULT_FAILURE_LIMIT = 2  # failed analyses that roll the canary back
DEFAULT_MIN_REQUESTS = 10  # canary requests a window needs to be conclusive

# metric name -> what it means (also the list shown when a name is unknown)
METRICS: dict[str, str] = {
    "success_rate": "fraction of canary requests that succeeded (status < 500), 0..1",
    "error_rate": "fraction of canary requests that failed (status >= 500 or an exception), 0..1",
    "p50_ms": "median canary latency in milliseconds",
    "p95_ms": "95th percentile canary latency in milliseconds",
    "p99_ms": "99th percentile canary latency in milliseconds",
    "mean_ms": "mean canary latency in milliseconds",
    "probe_pass_rate": "fraction of quality-probe prompts whose reply passed (needs --probe)",
    "judge_win_rate": "canary vs stable answers to sampled canary requests, judged pairwise: (wins + ties/2) / pairs, 0..1 (needs --judge-url)",
}
FRACTIONS = ("success_rate", "error_rate", "probe_pass_rate", "judge_win_rate")

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}

_CRITERION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|=>|=<|>|<|=)\s*(\S.*?)\s*$")


@dataclass(frozen=True)
class Criterion:
    """One condition, e.g. p95_ms <= 2000."""

    metric: str
    op: str
    threshold: float

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"


def parse_analysis(text: str) -> list[Criterion]:
    """Parse a comma-separated list of `metric OP number`. Raises ConfigError naming the bad part."""
    if not text or not text.strip():
        raise ConfigError(f'--analysis: empty; give conditions like "{DEFAULT_ANALYSIS}"')
    criteria = []
    for i, part in enumerate(text.split(",")):
        where = f"--analysis: condition {i + 1} ({part.strip()!r})"
        if not part.strip():
            raise ConfigError(f"{where}: empty condition; remove the extra comma")
        m = _CRITERION.match(part)
        if not m:
            raise ConfigError(
                f"{where}: expected METRIC OP NUMBER, e.g. success_rate>=0.95 (OP is one of >=, <=, >, <)"
            )
        metric, op, raw = m.groups()
        if metric not in METRICS:
            close = difflib.get_close_matches(metric, METRICS, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "known metrics: " + ", ".join(METRICS)
            raise ConfigError(f"{where}: unknown metric {metric!r}; {hint}")
        if op not in _OPS:
            fix = {"=>": ">=", "=<": "<="}.get(op)
            hint = f"write {fix}" if fix else "use >=, <=, > or <"
            raise ConfigError(f"{where}: operator {op!r} is not supported; {hint}")
        try:
            threshold = float(raw)
        except ValueError:
            raise ConfigError(f"{where}: threshold {raw!r} is not a number") from None
        if not math.isfinite(threshold):
            raise ConfigError(f"{where}: threshold must be a finite number")
        if metric in FRACTIONS and not 0 <= threshold <= 1:
            raise ConfigError(f"{where}: {metric} is a fraction between 0 and 1 (write 0.95, not 95)")
        if metric.endswith("_ms") and threshold < 0:
            raise ConfigError(f"{where}: a latency threshold cannot be negative")
        criteria.append(Criterion(metric, op, threshold))
    return criteria


@dataclass(frozen=True)
class ProbeResult:
    """The quality probe's outcome for one interval."""

    passed: int
    total: int
    failures: list[str] = field(default_factory=list)

    @property
    def pass_rate(self) -> float:
        return self.passed / self.total if self.total else 0.0


@dataclass(frozen=True)
class JudgeWindow:
    """The canary judge's outcome for one interval: pairs judged (canary answer vs stable answer to one sampled
    request), by outcome, and the judge calls that failed."""

    wins: int = 0
    ties: int = 0
    losses: int = 0
    sampled: int = 0  # requests taken from the window's sample (each answered by both arms)
    seen: int = 0  # canary chat requests in the window the sample was drawn from
    calls: int = 0  # judge calls made
    parse_failures: int = 0
    request_failures: int = 0
    answer_failures: int = 0  # sampled requests an arm did not answer (no pair to judge)

    @property
    def pairs(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float:
        return (self.wins + self.ties / 2) / self.pairs if self.pairs else math.nan


Verdict = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True)
class AnalysisResult:
    """The verdict for one interval, with the measured values and the criteria that failed."""

    verdict: Verdict
    requests: int
    values: dict[str, float]
    failed: list[str]
    reason: str

    def to_json(self) -> dict:
        return {
            "verdict": self.verdict,
            "requests": self.requests,
            "values": self.values,
            "failed": self.failed,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, d: dict) -> "AnalysisResult":
        return cls(d["verdict"], d["requests"], dict(d["values"]), list(d["failed"]), d["reason"])


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure(
    samples: list[Sample], probe: ProbeResult | None = None, judge: JudgeWindow | None = None
) -> dict[str, float]:
    """Every metric in METRICS that can be computed from these samples (and the probe and judge, if any), plus
    the judge's counts (judge_pairs, judge_calls, judge_parse_failures, judge_request_failures) when it ran."""
    values: dict[str, float] = {}
    if samples:
        ok = sum(s.ok for s in samples)
        lat = [s.latency_ms for s in samples]
        values["success_rate"] = ok / len(samples)
        values["error_rate"] = 1 - ok / len(samples)
        values["p50_ms"] = percentile(lat, 50)
        values["p95_ms"] = percentile(lat, 95)
        values["p99_ms"] = percentile(lat, 99)
        values["mean_ms"] = sum(lat) / len(lat)
    if probe is not None:
        values["probe_pass_rate"] = probe.pass_rate
    if judge is not None:
        if judge.pairs:
            values["judge_win_rate"] = judge.win_rate
        values["judge_pairs"] = float(judge.pairs)
        values["judge_calls"] = float(judge.calls)
        values["judge_parse_failures"] = float(judge.parse_failures)
        values["judge_request_failures"] = float(judge.request_failures)
    return {k: round(v, 4) for k, v in values.items()}


def analyse(
    criteria: list[Criterion],
    samples: list[Sample],
    *,
    min_requests: int,
    pending_ms: Sequence[float] = (),
    probe: ProbeResult | None = None,
    judge: JudgeWindow | None = None,
) -> AnalysisResult:
    """Judge one interval.

    `pending_ms`: how long the requests still in flight at the interval's end have been running. One that
    already exceeds the smallest latency limit is counted as a (successful) sample with that latency: a lower
    bound that is already too slow, so a canary that hangs fails instead of never producing a sample. (Such a
    request is counted again when it completes; that only errs towards rolling back.)
    Traffic criteria are judged only on at least `min_requests` samples; with fewer the interval is
    inconclusive, unless the probe (which needs no traffic) already fails. A judge_win_rate criterion with no
    judged pair in the interval (no sampled request, or every verdict failed) makes it inconclusive too."""
    limits = [c.threshold for c in criteria if c.metric.endswith("_ms")]
    if limits:
        samples = [*samples, *(Sample(True, ms) for ms in pending_ms if ms > min(limits))]
    values = measure(samples, probe, judge)
    n = len(samples)
    enough = n >= min_requests
    judged = [c for c in criteria if c.metric in values and (enough or c.metric == "probe_pass_rate")]
    failed = [str(c) for c in judged if not c.holds(values[c.metric])]
    if failed:
        shown = ", ".join(f"{_metric_of(c)}={values[_metric_of(c)]:g} (want {c})" for c in failed)
        return AnalysisResult("fail", n, values, failed, f"failed: {shown}")
    if not enough and any(c.metric != "probe_pass_rate" for c in criteria):
        return AnalysisResult(
            "inconclusive", n, values, [], f"only {n} canary request(s) in the interval; need at least {min_requests}"
        )
    if any(c.metric == "judge_win_rate" for c in criteria) and "judge_win_rate" not in values:
        j = judge or JudgeWindow()
        why = (
            f"{j.parse_failures} unparseable verdict(s), {j.request_failures} failed judge request(s), "
            f"{j.answer_failures} unanswered"
        )
        return AnalysisResult(
            "inconclusive", n, values, [], f"no judged pair among {j.sampled} sampled canary request(s) ({why})"
        )
    return AnalysisResult("pass", n, values, [], "passed: " + ", ".join(str(c) for c in criteria))


def _metric_of(condition: str) -> str:
    return re.split(r"[<>]", condition, maxsplit=1)[0]
