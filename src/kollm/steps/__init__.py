"""Step kinds: one module per kind, registered by name in kollm.pipeline.kinds. Modules are imported only when a
pipeline uses them (torch is heavy)."""

from __future__ import annotations

from kollm.pipeline.kinds import KINDS, load_kind

__all__ = ["KINDS", "load_kind"]
