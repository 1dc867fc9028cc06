"""The registry moves a rollout makes: promote a version to `champion` (keeping `previous`) and tag a version.

Blocking MLflow calls; the controller runs them in a thread.
"""

from __future__ import annotations

import time

from kollm.pipeline.tracking import client_for


def promote(tracking_uri: str, name: str, version: str, reason: str) -> None:
    """`champion` -> version; the old champion becomes `previous`; audit tags on the version."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    try:
        old = client.get_model_version_by_alias(name, "champion").version
    except MlflowException:
        old = None
    if old is not None and str(old) != str(version):
        client.set_registered_model_alias(name, "previous", str(old))
    client.set_registered_model_alias(name, "champion", str(version))
    for key, value in {
        "kollm.promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kollm.promoted_reason": reason,
        "kollm.promoted_from": str(old) if old is not None else "",
    }.items():
        client.set_model_version_tag(name, str(version), key, value)


def tag_version(tracking_uri: str, name: str, version: str, tags: dict[str, str]) -> None:
    client = client_for(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value[:5000])


def version_of(tracking_uri: str, name: str, alias: str) -> str:
    """The version number an alias points to."""
    return str(client_for(tracking_uri).get_model_version_by_alias(name, alias).version)
