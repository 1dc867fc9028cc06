"""Size-rotated JSON-lines logs for the serving layer (a server writes a line per request, forever).

Public API:
    RotatingJsonLinesLogger(path, max_bytes=..., backups=...)   a kollm.monitor.logging.JsonLinesLogger that, once
                                                               the file passes max_bytes, renames it to path.1
                                                               (path.1 -> path.2, ...; the oldest beyond `backups`
                                                               is deleted) and starts a new file
    clip(value, limit) -> value                                a string cut to `limit` characters (with a marker)

The line format is monitor.logging's; rotation is the scheme of Python's RotatingFileHandler, which log
shippers (Vector, Fluent Bit, Promtail) follow by inode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kollm.monitor.logging import JsonLinesLogger

MAX_LOG_BYTES = 64 * 1024 * 1024
LOG_BACKUPS = 5
FIELD_LIMIT = 256  # characters kept of a client-controlled field (user, path) in a log line


def clip(value: Any, limit: int = FIELD_LIMIT) -> Any:
    """A client-controlled string cut to `limit` characters, saying how long it was; other values as they are."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}...[{len(value)} chars]"
    return value


class RotatingJsonLinesLogger(JsonLinesLogger):
    """JsonLinesLogger whose file is rotated once it is larger than `max_bytes` (keeping `backups` old files)."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_LOG_BYTES, backups: int = LOG_BACKUPS):
        super().__init__(path)
        self.max_bytes = max_bytes
        self.backups = backups

    def log(self, event: str, **fields: Any) -> None:
        super().log(event, **fields)
        with self._lock:
            if self._file is not None and self._file.tell() >= self.max_bytes:
                self._file.close()
                self._file = None
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
