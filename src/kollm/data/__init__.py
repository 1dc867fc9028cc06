"""Data preparation: pure functions over pandas batches (the same code runs under Ray Data).

korean.py (normalization), schema.py (the three dataset kinds), pii.py (masking), filters.py (quality),
dedup.py (exact and MinHash LSH), readers.py (txt, jsonl, parquet, csv, hf, fsspec URLs), validate.py (the
gate), report.py (HTML). The `prepare` step (kollm.steps.prepare) runs them in order.
"""
