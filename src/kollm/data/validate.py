"""The validation gate of `prepare`: limits on what survived. A violated limit fails the step (StepFailed)
with a one-screen summary, so nothing downstream trains on broken data."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, Field

from kollm.errors import StepFailed
from kollm._pydantic import STRICT


class GateConfig(BaseModel):
    model_config = STRICT
    max_rejected_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Fail when more than this fraction of all rows is rejected (schema, filters, PII, duplicates).",
    )
    max_schema_error_fraction: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Fail when more than this fraction of rows breaks the dataset schema (or is not valid JSON).",
    )
    min_rows: int = Field(1, ge=0, description="Fail when fewer rows than this are kept (train + eval).")
    min_train_rows: int = Field(1, ge=0, description="Fail when the train split has fewer rows than this.")
    min_eval_rows: int = Field(0, ge=0, description="Fail when the eval split has fewer rows than this.")


@dataclass
class Counts:
    """Row counts of one prepare run."""

    total: int = 0
    train: int = 0
    eval: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # rejection reason -> rows

    @property
    def rejected(self) -> int:
        return sum(self.reasons.values())

    @property
    def kept(self) -> int:
        return self.train + self.eval


# Which setting to change for each limit (the hint in the failure message).
_HINTS = {
    "max_rejected_fraction": "look at the reasons above; loosen the filter that rejects most (config.filters / config.dedup), "
    "or raise config.gate.max_rejected_fraction",
    "max_schema_error_fraction": "fix the rows that break the schema (see the reasons), choose the right `dataset:` kind "
    "and `text_field:`, or raise config.gate.max_schema_error_fraction",
    "min_rows": "add data, loosen config.filters, or lower config.gate.min_rows",
    "min_train_rows": "add data, lower config.split.eval_fraction, or lower config.gate.min_train_rows",
    "min_eval_rows": "add data, raise config.split.eval_fraction, or lower config.gate.min_eval_rows",
}


def violations(counts: Counts, gate: GateConfig) -> list[tuple[str, str]]:
    """(limit, message) for every limit the counts break."""
    out = []
    total = max(counts.total, 1)
    rejected_frac = counts.rejected / total
    schema = sum(n for r, n in counts.reasons.items() if r.startswith(("schema:", "read:")))
    if rejected_frac > gate.max_rejected_fraction:
        out.append(
            (
                "max_rejected_fraction",
                f"{rejected_frac:.1%} of rows were rejected; the limit is {gate.max_rejected_fraction:.1%}",
            )
        )
    if schema / total > gate.max_schema_error_fraction:
        out.append(
            (
                "max_schema_error_fraction",
                f"{schema / total:.1%} of rows break the schema; the limit is {gate.max_schema_error_fraction:.1%}",
            )
        )
    if counts.kept < gate.min_rows:
        out.append(("min_rows", f"{counts.kept} rows kept; at least {gate.min_rows} needed"))
    if counts.train < gate.min_train_rows:
        out.append(("min_train_rows", f"{counts.train} train rows; at least {gate.min_train_rows} needed"))
    if counts.eval < gate.min_eval_rows:
        out.append(("min_eval_rows", f"{counts.eval} eval rows; at least {gate.min_eval_rows} needed"))
    return out


def summary(counts: Counts, title: str) -> str:
    """A one-screen table of counts and rejection reasons."""
    lines = [
        title,
        f"  rows read {counts.total}, kept {counts.kept} (train {counts.train}, eval {counts.eval}), rejected {counts.rejected}",
    ]
    if counts.reasons:
        lines.append("  rejected by reason:")
        width = max(len(r) for r in counts.reasons)
        for reason, n in sorted(counts.reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:12]:
            lines.append(f"    {reason:<{width}}  {n:>8}  {n / max(counts.total, 1):6.1%}")
        if len(counts.reasons) > 12:
            lines.append(f"    ... and {len(counts.reasons) - 12} more reasons (see the report)")
    return "\n".join(lines)


def check_gate(counts: Counts, gate: GateConfig, step: str, report_path: str | None = None) -> None:
    """Raise StepFailed with a summary when a limit is broken."""
    broken = violations(counts, gate)
    if not broken:
        return
    lines = [summary(counts, f"prepare step '{step}': the validation gate failed"), "  limits broken:"]
    lines += [f"    config.gate.{limit}: {msg}" for limit, msg in broken]
    if report_path:
        lines.append(f"  report with examples of rejected rows: {report_path}")
    limits = [limit for limit, _ in broken]
    # Rows that break the schema also count as rejected: then fixing the schema, not the filters, is the advice.
    hint_for = "max_schema_error_fraction" if "max_schema_error_fraction" in limits else limits[0]
    raise StepFailed("\n".join(lines), hint=_HINTS[hint_for])
