"""Example projects shipped with kollm. `kollm init DIR --example NAME` calls `init_project`."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from kollm.errors import KollmError

EXAMPLES_DIR = Path(__file__).parent


def available() -> list[str]:
    return sorted(p.name for p in EXAMPLES_DIR.iterdir() if p.is_dir() and (p / "kollm.yaml").exists())


def konlpy_corpus_dir() -> Path:
    """konlpy's bundled corpora (kolaw, kobill): plain UTF-8 files, no Java needed."""
    import importlib.util

    spec = importlib.util.find_spec("konlpy")
    if spec is None or not spec.submodule_search_locations:
        raise KollmError(
            "the korean-quickstart example reads the kolaw/kobill corpora from konlpy, which is not installed",
            hint="pip install konlpy",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "corpus"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


_WRAPPED_END = re.compile(r"[.다:)]\s*$")
_BLOCK_START = re.compile(r"\s*(제\d+조|[①-⑳]|\d+\.|-)")


def reflow_bill(text: str) -> str:
    """kobill's text comes from PDFs: every printed line is its own blank-line block. Join a block to the
    previous one when that one was cut at the line width (long, no sentence end, the next is no new item),
    so a blank-line block is a paragraph again. Everything else is left as konlpy ships it."""
    out: list[str] = []
    for block in (b.strip("\n") for b in re.split(r"\n[ \t]*\n", text) if b.strip()):
        prev_line = out[-1].splitlines()[-1].strip() if out else ""
        if len(prev_line) >= 18 and not _WRAPPED_END.search(out[-1]) and not _BLOCK_START.match(block):
            out[-1] = out[-1].rstrip() + " " + block.strip()
        else:
            out.append(block)
    return "\n\n".join(out) + "\n"


def generate_quickstart_data(project: Path) -> None:
    """data/corpus/*.txt (konlpy's constitution as shipped and its ten bills with PDF line wraps joined),
    data/instructions.jsonl,
    data/preferences.jsonl and data/eval_suite.jsonl (generated Korean Q&A). Deterministic."""
    from kollm.data.synthetic import (
        constitution_articles,
        generate_eval_suite,
        generate_instructions,
        generate_preferences,
    )

    corpus = konlpy_corpus_dir()
    out = project / "data" / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted((corpus / "kolaw").glob("*.txt")):
        shutil.copyfile(f, out / f"kolaw-{f.name}")
    for f in sorted((corpus / "kobill").glob("*.txt")):
        (out / f"kobill-{f.name}").write_text(reflow_bill(f.read_text(encoding="utf-8")), encoding="utf-8")
    articles = constitution_articles(corpus / "kolaw" / "constitution.txt")
    _write_jsonl(project / "data" / "instructions.jsonl", generate_instructions(400, seed=0, articles=articles))
    _write_jsonl(project / "data" / "preferences.jsonl", generate_preferences(300, seed=1, articles=articles))
    _write_jsonl(project / "data" / "eval_suite.jsonl", generate_eval_suite(seed=2, articles=articles))


CI = ("github",)


def init_project(dest: Path, example: str = "korean-quickstart", ci: str | None = None) -> Path:
    """Copy the example folder to `dest` and generate its data files. Returns the project folder.

    `ci="github"` also writes the project's GitHub Actions workflow (`.github/workflows/kollm.yml`, what
    `kollm deploy render --target github` writes with its default options).

    Refuses a `dest` that exists and is not empty. Everything is written to a temporary folder beside
    `dest` first and renamed into place, so a failure leaves nothing half-written. An existing empty `dest`
    (`kollm init .`) is kept, not replaced (a shell inside it stays in a folder that exists): the generated
    files and folders are moved into it.
    """
    dest = Path(dest).expanduser().resolve()
    src = EXAMPLES_DIR / example
    if not (src / "kollm.yaml").exists():
        raise KollmError(f"unknown example '{example}'", hint="available examples: " + ", ".join(available()))
    if ci is not None and ci not in CI:
        raise KollmError(f"--ci: unknown CI system {ci!r}", hint="give one of: " + ", ".join(CI))
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise KollmError(f"{dest} already exists and is not empty", hint="choose a new folder, or empty this one first")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".kollm"))
        if example == "korean-quickstart":
            generate_quickstart_data(tmp)
        if ci == "github":
            from kollm.deploy import render

            render(tmp, "github", tmp)  # checks kollm.yaml on the way: a bad one leaves no project behind
        if dest.exists():
            _move_children(tmp, dest)
            tmp.rmdir()
        else:
            os.chmod(tmp, 0o755)
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _move_children(src: Path, dest: Path) -> None:
    """Rename every entry of `src` into the empty folder `dest`; on failure, take back what was moved."""
    moved: list[Path] = []
    try:
        for child in sorted(src.iterdir()):
            os.replace(child, dest / child.name)
            moved.append(child)
    except BaseException:
        for child in moved:
            os.replace(dest / child.name, child)
        raise
