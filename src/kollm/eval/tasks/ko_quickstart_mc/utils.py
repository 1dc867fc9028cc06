"""lm-eval hooks of ko_quickstart_mc: the questions come from the JSON file beside this one (no download)."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "ko_quickstart_mc.json"


def load(**kwargs):
    """The task's dataset (lm-eval's `custom_dataset`): a DatasetDict with one `test` split."""
    import datasets

    rows = json.loads(DATA.read_text(encoding="utf-8"))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
