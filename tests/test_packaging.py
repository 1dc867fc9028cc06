"""pyproject.toml in the form setuptools keeps building (PEP 639: the license as an SPDX expression)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.licenses import canonicalize_license_expression
from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))


def test_license_is_an_spdx_expression_with_a_setuptools_that_reads_it():
    """`license = {text = ...}` is deprecated by setuptools, which stops building it on 2027-02-18."""
    license = PYPROJECT["project"]["license"]
    assert isinstance(license, str) and canonicalize_license_expression(license) == "Apache-2.0"
    assert not any(
        c.startswith("License ::") for c in PYPROJECT["project"].get("classifiers", [])
    )  # PEP 639 forbids both
    setuptools = next(Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools"))
    assert not setuptools.specifier.contains("76.9")  # SPDX expressions need setuptools 77
