"""Fixtures for the deployment files: the quickstart project and its renderings (k8s, compose, docker)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kollm.deploy import TARGETS, render_files
from kollm.examples import init_project

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO.parent / "shared" / "k8s-crds"


def render_examples(root: Path) -> dict[str, dict[str, str]]:
    """What deploy/ holds: the korean-quickstart rendered into PROJECT/deploy/<target> with the default options."""
    project = root / "korean-quickstart"
    if not project.exists():
        init_project(project, "korean-quickstart")
    return {t: render_files(project, t, project / "deploy" / t) for t in TARGETS}


@pytest.fixture(scope="session")
def examples(tmp_path_factory) -> dict[str, dict[str, str]]:
    return render_examples(tmp_path_factory.mktemp("deploy-examples"))


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory) -> Path:
    project = tmp_path_factory.mktemp("qs") / "korean-quickstart"
    init_project(project, "korean-quickstart")
    return project


def write(files: dict[str, str], dest: Path) -> Path:
    """Write a rendering into DEST (emptied first)."""
    shutil.rmtree(dest, ignore_errors=True)
    for name, text in files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text(text, encoding="utf-8")
    return dest
