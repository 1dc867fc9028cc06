"""kollm's one JSON-lines log format and its one writer, for every log under `<project>/.kollm/logs/`.

A bottom module (it imports only kollm.redact), so the runner (layer 2), training, serving and monitoring all use it.

Files: `.kollm/logs/<kind>/<name>.jsonl`, kind one of KINDS:
    system/<pipeline run id>.jsonl   the runner's events of one pipeline run (component "runner")
    training/<step>.jsonl            a training step's metrics every `log_every` optimizer steps (component "train")
    api/api.jsonl                    one line per HTTP request to kollm serve or the gateway (component "serve")
    inference/inference.jsonl        one line per generation, with the request's drift features (component "serve")

Every line is one JSON object (the schema; `check(record)` lists what a line breaks of it):
    ts         str, always   UTC ISO-8601 with milliseconds: "2026-01-02T03:04:05.678+00:00" (RFC 3339)
    level      str, always   DEBUG | INFO | WARNING | ERROR
    component  str, always   what wrote it: runner | train | serve (COMPONENTS)
    event      str, always   what happened, snake_case: pipeline_started, step_finished, train_metrics, http_request,
                             generation, ... (README "Logs" lists them)
    project    str, optional labels: few distinct values, so a log shipper may index them (promtail makes them
    step       str, optional   Loki labels): the kollm.yaml project, the pipeline step's name, the served model name
    model      str, optional
    ...        any           the event's own fields, each under its own key (never one of the names above); strings
                             are masked (kollm.redact.mask_text) and cut to `field_limit` characters (clip)

Public API:
    JsonLog(path, component, *, project=, step=, model=, max_bytes=, backups=, field_limit=)
        .log(event, level="INFO", **fields)   write one line; label keywords (step="sft") set or override labels
        .record(event, level="INFO", **fields) -> dict   the line as a dict, not written (to ship it elsewhere first)
        .write_record(record)                 write a line built by .record (perhaps in another process)
        .close()
    log_path(state_dir, kind, name=None) -> Path   `<state_dir>/logs/<kind>/<name or kind>.jsonl`
    clip(value, limit) -> value                    a string cut to `limit` characters: head and tail kept, the length
                                                   said between them; other values as they are
    check(record) -> list[str]                     what a parsed line breaks of the schema ([] when it is valid)

Writing: a line is flushed as it is written, so `tail -f` and log shippers (Promtail, Vector, Fluent Bit) see it
at once. Every JsonLog of one file in a process shares one open file and lock; once the file is larger than
`max_bytes` (64 MiB) it is renamed to `<name>.1` (`.1` -> `.2`, ...; the oldest beyond `backups`, 5, is deleted) and
a new file is started, the scheme of Python's RotatingFileHandler that log shippers follow. Rotation assumes one
writing process per file (the runner's per-run files, written by several processes, stay far below the limit).
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TextIO

from kollm.redact import mask_text

KINDS = ("training", "inference", "system", "api")
Kind = Literal["training", "inference", "system", "api"]
COMPONENTS = ("runner", "train", "serve")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FIXED = ("ts", "level", "component", "event")
LABELS = ("project", "step", "model")
LOKI_LABELS = ("component", "level", "step", "model")  # what promtail indexes (project: from its static config)
MAX_LOG_BYTES = 64 * 1024 * 1024
LOG_BACKUPS = 5
FIELD_LIMIT = 8192  # characters kept of any string in a line (a traceback keeps its head and its tail)
CLIENT_FIELD_LIMIT = 256  # characters kept of a client-controlled field (a request's `user`, its path)
_EVENT = re.compile(r"[a-z][a-z0-9_]*")


def log_path(state_dir: Path, kind: Kind, name: str | None = None) -> Path:
    """One log file of a project: `<state_dir>/logs/<kind>/<name or kind>.jsonl` (state_dir: `<project>/.kollm`)."""
    return Path(state_dir) / "logs" / kind / f"{name or kind}.jsonl"


def clip(value: Any, limit: int = CLIENT_FIELD_LIMIT) -> Any:
    """A string longer than `limit` characters cut to its first 3/4 and last 1/4 of `limit`, with its length between
    them (`aaa...[100000 chars]...z`); other values as they are."""
    if isinstance(value, str) and len(value) > limit:
        tail = limit // 4
        cut = f"{value[: limit - tail]}...[{len(value)} chars]"
        return f"{cut}...{value[len(value) - tail :]}" if tail else cut
    return value


def _clean(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return clip(mask_text(value), limit)
    if isinstance(value, dict):
        return {str(k): _clean(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, limit) for v in value]
    return value


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class _File:
    """One open log file with its lock and rotation; shared by every JsonLog of the same path in this process."""

    def __init__(self, path: Path, max_bytes: int, backups: int):
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.lock = threading.Lock()
        self.file: TextIO | None = None

    def write(self, line: str) -> None:
        with self.lock:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a", encoding="utf-8")
            self.file.write(line)
            self.file.flush()
            if self.max_bytes and self.file.tell() >= self.max_bytes:
                self.file.close()
                self.file = None
                self._rotate()

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups > 0:
            self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        with self.lock:
            if self.file is not None:
                self.file.close()
                self.file = None

    def __del__(self) -> None:
        if self.file is not None:
            self.file.close()


_FILES: weakref.WeakValueDictionary[str, _File] = weakref.WeakValueDictionary()
_FILES_LOCK = threading.Lock()


def _shared_file(path: Path, max_bytes: int, backups: int) -> _File:
    key = str(path.absolute())
    with _FILES_LOCK:
        f = _FILES.get(key)
        if f is None:
            f = _FILES[key] = _File(path, max_bytes, backups)
        return f


class JsonLog:
    """The writer of one log file: lines of `component` with the labels given here (see the module docstring).
    Thread-safe; picklable (a copy in another process opens the file itself on its first line)."""

    def __init__(
        self,
        path: Path,
        component: str,
        *,
        project: str | None = None,
        step: str | None = None,
        model: str | None = None,
        max_bytes: int = MAX_LOG_BYTES,
        backups: int = LOG_BACKUPS,
        field_limit: int = FIELD_LIMIT,
    ):
        if component not in COMPONENTS:
            raise ValueError(f"component {component!r}: one of {', '.join(COMPONENTS)} (add a new one to COMPONENTS)")
        self.path = Path(path)
        self.component = component
        self.labels = {k: str(v) for k, v in (("project", project), ("step", step), ("model", model)) if v is not None}
        self.max_bytes, self.backups, self.field_limit = max_bytes, backups, field_limit
        self._file: _File | None = None

    def record(self, event: str, level: str = "INFO", **fields: Any) -> dict[str, Any]:
        """The line `log` would write, as a dict."""
        if level not in LEVELS:
            raise ValueError(f"level {level!r}: one of {', '.join(LEVELS)}")
        if "ts" in fields or "component" in fields:
            raise TypeError("ts and component are set by the writer, not passed as fields")
        labels = dict(self.labels)
        for k in LABELS:
            if k in fields:
                v = fields.pop(k)
                if v is None:
                    labels.pop(k, None)
                else:
                    labels[k] = str(v)
        return {
            "ts": _now(),
            "level": level,
            "component": self.component,
            "event": event,
            **labels,
            **{k: _clean(v, self.field_limit) for k, v in fields.items()},
        }

    def log(self, event: str, level: str = "INFO", **fields: Any) -> None:
        """Write one line: the fixed fields, the labels, then `fields`."""
        self.write_record(self.record(event, level, **fields))

    def write_record(self, record: dict[str, Any]) -> None:
        """Write a line made by `record` (here or in another process: e.g. a Ray worker's, shipped to the driver)."""
        line = json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":"), allow_nan=True)
        # ensure_ascii=False keeps Korean readable; a lone surrogate cannot be written as UTF-8, so escape it.
        line = line.encode("utf-8", errors="backslashreplace").decode("utf-8")
        if self._file is None:
            self._file = _shared_file(self.path, self.max_bytes, self.backups)
        self._file.write(line + "\n")

    def close(self) -> None:
        """Close the file (for every JsonLog of this path in the process; the next line opens it again)."""
        if self._file is not None:
            self._file.close()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_file": None}


def check(record: Any) -> list[str]:
    """What a parsed log line breaks of the schema in the module docstring; [] when it is valid."""
    if not isinstance(record, dict):
        return [f"a line is a JSON object, not {type(record).__name__}"]
    problems = [f"no `{k}`" for k in FIXED if k not in record]
    ts = record.get("ts")
    if "ts" in record:
        try:
            parsed = datetime.fromisoformat(ts) if isinstance(ts, str) else None
        except ValueError:
            parsed = None
        offset = parsed.utcoffset() if parsed is not None else None
        if offset is None or offset.total_seconds() != 0:
            problems.append(f"ts {ts!r} is not an ISO-8601 UTC time")
    if "level" in record and record["level"] not in LEVELS:
        problems.append(f"level {record['level']!r} is not one of {', '.join(LEVELS)}")
    if "component" in record and record["component"] not in COMPONENTS:
        problems.append(f"component {record['component']!r} is not one of {', '.join(COMPONENTS)}")
    event = record.get("event")
    if "event" in record and not (isinstance(event, str) and _EVENT.fullmatch(event)):
        problems.append(f"event {event!r} is not a snake_case name")
    for k in LABELS:
        if k in record and not isinstance(record[k], str):
            problems.append(f"label {k} is {type(record[k]).__name__}, not a string")
    if not problems and list(record)[: len(FIXED)] != list(FIXED):
        problems.append(f"the line starts with {list(record)[:4]}, not {list(FIXED)}")
    return problems
