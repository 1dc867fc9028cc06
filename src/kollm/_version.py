"""kollm's version: a bottom module (no kollm imports), so any layer may read it without importing the package API."""

from __future__ import annotations

__version__ = "0.1.0"
