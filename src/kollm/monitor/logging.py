"""Structured JSON-lines logs under `.kollm/logs/{training,inference,system,api}/`.

Public API:
    JsonLinesLogger(path)                      one file, one JSON object per line; thread-safe; `.log(event, **fields)`
    json_logger(project_dir, kind, name=None)  the logger for `<project_dir>/.kollm/logs/<kind>/<name or kind>.jsonl`

Each line carries `ts` (UTC ISO-8601 with milliseconds) and `event`, then the fields given. Values that JSON
cannot hold (paths, datetimes, ...) are written with `str()`. Lines are flushed as they are written, so
`tail -f` and log shippers (Vector, Fluent Bit, Promtail) see them at once.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TextIO

LogKind = Literal["training", "inference", "system", "api"]


class JsonLinesLogger:
    """Appends one JSON object per line to `path` (its folder is created). Safe to share between threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file: TextIO | None = None

    def log(self, event: str, **fields: Any) -> None:
        record = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "event": event, **fields}
        line = json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":"))
        # ensure_ascii=False keeps Korean readable; a lone surrogate cannot be written as UTF-8, so escape it.
        data = line.encode("utf-8", errors="backslashreplace").decode("utf-8")
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(data + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def json_logger(project_dir: Path, kind: LogKind, name: str | None = None) -> JsonLinesLogger:
    """The JSON-lines logger for one kind of log of a project: `<project_dir>/.kollm/logs/<kind>/<name>.jsonl`."""
    return JsonLinesLogger(Path(project_dir) / ".kollm" / "logs" / kind / f"{name or kind}.jsonl")
