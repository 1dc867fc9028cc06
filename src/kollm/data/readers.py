"""Readers: files of a data source -> pandas batches of raw rows (one batch per file, or per chunk).

Formats: `txt` (a document per file, or per blank-line-separated block), `jsonl` (a JSON object per line;
a line that is not valid JSON becomes a rejected row with reason `read:invalid_json`), `parquet`, `csv`,
and `hf` (a Hugging Face `datasets` folder written by `save_to_disk`, a Dataset or a DatasetDict).
Paths may be local or fsspec URLs (s3://, gs://, memory://, file://); s3 credentials come from the
environment as usual (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...).

Every batch has a `_source` column (the file or URL it came from) and, for text files, a `text` column.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from kollm.data.schema import REJECT, SOURCE
from kollm.errors import StepFailed

Format = Literal["auto", "txt", "jsonl", "parquet", "csv", "hf"]
TxtMode = Literal["file", "paragraph"]

_EXTENSIONS = {
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
}
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_BLANK_LINES = re.compile(r"\n[ \t\u3000]*\n+")


@dataclass(frozen=True)
class SourceFiles:
    """What a prepare step reads for one source input (from the source artifact's meta)."""

    name: str
    uri: str
    format: str
    files: list[str] = field(default_factory=list)


def _is_url(path: str) -> bool:
    return "://" in path


def _open(path: str, mode: str = "rb"):
    if _is_url(path):
        import fsspec

        return fsspec.open(path, mode).open()
    return open(path, mode)


def file_format(path: str) -> str | None:
    """The format of a file from its extension (compression suffixes are not supported)."""
    return _EXTENSIONS.get(Path(path.split("?")[0]).suffix.lower())


def _is_hf_folder(uri: str, files: list[str]) -> bool:
    names = {f.replace("\\", "/").rsplit("/", 1)[-1] for f in files}
    if any(m in names for m in _HF_MARKERS):
        return True
    if not _is_url(uri) and Path(uri).is_dir():
        return any((Path(uri) / m).exists() for m in _HF_MARKERS)
    return False


def read_text(path: str, mode: TxtMode) -> pd.DataFrame:
    raw = _read_bytes(path)
    text = raw.decode("utf-8-sig", errors="replace")
    if mode == "file":
        docs = [text]
    else:
        docs = [block for block in _BLANK_LINES.split(text.replace("\r\n", "\n")) if block.strip()]
    return pd.DataFrame({"text": docs, SOURCE: path})


def _read_bytes(path: str) -> bytes:
    with _open(path) as f:
        return f.read()


def read_jsonl(path: str) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    reasons: list[str] = []
    for line in _read_bytes(path).decode("utf-8-sig", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            rows.append({})
            reasons.append("read:invalid_json")
            continue
        if isinstance(obj, dict):
            rows.append(obj)
            reasons.append("")
        else:
            rows.append({})
            reasons.append("read:not_an_object")
    df = pd.DataFrame.from_records(rows) if rows else pd.DataFrame()
    df[SOURCE] = path
    df[REJECT] = reasons
    return df


def read_parquet(path: str) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    with _open(path) as f:
        pf = pq.ParquetFile(f)
        for rg in range(pf.num_row_groups):
            df = pf.read_row_group(rg).to_pandas()
            df[SOURCE] = path
            yield df


def read_csv(path: str) -> pd.DataFrame:
    sep = "\t" if path.lower().endswith(".tsv") else ","
    with _open(path) as f:
        df = pd.read_csv(io.BytesIO(f.read()), sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    df[SOURCE] = path
    return df


def read_hf(uri: str) -> Iterator[pd.DataFrame]:
    from datasets import Dataset, DatasetDict, load_from_disk

    ds = load_from_disk(uri)
    parts = ds.items() if isinstance(ds, DatasetDict) else [("", ds)]
    for split, part in parts:
        assert isinstance(part, Dataset)
        for start in range(0, len(part), 10_000):
            df = part.select(range(start, min(start + 10_000, len(part)))).to_pandas()
            df[SOURCE] = f"{uri}#{split}" if split else uri
            yield df


def is_hf_source(src: SourceFiles) -> bool:
    """A Hugging Face `save_to_disk` folder: read as a whole, not file by file."""
    return src.format == "hf" or (src.format == "auto" and _is_hf_folder(src.uri, src.files))


def read_source(src: SourceFiles, txt_mode: TxtMode = "file") -> Iterator[pd.DataFrame]:
    """Yield raw batches of every file of a source. Raises StepFailed naming the file on unreadable data."""
    fmt = src.format
    if is_hf_source(src):
        try:
            yield from read_hf(src.uri)
        except Exception as e:  # datasets raises many types for a broken folder
            raise StepFailed(
                f"data.{src.name}: cannot load the Hugging Face dataset folder {src.uri}: {type(e).__name__}: {e}",
                hint="point `path:` at a folder written by Dataset.save_to_disk / DatasetDict.save_to_disk",
            ) from None
        return
    for path in src.files:
        f = fmt if fmt != "auto" else file_format(path)
        if f is None:
            raise StepFailed(
                f"data.{src.name}: cannot tell the format of {path} from its extension",
                hint="set `format:` (txt, jsonl, parquet, csv, hf) on the source in kollm.yaml, or rename the file",
            )
        try:
            if f == "txt":
                yield read_text(path, txt_mode)
            elif f == "jsonl":
                yield read_jsonl(path)
            elif f == "parquet":
                yield from read_parquet(path)
            elif f == "csv":
                yield read_csv(path)
            else:
                raise StepFailed(f"data.{src.name}: format '{f}' needs a folder written by save_to_disk, not the file {path}")
        except StepFailed:
            raise
        except Exception as e:  # OSError, pyarrow and pandas parser errors: no common base
            raise StepFailed(f"data.{src.name}: cannot read {path} as {f}: {type(e).__name__}: {e}", hint="fix or remove the file") from None
