"""The quality gate: rules over evaluation metrics, absolute or relative to a registered model alias.

A rule is one readable line, `METRIC OP BOUND`:

    perplexity <= 40                 absolute threshold
    contains >= 0.85
    perplexity <= champion           relative: no worse than the current champion on the same eval set
    chrf >= champion + 1.0           relative with a margin: beat the champion by at least 1 chrF point
    perplexity <= champion * 0.98    relative with a factor: at least 2 % lower perplexity

OP is one of <=, <, >=, >. BOUND is a number, or a registered-model alias (champion, or any alias)
optionally followed by `+ N`, `- N` or `* N`. A relative rule is skipped (and says so) while the alias
does not exist yet, e.g. before the first promotion; set `require_champion: true` to fail instead.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

_RULE = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][\w.\-]*)\s*(?P<op><=|>=|<|>)\s*"
    r"(?:(?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<alias>[A-Za-z_][\w\-]*)(?:\s*(?P<adj_op>[-+*])\s*(?P<adj>\d+\.?\d*|\.\d+))?)\s*$"
)
_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


@dataclass(frozen=True)
class Rule:
    text: str
    metric: str
    op: str
    threshold: float | None = None  # absolute rules
    alias: str | None = None  # relative rules: the registered-model alias to compare with
    adjust_op: str | None = None  # + - * applied to the alias's value
    adjust: float = 0.0

    def bound(self, reference: float | None) -> float:
        if self.alias is None:
            assert self.threshold is not None
            return self.threshold
        assert reference is not None
        if self.adjust_op == "+":
            return reference + self.adjust
        if self.adjust_op == "-":
            return reference - self.adjust
        if self.adjust_op == "*":
            return reference * self.adjust
        return reference


def parse_rule(text: str) -> Rule:
    """Parse `METRIC OP BOUND`; ValueError says what a valid rule looks like."""
    m = _RULE.match(text)
    if not m:
        raise ValueError(
            f'cannot read gate rule "{text}"; write METRIC OP BOUND, e.g. "perplexity <= 40", '
            '"contains >= 0.85" or "perplexity <= champion - 0.5"'
        )
    if m["number"] is not None:
        return Rule(text.strip(), m["metric"], m["op"], threshold=float(m["number"]))
    return Rule(
        text.strip(), m["metric"], m["op"], alias=m["alias"], adjust_op=m["adj_op"], adjust=float(m["adj"] or 0.0)
    )


def check_rule(text: str) -> str:
    """Pydantic validator for a rule string (kept as text in the config, so the cache key stays readable)."""
    parse_rule(text)
    return text.strip()


@dataclass(frozen=True)
class Outcome:
    rule: str
    status: Literal["pass", "fail", "skip"]
    value: float | None  # the candidate's metric
    bound: float | None  # what it was compared with
    reference: float | None  # the alias's metric, for relative rules
    reason: str


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    outcomes: list[Outcome]

    @property
    def reasons(self) -> list[str]:
        return [f"{o.status.upper()}: {o.reason}" for o in self.outcomes]

    def to_json(self) -> dict:
        return {"passed": self.passed, "outcomes": [asdict(o) for o in self.outcomes], "reasons": self.reasons}

    def explain(self, title: str = "quality gate") -> str:
        """A one-screen table: one line per rule, with the values that decided it."""
        verdict = "passed" if self.passed else "FAILED"
        width = max((len(o.rule) for o in self.outcomes), default=10)
        lines = [f"{title} {verdict}:"]
        for o in self.outcomes:
            lines.append(f"  {o.status.upper():4}  {o.rule:<{width}}   {o.reason}")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def decide(
    rules: Sequence[Rule],
    metrics: Mapping[str, float],
    references: Mapping[str, Mapping[str, float] | None],
    *,
    require_reference: bool = False,
    unavailable: Mapping[str, str] | None = None,
) -> GateDecision:
    """Apply every rule. `references`: alias -> that model's metrics on the same eval set (None: no such alias).
    `unavailable`: metric -> why it could not be measured for want of a reference (judge_win_rate before the first
    champion); a rule on it is skipped as a relative rule is (failed with `require_reference`)."""
    outcomes = []
    for rule in rules:
        value = metrics.get(rule.metric)
        if value is None and unavailable and rule.metric in unavailable:
            status: Literal["fail", "skip"] = "fail" if require_reference else "skip"
            outcomes.append(Outcome(rule.text, status, None, None, None, unavailable[rule.metric]))
            continue
        if value is None or math.isnan(value):
            outcomes.append(Outcome(rule.text, "fail", None, None, None, f"the evaluation produced no '{rule.metric}'"))
            continue
        reference = None
        if rule.alias is not None:
            ref_metrics = references.get(rule.alias)
            if ref_metrics is None:
                outcomes.append(
                    Outcome(
                        rule.text,
                        "fail" if require_reference else "skip",
                        value,
                        None,
                        None,
                        f"no '{rule.alias}' model registered yet",
                    )
                )
                continue
            reference = ref_metrics.get(rule.metric)
            if reference is None:
                outcomes.append(
                    Outcome(
                        rule.text, "fail", value, None, None, f"'{rule.alias}' has no '{rule.metric}' on this eval set"
                    )
                )
                continue
        bound = rule.bound(reference)
        ok = _OPS[rule.op](value, bound)
        detail = f"{rule.metric} = {_fmt(value)}"
        if reference is not None:  # a relative rule (rule.alias is set)
            detail += f", {rule.alias} = {_fmt(reference)}"
            if rule.adjust_op:
                detail += f" -> needs {rule.op} {_fmt(bound)}"
        else:
            detail += f", needs {rule.op} {_fmt(bound)}"
        outcomes.append(Outcome(rule.text, "pass" if ok else "fail", value, bound, reference, detail))
    return GateDecision(all(o.status != "fail" for o in outcomes), outcomes)
