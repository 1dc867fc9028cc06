"""Masking credentials before text leaves the process: in messages, logs, MLflow params and tags, reports.

A bottom module (it imports nothing from kollm), so every layer can use it. One implementation:

    mask_uri("postgresql://kollm:s3cret@db:5432/mlflow")  -> "postgresql://kollm:***@db:5432/mlflow"
    mask_text("cannot open postgresql://u:p@h/db: timeout") -> "cannot open postgresql://u:***@h/db: timeout"

Passwords in a URI's user-info (`scheme://user:PASSWORD@host`) and in query or keyword parameters named like
a secret (`?password=...`, `sslpassword=...`, `token=...`, `api_key=...`) are replaced by `***`.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# scheme://user:password@host. Drivers accept nearly anything in a password (SQLAlchemy: all but '@', so '/', '?',
# '#' and spaces; urllib: '@' too, up to the last '@' of the host part), so the secret runs to the LAST '@' of its
# line. In free text it stops before a following URI-like word (`... at models:/m@champion`), so only a password
# holding a space followed by `word:/` can end early; mask_uri, given one whole URI, has no such limit.
_HEAD = r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@?#]*)"
_USERINFO = re.compile(_HEAD + r":(?P<secret>(?:(?!\s+[A-Za-z][A-Za-z0-9+.\-]*:/)[^\n])+)@")
_USERINFO_WHOLE = re.compile(r"\A" + _HEAD + r":(?P<secret>.+)@", re.DOTALL)
# password=..., secret=..., token=..., api_key=... in a query string, a DSN or a message
_PARAM = re.compile(
    r"(?P<head>\b(?:[A-Za-z_]*password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|secret[_-]?key)=)"
    r"(?P<secret>[^\s&;,'\"]+)",
    re.IGNORECASE,
)


def mask_text(text: str) -> str:
    """`text` with every credential in a URI or key=value pair replaced by ***."""
    if not text or ("://" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _PARAM.sub(lambda m: f"{m['head']}{MASK}", text)


def mask_uri(uri: str | None) -> str:
    """A URI safe to print: its password (user-info or query parameter) replaced by ***."""
    if not uri:
        return str(uri)
    return mask_text(_USERINFO_WHOLE.sub(lambda m: f"{m['head']}:{MASK}@", uri, count=1))


def mask_values(obj: Any) -> Any:
    """A copy of a JSON-like value with every string masked (dict keys are kept)."""
    if isinstance(obj, str):
        return mask_text(obj)
    if isinstance(obj, dict):
        return {k: mask_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(mask_values(v) for v in obj)
    return obj
