"""`prepare`: raw Korean data -> a clean, deduplicated, PII-masked dataset with a train/eval split.

    - kind: prepare
      name: prepare-corpus
      inputs: {source: corpus}          # a source from the `data:` section
      config:
        dataset: corpus                 # corpus | instructions | preferences (the output's artifact type)
        txt_mode: paragraph             # .txt files: a document per file, or per blank-line block
        filters: {min_chars: 20, min_hangul_ratio: 0.5}
        dedup: {threshold: 0.8}
        pii: {rrn: drop, phone: mask}
        split: {eval_fraction: 0.05}
        gate: {max_rejected_fraction: 0.5, min_train_rows: 100}
        num_proc: 2

Per row, in order (each a pure function over a pandas batch, run in `num_proc` processes, or in `num_proc` Ray Data
tasks under the ray executor):
schema (raw row -> canonical columns) -> Korean normalization -> PII masking -> quality filters -> MinHash
signature. Then, in one process: exact deduplication, near-duplicate removal (MinHash LSH, first occurrence
wins, across all sources), the train/eval split by content hash, and the validation gate. A rejected row is
counted under its reason (`schema:*`, `read:*`, `pii:*`, `filter:*`, `dedup:*`) and shown in the report.

Outputs: `dataset` (train.parquet, eval.parquet, stats.json) and `report` (report.html, stats.json).
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from hashlib import blake2b
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, field_validator

from kollm.data.config import PII_TYPES, DedupConfig, FilterConfig, PiiConfig, TxtMode, check_encoding
from kollm.data.report import ReportData, render
from kollm.data.validate import Counts, GateConfig, check_gate, summary, violations
from kollm.errors import KollmError, StepFailed
from kollm.pipeline.artifacts import file_digest
from kollm.pipeline.step import STRICT, Artifact, InputSpec, StepContext, StepResult, _no_progress

if TYPE_CHECKING:
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np
    import pandas as pd

    from kollm.data.readers import SourceFiles

# numpy, pandas and the stages' modules (kollm.data.dedup, filters, pii, readers, schema) are imported inside the
# functions that run the stages: planning a pipeline and reusing a cached step need only Config and the functions
# up to `references`, and those imports cost seconds (tests/pipeline/test_sqlite_runs.py checks a cached rerun).

KIND = "prepare"


class SplitConfig(BaseModel):
    model_config = STRICT
    eval_fraction: float = Field(
        0.05, ge=0, lt=1, description="Fraction of rows (by content hash) that go to the eval split."
    )
    seed: int = Field(
        0, description="Salt of the split hash; change it to draw a different (still deterministic) split."
    )


class Config(BaseModel):
    model_config = STRICT
    dataset: Literal["corpus", "instructions", "preferences"] = Field(
        "corpus",
        description="The dataset kind to produce (the output's artifact type): corpus (text), "
        "instructions (chat messages), preferences (prompt/chosen/rejected).",
    )
    sources: list[str] = Field(
        default_factory=lambda: ["source"],
        min_length=1,
        description="Names of this step's source inputs (wire each under `inputs:`). Rows of all sources are "
        "prepared together and deduplicated across them.",
    )
    text_field: str = Field(
        "text", description="The column holding the text, for a corpus read from jsonl/parquet/csv/hf."
    )
    txt_mode: TxtMode = Field(
        "file", description=".txt files: `file` (a document per file) or `paragraph` (a document per blank-line block)."
    )
    encoding: str = Field(
        "utf-8",
        description="Encoding of the source's txt, jsonl and csv files, e.g. cp949 or euc-kr for older Korean files "
        "(bytes that are not valid in it fail the step, naming the file and byte offset).",
    )
    normalize: bool = Field(
        True, description="Korean Unicode normalization (NFC, jamo, invisible characters, full-width forms, spaces)."
    )
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Quality filters.")
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Exact and near-duplicate removal.")
    pii: PiiConfig = Field(default_factory=PiiConfig, description="What to do with each kind of personal information.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="The train/eval split.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Limits that fail the step when broken.")
    expectations: str | None = Field(
        None,
        description="A Great Expectations 1.x suite (JSON, relative to kollm.yaml) checked on the train and eval "
        "splits by GX's engine; a failed expectation fails the gate (pip install 'kollm[gx]').",
    )
    num_proc: int = Field(1, ge=1, le=256, description="Processes for the per-row transforms.")
    batch_rows: int = Field(1000, ge=1, description="Rows per batch handed to a process.")
    report_examples: int = Field(5, ge=0, le=100, description="Examples of removed rows per reason in the report.")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v: str) -> str:
        return check_encoding(v)

    @field_validator("sources")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("source input names must be unique")
        return v


def inputs(config: Config) -> dict[str, InputSpec]:
    return {name: InputSpec(("source",), help="a raw data source from the `data:` section") for name in config.sources}


def outputs(config: Config) -> dict[str, str]:
    return {"dataset": config.dataset, "report": "report"}


def code(config: Config) -> tuple[str, ...]:
    return ("kollm.steps.prepare", "kollm.data")


def references(config: Config, project_dir: Path) -> dict[str, str]:
    """The expectation suite's bytes: an edited suite checks the data again instead of coming from the cache."""
    if not config.expectations:
        return {}
    path = project_dir / config.expectations
    return {"expectations": "sha256:" + file_digest(path) if path.is_file() else "missing"}


# --- per batch: pure, runs in worker processes ----------------------------------------------------


@dataclass
class Processed:
    frame: pd.DataFrame  # canonical columns + _source, _reject, _raw, _chars, _hangul_ratio, _exact, _split
    sigs: np.ndarray  # MinHash signatures (rows that are already rejected: zeros)
    pii: Counter[str]
    raw_bytes: int
    cpu_s: float = 0.0  # CPU seconds this batch took in its process


def split_position(key: str, seed: int) -> float:
    """A row's place in [0, 1) from its content: rows below eval_fraction go to eval. Deterministic."""
    h = blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def transform_batch(raw: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """The per-row stages as one pandas batch -> pandas batch function (what Ray Data's `map_batches` runs):
    schema -> normalize -> PII -> quality filters -> exact key, split position and MinHash signature.

    Adds `_bytes` (UTF-8 bytes of the row's texts as read), `_pii_<type>` (values found), `_exact`, `_split`
    and `_minhash` (uint32 signature; empty for rejected rows) to the canonical columns. Pure.
    """
    import numpy as np
    import pandas as pd

    from kollm.data.dedup import exact_key, signatures_batch
    from kollm.data.filters import quality_batch
    from kollm.data.korean import normalize_text
    from kollm.data.pii import pii_batch
    from kollm.data.schema import REJECT, content_text, map_texts, split_key_text, to_schema_batch

    kind = cfg.dataset
    frame = to_schema_batch(raw, kind, cfg.text_field)
    parsed = (frame[REJECT] == "").to_numpy()
    nbytes = np.zeros(len(frame), dtype=np.int64)
    nbytes[parsed] = [len(t.encode("utf-8")) for t in content_text(frame[parsed], kind)]
    if cfg.normalize:
        frame = map_texts(frame, kind, normalize_text)
    frame, per_row = pii_batch(frame, kind, cfg.pii, per_row=True)
    frame = quality_batch(frame, kind, cfg.filters)
    live = (frame[REJECT] == "").to_numpy()
    texts = content_text(frame[live], kind)
    exact = [""] * len(frame)
    split = [0.0] * len(frame)
    for i, text, key in zip(np.flatnonzero(live), texts, split_key_text(frame[live], kind)):
        exact[i] = exact_key(text)
        split[i] = split_position(key, cfg.split.seed)
    frame["_bytes"] = nbytes
    for t in PII_TYPES:
        frame[f"_pii_{t}"] = [c[t] for c in per_row]
    frame["_exact"] = exact
    frame["_split"] = split
    empty = np.zeros(0, dtype=np.uint32)
    sigs: list[np.ndarray] = [empty] * len(frame)
    if (cfg.dedup.near or cfg.split.eval_fraction > 0) and live.any():  # also for the train/eval overlap check
        for i, sig in zip(np.flatnonzero(live), signatures_batch(texts, cfg.dedup)):
            sigs[i] = sig
    frame["_minhash"] = pd.Series(sigs, index=frame.index, dtype=object)
    return frame


# Columns of plain strings, per kind. `process_batch` stores them as Arrow strings: one buffer each, so a
# batch goes to the main process without pickling every string, and Parquet writing does not convert them.
_STRING_COLUMNS = {"corpus": ("text",), "instructions": (), "preferences": ("chosen", "rejected")}


def _arrow_str() -> pd.StringDtype:
    import numpy as np
    import pandas as pd

    return pd.StringDtype("pyarrow", na_value=np.nan)


def process_batch(raw: pd.DataFrame, cfg: Config) -> Processed:
    """`transform_batch`, with the signatures as one array, the PII counts summed and the texts as Arrow
    strings (for the local executor)."""
    import numpy as np

    arrow_str = _arrow_str()
    cpu0 = time.process_time()
    frame = transform_batch(raw, cfg)
    for col in _STRING_COLUMNS[cfg.dataset]:
        frame[col] = frame[col].astype(arrow_str)
    sigs = np.zeros((len(frame), cfg.dedup.num_perm), dtype=np.uint32)
    for i, sig in enumerate(frame.pop("_minhash")):
        if len(sig):
            sigs[i] = sig
    pii = Counter({t: int(frame.pop(f"_pii_{t}").sum()) for t in PII_TYPES})
    raw_bytes = int(frame.pop("_bytes").sum())
    return Processed(frame, sigs, +pii, raw_bytes, time.process_time() - cpu0)


def _process_star(args: tuple[pd.DataFrame, Config]) -> Processed:
    return process_batch(*args)


# --- the whole dataset: one process -----------------------------------------------------------------


@dataclass
class Prepared:
    train: pd.DataFrame
    eval: pd.DataFrame
    counts: Counts
    pii: dict[str, int]
    report: ReportData
    stats: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)


def rechunk(batches: Iterable[pd.DataFrame], rows: int) -> Iterator[pd.DataFrame]:
    for df in batches:
        for start in range(0, len(df), rows):
            yield df.iloc[start : start + rows].reset_index(drop=True)


def _pool(num_proc: int) -> ProcessPoolExecutor:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork (Linux): workers start at once with this process's modules already imported (like `datasets.map`
    # with num_proc). They only run the pure transforms above. Elsewhere: spawn.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(max_workers=num_proc, mp_context=mp.get_context(method))


def run_transforms(batches: Iterable[pd.DataFrame], cfg: Config, progress=_no_progress) -> Iterator[Processed]:
    """The per-row transforms over all batches, in order, in `cfg.num_proc` processes."""
    chunks = rechunk(batches, cfg.batch_rows)
    if cfg.num_proc == 1:
        yield from progress((process_batch(c, cfg) for c in chunks), description="prepare: transform")
        return
    with _pool(cfg.num_proc) as pool:
        results = pool.map(_process_star, zip(chunks, repeat(cfg)), chunksize=1)
        yield from progress(results, description=f"prepare: transform ({cfg.num_proc} processes)")


def _example(row: pd.Series, kind: str) -> str:
    import pandas as pd

    from kollm.data.pii import mask_text
    from kollm.data.schema import REJECT, content_text

    if row[REJECT].startswith(("schema:", "read:")):
        text = row.get("_raw") or ""
    else:
        text = content_text(pd.DataFrame([row]), kind)[0]
    text = mask_text(text)
    return text if len(text) <= 300 else text[:300] + " …"


def _read(src: SourceFiles, cfg: Config, byte_range: tuple[int, int] | None = None) -> Iterator[pd.DataFrame]:
    from kollm.data.readers import read_source

    return read_source(src, cfg.txt_mode, encoding=cfg.encoding, batch_rows=cfg.batch_rows, byte_range=byte_range)


Task = tuple["SourceFiles", tuple[int, int] | None]  # one file of a source, or a byte range of a JSON Lines file

MIN_PIECE_BYTES = 1 << 20


def file_tasks(sources: list[SourceFiles], cfg: Config) -> list[Task]:
    """What the worker processes read, in order: each file of each source, with local JSON Lines files cut into
    byte ranges so there are about 16 tasks per process, and smaller ones for the last eighth of the bytes (the
    processes then finish close together: the last task is short)."""
    from kollm.data.readers import SourceFiles, file_format, jsonl_ranges

    files = [(s, f) for s in sources for f in s.files]
    sizes = [os.path.getsize(f) if "://" not in f and os.path.isfile(f) else 0 for _, f in files]
    total = sum(sizes)
    piece = max(MIN_PIECE_BYTES, total // (16 * cfg.num_proc))
    tasks: list[Task] = []
    done = 0
    for (s, f), size in zip(files, sizes):
        one = SourceFiles(s.name, s.uri, s.format, [f])
        fmt = s.format if s.format != "auto" else file_format(f)
        tail = done + size > total * 7 // 8
        ranges = jsonl_ranges(f, cfg.encoding, piece // 4 if tail else piece) if fmt == "jsonl" else None
        tasks += [(one, r) for r in ranges] if ranges else [(one, None)]
        done += size
    return tasks


def _process_file(task: tuple[Task, Config]) -> list[Processed]:
    """Read one file (or byte range) of a source and transform its batches (in a worker process). The batches
    go back as one: fewer, larger results cost the main process less to receive and settle."""
    import numpy as np
    import pandas as pd

    (src, byte_range), cfg = task
    cpu0 = time.process_time()
    results = [process_batch(chunk, cfg) for chunk in rechunk(_read(src, cfg, byte_range), cfg.batch_rows)]
    if len(results) > 1:
        pii = sum((r.pii for r in results), Counter())
        results = [
            Processed(
                pd.concat([r.frame for r in results], ignore_index=True),
                np.concatenate([r.sigs for r in results]),
                pii,
                sum(r.raw_bytes for r in results),
            )
        ]
    if results:  # count the reading too
        results[0].cpu_s = time.process_time() - cpu0
    return results


def prepare_sources(
    sources: list[SourceFiles], cfg: Config, *, step: str = "prepare", progress=_no_progress, executor: str = "local"
) -> Prepared:
    """Read, transform, deduplicate and split every source. With several processes and enough files (or large
    enough JSON Lines files, read in byte ranges), each worker reads its own parts (reading and parsing then
    run in parallel too); otherwise this process reads and hands out batches. Either way rows arrive in
    source and file order, so the result is the same. `executor="ray"`: the reading and per-row stages run as
    Ray Data tasks (see `prepare_sources_ray`), with the same result."""
    from kollm.data.readers import is_hf_source

    if executor == "ray":
        return prepare_sources_ray(sources, cfg, step=step, progress=progress)
    if cfg.num_proc > 1 and not any(is_hf_source(s) for s in sources):
        tasks = file_tasks(sources, cfg)
        if len(tasks) >= 2 * cfg.num_proc:

            def per_file() -> Iterator[Processed]:
                with _pool(cfg.num_proc) as pool:
                    for results in progress(
                        pool.map(_process_file, zip(tasks, repeat(cfg))),
                        total=len(tasks),
                        description=f"prepare: read and transform ({cfg.num_proc} processes)",
                    ):
                        yield from results

            return _prepare(per_file(), cfg, step)

    def batches() -> Iterator[pd.DataFrame]:
        for src in sources:
            yield from _read(src, cfg)

    return prepare_batches(batches(), cfg, step=step, progress=progress)


# --- on Ray Data -------------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise KollmError("the ray executor needs Ray, which is not installed here: pip install 'kollm[ray]'") from None
    return ray


def ray_tasks(sources: list[SourceFiles], cfg: Config) -> list[Task]:
    """The parts Ray Data tasks read, in order: `file_tasks` per source; a Hugging Face folder as one part."""
    from kollm.data.readers import is_hf_source

    return [t for s in sources for t in ([(s, None)] if is_hf_source(s) else file_tasks([s], cfg))]


def _ray_process_parts(batch: pd.DataFrame, parts: list[Task], cfg: Config) -> Iterator[pd.DataFrame]:
    """Ray Data `map_batches` function (in a Ray worker): read each part named in the batch and run the
    per-row stages over its pandas batches (`process_batch`). The results go back pickled, one row per part,
    so the driver gets exactly the frames, signatures and dtypes the local path gets."""
    import pandas as pd

    for i in batch["part"].tolist():
        results = _process_file((parts[int(i)], cfg))
        yield pd.DataFrame({"part": [int(i)], "processed": [pickle.dumps(results, protocol=5)]})


def prepare_sources_ray(
    sources: list[SourceFiles], cfg: Config, *, step: str = "prepare", progress=_no_progress
) -> Prepared:
    """`prepare_sources` on Ray Data: every file (or byte range of a JSON Lines file) of every source is one
    row of a Ray Dataset; `map_batches` reads it and runs the per-row stages in a pool of `cfg.num_proc` Ray
    tasks, in order (`preserve_order`); this process deduplicates, splits and checks the gate as the results
    stream in. Same rows kept, same split, same Parquet bytes as the local path."""
    ray = _import_ray()
    from ray.data import TaskPoolStrategy

    parts = ray_tasks(sources, cfg)
    ds = ray.data.from_items([{"part": i} for i in range(len(parts))], override_num_blocks=max(1, len(parts)))
    ds = ds.map_batches(
        _ray_process_parts,
        batch_size=1,
        batch_format="pandas",
        compute=TaskPoolStrategy(size=max(1, min(cfg.num_proc, len(parts)))),
        num_cpus=1,
        fn_kwargs={"parts": parts, "cfg": cfg},
    )
    ds.context.execution_options.preserve_order = True
    ds.context.enable_progress_bars = False
    ds.context.print_on_execution_start = False

    def processed() -> Iterator[Processed]:
        try:
            for batch in progress(
                ds.iter_batches(batch_size=None, batch_format="pandas"),
                total=len(parts),
                description=f"prepare: read and transform (Ray Data, {cfg.num_proc} tasks)",
            ):
                for blob in batch["processed"].tolist():
                    yield from pickle.loads(blob)
        except Exception as e:  # a task's error comes back wrapped (RayTaskError(StepFailed), with a traceback)
            cause = _kollm_cause(e)
            if cause is None:
                raise
            # Ray Data appends its retry advice to the exception's text: show the step's own message only
            cause.args = (cause.message if cause.hint is None else f"{cause.message}\n  hint: {cause.hint}",)
            raise cause from None

    return _prepare(processed(), cfg, step)


def _kollm_cause(e: BaseException | None) -> KollmError | None:
    """The KollmError (an unreadable file, ...) that a Ray task raised, from the exceptions wrapped around it."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KollmError) and type(e).__module__.startswith("kollm."):
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None


def prepare_batches(
    batches: Iterable[pd.DataFrame], cfg: Config, *, step: str = "prepare", progress=_no_progress
) -> Prepared:
    """Run every stage over raw batches and split. Does not check the gate (see `check_gate`)."""
    return _prepare(run_transforms(batches, cfg, progress), cfg, step)


def _prepare(processed: Iterable[Processed], cfg: Config, step: str) -> Prepared:
    import numpy as np
    import pandas as pd

    from kollm.data.dedup import NearDupIndex
    from kollm.data.filters import TEXT_STAT_COLUMNS, text_stats
    from kollm.data.schema import COLUMNS, REJECT, SOURCE

    kind = cfg.dataset
    t0 = time.perf_counter()
    cpu_main0 = time.process_time()
    pii: Counter[str] = Counter()
    raw_bytes, worker_cpu, total = 0, 0.0, 0
    out_cols = list(COLUMNS[kind])
    # Deduplicate batch by batch as they arrive (in order), and set each batch's kept rows aside by split, so
    # this work overlaps the workers' transforms and little is left once the last batch is in.
    # The first occurrence wins; kept rows never near-duplicate each other (MinHash LSH, across every
    # source), so no eval row can have a near-duplicate in train. Without near-dedup the split is settled at
    # the end (eval rows that near-duplicate train rows move to train).
    split_now = cfg.dedup.near or cfg.split.eval_fraction == 0
    train_parts: list[pd.DataFrame] = []
    eval_parts: list[pd.DataFrame] = []
    kept_parts: list[pd.DataFrame] = []  # when the split waits for the end
    eval_flags: list[np.ndarray] = []
    kept_sigs: list[np.ndarray] = []
    rejected_parts: list[pd.DataFrame] = []
    chars_parts: list[np.ndarray] = []
    hangul_parts: list[np.ndarray] = []
    text_parts: list[np.ndarray] = []  # TEXT_STAT_COLUMNS of kept rows (words, sentences, morphemes)
    paths: Counter[str] = Counter()
    seen: set[str] = set()
    index = NearDupIndex.from_config(cfg.dedup) if cfg.dedup.near else None
    t_dedup = 0.0
    for p in processed:
        t1 = time.perf_counter()
        frame = p.frame
        reasons = frame[REJECT].tolist()
        exact = frame["_exact"].tolist()
        for i in [i for i, r in enumerate(reasons) if not r]:
            key = exact[i]
            if key in seen:
                if cfg.dedup.exact:
                    reasons[i] = "dedup:exact"
                    continue
            else:
                seen.add(key)
            if index is not None and index.match_or_add(total + i, p.sigs[i]) is not None:
                reasons[i] = "dedup:near"
        t_dedup += time.perf_counter() - t1
        live = np.array([not r for r in reasons], dtype=bool)
        kept_at = np.flatnonzero(live)
        if not live.all():
            frame[REJECT] = reasons
            rejected_parts.append(frame.take(np.flatnonzero(~live)))
        is_eval = frame["_split"].to_numpy()[kept_at] < cfg.split.eval_fraction
        if split_now:
            train_parts.append(_rows(frame, out_cols, kept_at[~is_eval]))
            eval_parts.append(_rows(frame, out_cols, kept_at[is_eval]))
        else:
            kept_parts.append(_rows(frame, out_cols, kept_at))
            eval_flags.append(is_eval)
            kept_sigs.append(p.sigs[kept_at])
        chars_parts.append(frame["_chars"].to_numpy()[kept_at])
        hangul_parts.append(frame["_hangul_ratio"].to_numpy()[kept_at])
        text_parts.append(frame[list(TEXT_STAT_COLUMNS)].to_numpy()[kept_at])
        paths.update(frame[SOURCE].tolist())
        pii.update(p.pii)
        raw_bytes += p.raw_bytes
        worker_cpu += p.cpu_s
        total += len(frame)
    t_transform = time.perf_counter() - t0

    def concat(parts: list[pd.DataFrame], cols: list[str]) -> pd.DataFrame:
        return (
            pd.concat(parts, ignore_index=True)
            if parts
            else pd.DataFrame({c: pd.Series([], dtype=object) for c in cols})
        )

    moved = 0
    if split_now:
        train, eval_ = concat(train_parts, out_cols), concat(eval_parts, out_cols)
    else:
        kept_all = concat(kept_parts, out_cols)
        is_eval = np.concatenate(eval_flags) if eval_flags else np.zeros(0, dtype=bool)
        if is_eval.any():
            moved = _decontaminate(np.concatenate(kept_sigs), is_eval, cfg)
        train, eval_ = kept_all.take(np.flatnonzero(~is_eval)), kept_all.take(np.flatnonzero(is_eval))

    rejected = concat(rejected_parts, [*out_cols, SOURCE, REJECT, "_raw"])
    if "_raw" not in rejected.columns:
        rejected["_raw"] = None
    counts = Counts(total=total, train=len(train), eval=len(eval_), reasons=dict(Counter(rejected[REJECT])))
    examples: dict[str, list[str]] = {}
    if cfg.report_examples:
        for reason, group in rejected.groupby(REJECT, sort=True):
            examples[str(reason)] = [_example(row, kind) for _, row in group.head(cfg.report_examples).iterrows()]
    sources: dict[str, int] = {}
    for path, n in paths.items():
        label = _source_label(path)
        sources[label] = sources.get(label, 0) + n
    chars = np.concatenate(chars_parts) if chars_parts else np.zeros(0, dtype=np.int64)
    hangul = pd.Series(np.concatenate(hangul_parts) if hangul_parts else np.zeros(0), dtype=float)
    text_counts = np.concatenate(text_parts) if text_parts else np.zeros((0, len(TEXT_STAT_COLUMNS)), dtype=np.int64)
    text = text_stats(text_counts, cfg.filters.tokenizer)
    report = ReportData(
        step=step,
        kind=kind,
        counts=counts,
        pii_found={t: pii.get(t, 0) for t in PII_TYPES},
        chars=chars.tolist(),
        hangul_ratios=hangul.tolist(),
        examples=examples,
        sources=sources,
        sentences=text_counts[:, 1].tolist(),
        morphemes=text_counts[:, 2].tolist() if cfg.filters.tokenizer == "kiwi" else [],
        text_stats=text,
    )
    elapsed = time.perf_counter() - t0
    stats = {
        "dataset": kind,
        "columns": list(COLUMNS[kind]),
        "rows_read": counts.total,
        "rows_kept": counts.kept,
        "train_rows": counts.train,
        "eval_rows": counts.eval,
        "rows_rejected": counts.rejected,
        "rejected_fraction": counts.rejected / counts.total if counts.total else 0.0,
        "rejected_by_reason": dict(sorted(counts.reasons.items())),
        "pii_found": report.pii_found,
        "rows_per_source": sources,
        "eval_moved_to_train": moved,
        "chars_mean": float(chars.mean()) if len(chars) else 0.0,
        "chars_p50": float(np.percentile(chars, 50)) if len(chars) else 0.0,
        "chars_p95": float(np.percentile(chars, 95)) if len(chars) else 0.0,
        "hangul_ratio_mean": float(hangul.mean()) if len(hangul) else 0.0,
        "input_text_mb": raw_bytes / 1e6,
        **text,  # tokenizer, words and sentences per row; with kiwi, morphemes and parts of speech
    }
    # Timings stay out of stats.json, so the same data gives the same artifact digest.
    timing = {
        "seconds_total": elapsed,
        "seconds_transform": t_transform,
        "seconds_dedup": t_dedup,
        # CPU seconds of the main process, and of the per-row transforms wherever they ran (in-process when num_proc=1)
        "cpu_seconds_main": time.process_time() - cpu_main0,
        "cpu_seconds_transforms": worker_cpu,
        "mb_per_s": raw_bytes / 1e6 / elapsed if elapsed else 0.0,
    }
    return Prepared(
        train=train.reset_index(drop=True),
        eval=eval_.reset_index(drop=True),
        counts=counts,
        pii=report.pii_found,
        report=report,
        stats=stats,
        timing=timing,
    )


def _rows(frame: pd.DataFrame, cols: list[str], at: np.ndarray) -> pd.DataFrame:
    """The rows at these positions, of these columns (column by column: cheaper than DataFrame.take for a
    few columns)."""
    import pandas as pd

    return pd.DataFrame({c: frame[c].array.take(at) for c in cols})


def _decontaminate(sigs: np.ndarray, is_eval: np.ndarray, cfg: Config) -> int:
    """Without near-dedup, move every eval row that near-duplicates a train row into train (and then the eval
    rows that near-duplicate a moved one). Changes `is_eval` in place; returns how many rows moved."""
    import numpy as np

    from kollm.data.dedup import NearDupIndex

    index = NearDupIndex.from_config(cfg.dedup)
    for e in np.flatnonzero(is_eval):
        index.add(int(e), sigs[e])
    queue = [int(i) for i in np.flatnonzero(~is_eval)]
    moved = 0
    while queue:
        i = queue.pop()
        while (j := index.match(sigs[i])) is not None:
            index.remove(j)
            is_eval[j] = False
            queue.append(j)
            moved += 1
    return moved


def _source_label(path: str) -> str:
    return str(path).rsplit("/", 1)[-1] if path else "?"


# --- writing ----------------------------------------------------------------------------------------


def arrow_schema(kind: str):
    import pyarrow as pa

    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    fields = {
        "corpus": [("text", pa.string())],
        "instructions": [("messages", message)],
        "preferences": [("prompt", message), ("chosen", pa.string()), ("rejected", pa.string())],
    }[kind]
    return pa.schema(fields)


def write_parquet(df: pd.DataFrame, path: Path, kind: str) -> None:
    """Write atomically (a temp file, then rename) with the agreed column types, even for 0 rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # One chunk per column: the file's bytes then do not depend on how the rows were batched.
    table = pa.Table.from_pandas(df, schema=arrow_schema(kind), preserve_index=False).combine_chunks()
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _metric_name(reason: str) -> str:
    return reason.replace(":", ".")


# --- the step ---------------------------------------------------------------------------------------


def _check_expectations(ctx: StepContext, cfg: Config, prepared: Prepared) -> tuple[list[str], str]:
    """Run the GX suite on the train and eval splits; a summary goes into the report, failed expectations into
    the gate's failures. Returns those failures and GX's results as JSON ({split: result})."""
    if not cfg.expectations:
        return [], ""
    from kollm.data.expectations import describe, validate_splits

    where = f"steps.{ctx.name}.config.expectations"
    frames = {"train": prepared.train, "eval": prepared.eval}
    results = validate_splits(ctx.project_dir / cfg.expectations, frames, where)
    failed = []
    for r in results:
        lines = [describe(x) for x in r.failed()]
        prepared.report.expectations.append((r.split, r.success, lines))
        failed += [f"config.expectations ({r.split}): {line}" for line in lines]
    prepared.report.failed += failed
    ctx.tracker.log_metrics({f"expectations.{r.split}.failed": float(len(r.failed())) for r in results})
    return failed, json.dumps({r.split: r.result for r in results}, ensure_ascii=False, indent=2, default=str)


def run(ctx: StepContext) -> StepResult:
    from kollm.data.readers import SourceFiles
    from kollm.data.schema import COLUMNS

    cfg: Config = ctx.config
    # The runner's source artifacts (pipeline.spec.resolve_source) always carry these four keys.
    metas = [ctx.inputs[n].meta for n in cfg.sources]
    sources = [SourceFiles(name=m["name"], uri=m["uri"], format=m["format"], files=list(m["files"])) for m in metas]
    ctx.log.info("prepare %s: %s from %s", ctx.name, cfg.dataset, ", ".join(s.uri for s in sources))

    prepared = prepare_sources(sources, cfg, step=ctx.name, progress=ctx.progress, executor=ctx.executor)
    counts = prepared.counts
    broken = violations(counts, cfg.gate)
    prepared.report.failed = [f"config.gate.{limit}: {msg}" for limit, msg in broken]
    gx_failed, gx_json = _check_expectations(ctx, cfg, prepared)
    html = render(prepared.report)

    metrics = {
        k: float(prepared.stats[k])
        for k in (
            "rows_read",
            "rows_kept",
            "train_rows",
            "eval_rows",
            "rows_rejected",
            "rejected_fraction",
            "chars_mean",
            "hangul_ratio_mean",
            "eval_moved_to_train",
        )
    }
    metrics |= {
        k: float(prepared.stats[k])
        for k in ("sentences_mean", "morphemes_mean", "morphemes_per_word")
        if k in prepared.stats
    }
    metrics |= {f"rejected.{_metric_name(r)}": float(n) for r, n in counts.reasons.items()}
    metrics |= {f"pii.{t}": float(n) for t, n in prepared.pii.items()}
    ctx.tracker.log_metrics({**metrics, **{f"timing.{k}": v for k, v in prepared.timing.items()}})

    if broken or gx_failed:
        failed_report = ctx.logs_dir("system") / f"prepare-{ctx.name}-report.html"
        _write_text(failed_report, html)
        ctx.tracker.log_artifact(failed_report, "prepare")
        if gx_json:
            _write_text(failed_report.with_name(f"prepare-{ctx.name}-expectations.json"), gx_json)
        check_gate(counts, cfg.gate, ctx.name, str(failed_report))
        raise StepFailed(
            f"prepare step '{ctx.name}': the validation gate failed:\n"
            + "\n".join(f"    {line}" for line in gx_failed)
            + f"\n  report with GX's results: {failed_report}",
            hint=f"fix the data or the suite {cfg.expectations}",
        )

    data_dir = ctx.output_path("dataset")
    write_parquet(prepared.train, data_dir / "train.parquet", cfg.dataset)
    write_parquet(prepared.eval, data_dir / "eval.parquet", cfg.dataset)
    stats_text = json.dumps(prepared.stats, ensure_ascii=False, indent=2)
    _write_text(data_dir / "stats.json", stats_text)
    report_dir = ctx.output_path("report")
    _write_text(report_dir / "report.html", html)
    _write_text(report_dir / "stats.json", stats_text)
    ctx.tracker.log_artifact(data_dir / "stats.json", "prepare")
    ctx.tracker.log_artifact(report_dir / "report.html", "prepare")
    if gx_json:
        _write_text(report_dir / "expectations.json", gx_json)
        ctx.tracker.log_artifact(report_dir / "expectations.json", "prepare")

    for name in cfg.sources:
        ctx.tracker.log_dataset(ctx.inputs[name], name=f"{ctx.name}/{name}", context="source")
    for split, frame in (("train", prepared.train), ("eval", prepared.eval)):
        path = data_dir / f"{split}.parquet"
        ctx.tracker.log_dataset(
            Artifact(
                cfg.dataset,
                Path(f"{ctx.name}/dataset/{split}.parquet"),
                "sha256:" + file_digest(path),
                {"rows": len(frame), "split": split},
            ),
            name=f"{ctx.name}/{split}",
            context=split,
        )
    ctx.log.info(summary(counts, f"prepare step '{ctx.name}' finished"))
    if counts.eval == 0 and prepared.stats["eval_moved_to_train"]:
        ctx.log.warning(
            "prepare step '%s': the eval split is empty: all %d rows drawn for it near-duplicate train rows and were moved "
            "to train (no leakage); use more varied data or `dedup: {near: true}` to drop the duplicates instead",
            ctx.name,
            prepared.stats["eval_moved_to_train"],
        )
    meta = {
        "rows": counts.kept,
        "train_rows": counts.train,
        "eval_rows": counts.eval,
        "rows_read": counts.total,
        "rows_rejected": counts.rejected,
        "rejected_by_reason": dict(sorted(counts.reasons.items())),
        "columns": list(COLUMNS[cfg.dataset]),
        "pii_found": prepared.pii,
    }
    return StepResult(
        metrics=metrics, meta={"dataset": meta, "report": {"rows_read": counts.total, "rows_kept": counts.kept}}
    )
