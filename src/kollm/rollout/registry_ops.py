"""The registry moves a rollout makes, through kollm.registry: promote a version to `champion` (the old
champion becomes `previous`, with kollm's audit trail) and tag a version with the rollout's outcome.

Blocking MLflow calls; the controller runs them in a thread.
"""

from __future__ import annotations

from pathlib import Path

from kollm import registry


def promote(project_dir: Path | None, name: str, version: str, reason: str) -> None:
    registry.promote(name, version, reason=reason, project_dir=project_dir)


def tag_version(project_dir: Path | None, name: str, version: str, tags: dict[str, str]) -> None:
    client = registry.client(project_dir)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value[:5000])
