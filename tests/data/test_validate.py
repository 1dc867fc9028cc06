"""The validation gate of `prepare`: its failure message and the hint it gives."""

from __future__ import annotations

import pytest

from kollm.data.validate import Counts, GateConfig, check_gate
from kollm.errors import StepFailed


def test_gate_hint_points_at_the_schema_when_schema_errors_broke_it():
    """Broken rows break both max_rejected_fraction and max_schema_error_fraction: the hint is about the schema
    (it used to be the first broken limit's: loosen the filters)."""
    with pytest.raises(StepFailed) as err:
        check_gate(Counts(total=10, train=2, reasons={"read:invalid_json": 8}), GateConfig(), "p")
    assert "max_rejected_fraction" in err.value.message and "dataset:" in err.value.hint
    with pytest.raises(StepFailed) as err:
        check_gate(Counts(total=10, train=2, reasons={"filter:too_short": 8}), GateConfig(), "p")
    assert "config.filters" in err.value.hint
