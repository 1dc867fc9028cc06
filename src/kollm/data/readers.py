"""Readers: files of a data source -> pandas batches of raw rows, streamed: text, JSON Lines and CSV files are
read line by line into batches of at most `batch_rows` rows, parquet by row group, `hf` folders in chunks.
Text files are decoded strictly with the step's `encoding` (UTF-8 unless set; a leading UTF-8 BOM is skipped):
bytes that are not valid fail the step naming the file and byte offset, never garbled text.

Formats: `txt` (a document per file, or per blank-line-separated block), `jsonl` (a JSON object per line, or
one JSON array of objects as in Alpaca/KoAlpaca `.json` files;
a line that is not valid JSON becomes a rejected row with reason `read:invalid_json`), `parquet`, `csv`,
and `hf` (a Hugging Face `datasets` folder written by `save_to_disk`, a Dataset or a DatasetDict).
Paths may be local or fsspec URLs (s3://, gs://, memory://, file://); s3 credentials come from the
environment as usual (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...).

Every batch has a `_source` column (the file or URL it came from) and, for text files, a `text` column.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from itertools import chain
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from kollm.data.config import TxtMode
from kollm.data.schema import REJECT, SOURCE
from kollm.errors import StepFailed

Format = Literal["auto", "txt", "jsonl", "parquet", "csv", "hf"]

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
_BLANK_LINE = re.compile(r"[ \t\u3000]*")


@dataclass(frozen=True)
class SourceFiles:
    """What a prepare step reads for one source input (from the source artifact's meta)."""

    name: str
    uri: str
    format: str
    files: list[str]


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


class UnreadableFile(Exception):
    """A file that cannot be read as its format; `read_source` turns it into StepFailed naming the source."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message, self.hint = message, hint


class NotDecodable(UnreadableFile):
    """A text file holds bytes that are not valid in the expected encoding."""

    def __init__(self, path: str, encoding: str, offset: int, reason: str):
        super().__init__(
            f"{path} is not valid {encoding}: {reason} at byte {offset}",
            hint=f"convert the file, e.g. `iconv -f cp949 -t utf-8 {path} > {Path(path).stem}.utf8{Path(path).suffix}`, "
            "or set the prepare step's `encoding: cp949` (or the file's encoding) in kollm.yaml",
        )


def _lines(path: str, encoding: str, byte_range: tuple[int, int] | None = None) -> Iterator[str]:
    """The lines of a text file (each with its "\\n"), decoded strictly one at a time. A UTF-8 byte order mark
    at the start is skipped. With `byte_range=(start, end)`: only the lines that begin at a byte in
    [start, end), so consecutive ranges read every line once (a "\\n" byte only ends lines in the
    ASCII-compatible encodings `check_encoding` allows)."""
    import codecs

    utf8 = codecs.lookup(encoding).name in ("utf-8", "utf-8-sig")
    codec = "utf-8" if utf8 else encoding
    start, end = byte_range or (0, None)
    offset = 0
    with _open(path) as f:
        if start > 0:  # skip the line that began before `start` (it belongs to the previous range)
            f.seek(start - 1)
            offset = start - 1 + len(f.readline())
        for raw in f:
            if end is not None and offset >= end:
                break
            if offset == 0 and utf8 and raw.startswith(codecs.BOM_UTF8):
                raw, offset = raw[3:], 3
            try:
                yield raw.decode(codec)
            except UnicodeDecodeError as e:
                raise NotDecodable(path, encoding, offset + e.start, e.reason) from None
            offset += len(raw)


def jsonl_ranges(path: str, encoding: str, piece_bytes: int) -> list[tuple[int, int]] | None:
    """Equal byte ranges of at most `piece_bytes` that split a local JSON Lines file into parts read on their own
    (`read_source(..., byte_range=)`), or None when the file is small, not a regular local file, or one JSON
    array or object (read whole)."""
    if _is_url(path) or not os.path.isfile(path):
        return None
    size = os.path.getsize(path)
    if size <= piece_bytes:
        return None
    try:
        first = next((line.strip() for line in _lines(path, encoding) if line.strip()), "")
    except (UnreadableFile, OSError):
        return None  # reading the whole file reports it
    if first.startswith("[") or (first.startswith("{") and _json_row(first)[1]):
        return None  # a JSON array or one object over several lines: see _json_rows
    parts = -(-size // piece_bytes)
    cuts = [size * i // parts for i in range(parts + 1)]  # equal parts
    return list(zip(cuts, cuts[1:]))


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    """Blocks separated by blank lines; the same blocks as `_BLANK_LINES.split(text)` on the whole text."""
    block: list[str] = []
    skipping = False  # after a separator: further empty lines belong to it
    for line in lines:
        line = line.replace("\r\n", "\n")
        if skipping:
            if line == "\n":
                continue
            skipping, block = False, [line]
        elif block and line.endswith("\n") and _BLANK_LINE.fullmatch(line[:-1]):
            block[-1] = block[-1][:-1]
            yield "".join(block)
            block, skipping = [], True
        else:
            block.append(line)
    yield "".join(block)


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def read_text(path: str, mode: TxtMode, encoding: str = "utf-8", batch_rows: int = 10_000) -> Iterator[pd.DataFrame]:
    lines = _lines(path, encoding)
    docs = ["".join(lines)] if mode == "file" else (block for block in _paragraphs(lines) if block.strip())
    for batch in _batched(docs, batch_rows):
        yield pd.DataFrame({"text": batch, SOURCE: path})


def _json_row(line: str) -> tuple[dict[str, Any], str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return {}, "read:invalid_json"
    return (obj, "") if isinstance(obj, dict) else ({}, "read:not_an_object")


def _json_rows(path: str, lines: Iterator[str]) -> Iterator[tuple[dict[str, Any], str]]:
    """(row, rejection reason) per JSON object. JSON Lines, or one JSON array of objects (Alpaca/KoAlpaca
    `.json` files; read whole), or one JSON object (a single row; an object holding the rows in a list
    under a key is an error that names the key)."""
    head: list[str] = []
    for line in lines:  # up to the first non-blank line
        head.append(line)
        if line.strip():
            break
    first = head[-1].strip() if head else ""
    rest: Iterable[str] = chain(head, lines)
    if first.startswith("[") or (first.startswith("{") and _json_row(first)[1]):
        text = "".join(rest)
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            rest = text.split("\n")  # JSON Lines after all, with broken lines
        else:
            yield from _whole_json_rows(path, whole)
            return
    for line in rest:
        if line.strip():
            yield _json_row(line)


def _whole_json_rows(path: str, whole: Any) -> Iterator[tuple[dict[str, Any], str]]:
    if isinstance(whole, list):
        yield from (((obj, "") if isinstance(obj, dict) else ({}, "read:not_an_object")) for obj in whole)
    elif isinstance(whole, dict):
        keys = [k for k, v in whole.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if keys:
            raise UnreadableFile(
                f"{path} is one JSON object holding the rows in a list under '{keys[0]}', not JSON Lines or a JSON array",
                hint=f"write the rows as JSON Lines, e.g. `jq -c '.{keys[0]}[]' {path} > {Path(path).stem}.jsonl`",
            )
        yield whole, ""
    else:
        yield {}, "read:not_an_object"


def read_jsonl(
    path: str, encoding: str = "utf-8", batch_rows: int = 10_000, byte_range: tuple[int, int] | None = None
) -> Iterator[pd.DataFrame]:
    if byte_range is None:
        rows = _json_rows(path, _lines(path, encoding))
    else:  # a part of a JSON Lines file (see jsonl_ranges)
        rows = (_json_row(line) for line in _lines(path, encoding, byte_range) if line.strip())
    for batch in _batched(rows, batch_rows):
        df = pd.DataFrame.from_records([r for r, _ in batch])
        if df.empty:
            df = pd.DataFrame(index=range(len(batch)))
        df[SOURCE] = path
        df[REJECT] = [reason for _, reason in batch]
        yield df


class _TextStream(io.TextIOBase):
    """A read-only text stream over decoded lines (so that pandas reads a file without holding it whole)."""

    def __init__(self, lines: Iterator[str]):
        self._lines = lines
        self._buf = ""

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        parts, have = [self._buf], len(self._buf)
        while size is None or size < 0 or have < size:
            line = next(self._lines, None)
            if line is None:
                break
            parts.append(line)
            have += len(line)
        text = "".join(parts)
        if size is None or size < 0:
            self._buf = ""
            return text
        self._buf = text[size:]
        return text[:size]

    # typeshed's TextIOBase.readline -> str already overrides _IOBase.readline -> bytes under an ignore; mypy
    # checks this override against both
    def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
        if self._buf:
            line, self._buf = self._buf, ""
            return line
        return next(self._lines, "")


def read_csv(path: str, encoding: str = "utf-8", batch_rows: int = 10_000) -> Iterator[pd.DataFrame]:
    sep = "\t" if path.lower().endswith(".tsv") else ","
    reader = pd.read_csv(
        _TextStream(_lines(path, encoding)), sep=sep, dtype=str, keep_default_na=False, chunksize=batch_rows
    )
    with reader:
        for df in reader:
            df[SOURCE] = path
            yield df


def read_parquet(path: str) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    with _open(path) as f:
        pf = pq.ParquetFile(f)
        for rg in range(pf.num_row_groups):
            df = pf.read_row_group(rg).to_pandas()
            df[SOURCE] = path
            yield df


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


def read_source(
    src: SourceFiles,
    txt_mode: TxtMode = "file",
    *,
    encoding: str = "utf-8",
    batch_rows: int = 10_000,
    byte_range: tuple[int, int] | None = None,
) -> Iterator[pd.DataFrame]:
    """Yield raw batches of every file of a source: at most `batch_rows` rows each for text, JSON Lines and CSV
    files (read line by line, decoded strictly with `encoding`), a row group for parquet. Raises StepFailed
    naming the file on unreadable data, and the byte offset of bytes that are not valid `encoding`.
    `byte_range`: read only that part of a source's one JSON Lines file (from `jsonl_ranges`)."""
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
                yield from read_text(path, txt_mode, encoding, batch_rows)
            elif f == "jsonl":
                yield from read_jsonl(path, encoding, batch_rows, byte_range)
            elif f == "parquet":
                yield from read_parquet(path)
            elif f == "csv":
                yield from read_csv(path, encoding, batch_rows)
            else:
                raise StepFailed(
                    f"data.{src.name}: format '{f}' needs a folder written by save_to_disk, not the file {path}"
                )
        except StepFailed:
            raise
        except UnreadableFile as e:
            raise StepFailed(f"data.{src.name}: {e.message}", hint=e.hint) from None
        except Exception as e:  # OSError, pyarrow and pandas parser errors: no common base
            raise StepFailed(
                f"data.{src.name}: cannot read {path} as {f}: {type(e).__name__}: {e}", hint="fix or remove the file"
            ) from None
