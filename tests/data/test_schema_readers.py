"""Schemas of the three dataset kinds (with rejection reasons) and the readers for every format."""

from __future__ import annotations

import json

import fsspec
import pandas as pd
import pytest

from kollm.data.readers import SourceFiles, read_source
from kollm.data.schema import canonical_row, to_schema_batch
from kollm.errors import StepFailed


def reasons(rows: list[dict], kind: str) -> list[str]:
    return to_schema_batch(pd.DataFrame(rows), kind)["_reject"].tolist()


def test_corpus_schema():
    assert reasons([{"text": "안녕"}, {"text": ""}, {"text": 3}, {"other": "x"}], "corpus") == [
        "",
        "schema:empty_text",
        "schema:text_not_text",
        "schema:missing_text",
    ]


def test_instructions_chat_and_alpaca_forms():
    chat = {
        "messages": [
            {"role": "system", "content": "친절하게"},
            {"role": "user", "content": "질문"},
            {"role": "assistant", "content": "답"},
        ]
    }
    assert canonical_row(chat, "instructions") == chat
    alpaca = canonical_row(
        {"instruction": "요약해 줘", "input": "긴 글", "output": "요약", "system": "비서"}, "instructions"
    )
    assert alpaca["messages"] == [
        {"role": "system", "content": "비서"},
        {"role": "user", "content": "요약해 줘\n\n긴 글"},
        {"role": "assistant", "content": "요약"},
    ]
    bad = [
        {"messages": [{"role": "user", "content": "질문만"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": ["user"], "content": "x"}, {"role": "assistant", "content": "y"}]},  # unhashable role
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "assistant", "content": "y"}]},
        {"messages": "문자열"},
        {"instruction": "출력 없음"},
        {"foo": 1},
    ]
    assert reasons(bad, "instructions") == [
        "schema:messages_no_assistant_reply",
        "schema:messages_bad_role",
        "schema:messages_bad_role",
        "schema:messages_empty_content",
        "schema:messages_no_user_turn",
        "schema:messages_not_messages",
        "schema:missing_output",
        "schema:missing_messages",
    ]


def test_preferences_plain_chat_and_implicit_prompt():
    plain = canonical_row({"prompt": "수도는?", "chosen": "서울", "rejected": "부산"}, "preferences")
    assert plain == {"prompt": [{"role": "user", "content": "수도는?"}], "chosen": "서울", "rejected": "부산"}
    chat = canonical_row(
        {
            "prompt": [{"role": "user", "content": "수도는?"}],
            "chosen": [{"role": "assistant", "content": "서울"}],
            "rejected": {"role": "assistant", "content": "부산"},
        },
        "preferences",
    )
    assert chat == plain
    implicit = canonical_row(
        {
            "chosen": [{"role": "user", "content": "수도는?"}, {"role": "assistant", "content": "서울"}],
            "rejected": [{"role": "user", "content": "수도는?"}, {"role": "assistant", "content": "부산"}],
        },
        "preferences",
    )
    assert implicit == plain
    assert reasons(
        [
            {"prompt": "q", "chosen": "같음", "rejected": "같음"},
            {"prompt": "q", "chosen": "a"},
            {"prompt": [{"role": "assistant", "content": "a"}], "chosen": "b", "rejected": "c"},
        ],
        "preferences",
    ) == ["schema:chosen_equals_rejected", "schema:missing_rejected", "schema:prompt_not_ending_with_user"]


def test_txt_file_and_paragraph_modes(tmp_path):
    (tmp_path / "a.txt").write_text("첫 문단입니다.\n둘째 줄.\n\n\n둘째 문단입니다.\n", encoding="utf-8")
    src = SourceFiles("c", str(tmp_path), "auto", [str(tmp_path / "a.txt")])
    assert [len(df) for df in read_source(src, "file")] == [1]
    paras = pd.concat(read_source(src, "paragraph"))["text"].tolist()
    assert paras == ["첫 문단입니다.\n둘째 줄.", "둘째 문단입니다.\n"]


def test_jsonl_invalid_lines_become_rejected_rows(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "좋은 줄"}\n{broken\n[1, 2]\n\n{"text": "또 좋은 줄"}\n', encoding="utf-8")
    df = pd.concat(read_source(SourceFiles("d", str(f), "auto", [str(f)])))
    out = to_schema_batch(df, "corpus")
    assert out["_reject"].tolist() == ["", "read:invalid_json", "read:not_an_object", ""]
    assert out["text"][3] == "또 좋은 줄"


def test_parquet_csv_and_hf_folders(tmp_path):
    rows = [{"text": "한국어 문장 하나"}, {"text": "한국어 문장 둘"}]
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame(rows).to_csv(tmp_path / "b.csv", index=False)
    for name in ("a.parquet", "b.csv"):
        df = pd.concat(read_source(SourceFiles("s", str(tmp_path / name), "auto", [str(tmp_path / name)])))
        assert df["text"].tolist() == ["한국어 문장 하나", "한국어 문장 둘"]
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(rows), "test": Dataset.from_list(rows[:1])}).save_to_disk(
        str(tmp_path / "hf")
    )
    files = [str(p) for p in (tmp_path / "hf").rglob("*") if p.is_file()]
    df = pd.concat(read_source(SourceFiles("h", str(tmp_path / "hf"), "auto", files)))
    assert sorted(df["text"]) == sorted(["한국어 문장 하나", "한국어 문장 둘", "한국어 문장 하나"])


def test_chat_columns_survive_parquet(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "질문"}, {"role": "assistant", "content": "답"}]}]
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    df = pd.concat(read_source(SourceFiles("s", "", "parquet", [str(tmp_path / "c.parquet")])))
    assert to_schema_batch(df, "instructions")["messages"][0] == rows[0]["messages"]


def test_fsspec_urls(tmp_path):
    with fsspec.open("memory://kollm-test/data.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": "메모리 파일 시스템"}, ensure_ascii=False) + "\n")
    df = pd.concat(
        read_source(SourceFiles("m", "memory://kollm-test/data.jsonl", "auto", ["memory://kollm-test/data.jsonl"]))
    )
    assert df["text"].tolist() == ["메모리 파일 시스템"]
    (tmp_path / "x.txt").write_text("파일 URL", encoding="utf-8")
    url = f"file://{tmp_path / 'x.txt'}"
    assert pd.concat(read_source(SourceFiles("f", url, "auto", [url])))["text"].tolist() == ["파일 URL"]


def test_unknown_extension_and_broken_file_name_the_file(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(StepFailed, match="format of .*x.bin"):
        list(read_source(SourceFiles("b", str(tmp_path), "auto", [str(tmp_path / "x.bin")])))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(StepFailed, match="bad.parquet"):
        list(read_source(SourceFiles("b", str(tmp_path), "auto", [str(tmp_path / "bad.parquet")])))


def test_non_utf8_files_fail_naming_file_byte_offset_and_fix(tmp_path):
    """An EUC-KR file used to be decoded with replacement characters (every row then `filter:low_hangul_ratio`)."""
    files = {
        "k.jsonl": '{"text": "ok"}\n{"text": "한국어 문장"}\n',
        "k.txt": "ascii first line\n둘째 줄\n",
        "k.csv": "text\nok\n나빠\n",
    }
    for name, text in files.items():
        data = text.encode("cp949")
        with pytest.raises(UnicodeDecodeError) as utf8_error:
            data.decode("utf-8")
        (tmp_path / name).write_bytes(data)
        src = SourceFiles("k", str(tmp_path), "auto", [str(tmp_path / name)])
        with pytest.raises(StepFailed) as err:
            list(read_source(src, "paragraph"))
        assert utf8_error.value.start == text.index(next(c for c in text if ord(c) > 127))
        assert (
            name in err.value.message
            and f"byte {utf8_error.value.start}" in err.value.message
            and "utf-8" in err.value.message
        )
        assert "iconv -f cp949 -t utf-8" in err.value.hint and "encoding: cp949" in err.value.hint
        texts = pd.concat(read_source(src, "file", encoding="cp949"))["text"].tolist()
        assert texts[-1] in ("한국어 문장", "ascii first line\n둘째 줄\n", "나빠"), texts


def test_utf8_bom_is_skipped(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + '{"text": "가"}\n'.encode())
    (tmp_path / "b.csv").write_bytes(b"\xef\xbb\xbf" + "text\n나\n".encode())
    for name, want in (("b.jsonl", "가"), ("b.csv", "나")):
        df = pd.concat(read_source(SourceFiles("b", "", "auto", [str(tmp_path / name)])))
        assert df["text"].tolist() == [want]


def test_text_jsonl_and_csv_are_read_in_batches_of_batch_rows(tmp_path):
    (tmp_path / "p.txt").write_text("\n\n".join(f"문단 {i}" for i in range(5)) + "\n", encoding="utf-8")
    (tmp_path / "r.jsonl").write_text(
        "".join(json.dumps({"text": f"줄 {i}"}, ensure_ascii=False) + "\n" for i in range(5)), encoding="utf-8"
    )
    (tmp_path / "c.csv").write_text("text\n" + "".join(f"칸 {i}\n" for i in range(5)), encoding="utf-8")
    for name in ("p.txt", "r.jsonl", "c.csv"):
        batches = list(read_source(SourceFiles("s", "", "auto", [str(tmp_path / name)]), "paragraph", batch_rows=2))
        assert [len(b) for b in batches] == [2, 2, 1], name
        assert [t.split()[-1] for t in pd.concat(batches)["text"]] == ["0", "1", "2", "3", "4"], name


def test_paragraph_blocks_are_split_as_before(tmp_path):
    """Streaming lines gives exactly the blocks of splitting the whole text on blank lines."""
    import re

    text = "a\r\n \r\n\r\n  \n\nb\n\u3000\nc\n\n\n\n  d\n \t\n"
    (tmp_path / "e.txt").write_bytes(text.encode())
    got = pd.concat(read_source(SourceFiles("e", "", "auto", [str(tmp_path / "e.txt")]), "paragraph", batch_rows=1))[
        "text"
    ].tolist()
    want = [b for b in re.split(r"\n[ \t\u3000]*\n+", text.replace("\r\n", "\n")) if b.strip()]
    assert got == want


def test_jsonl_is_streamed(tmp_path):
    """The first batch comes before the file is complete (a pipe whose writer waits for it)."""
    import os
    import threading

    fifo = tmp_path / "s.jsonl"
    os.mkfifo(fifo)
    got_first, wrote_all = threading.Event(), threading.Event()

    def write() -> None:
        with open(fifo, "w", encoding="utf-8") as f:
            f.write('{"text": "하나"}\n{"text": "둘"}\n')
            f.flush()
            got_first.wait(5)  # a reader of whole files waits for the end of the file: the test then fails
            f.write('{"text": "셋"}\n')
        wrote_all.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    batches = read_source(SourceFiles("s", "", "jsonl", [str(fifo)]), batch_rows=2)
    first = next(batches)
    streamed = not wrote_all.is_set()
    got_first.set()
    rest = list(batches)
    writer.join()
    assert streamed and first["text"].tolist() == ["하나", "둘"] and [b["text"].tolist() for b in rest] == [["셋"]]


def test_json_arrays_are_read_as_rows(tmp_path):
    """KoAlpaca/Alpaca ship one JSON array (pretty-printed); it used to be read as JSON Lines (all invalid_json)."""
    rows = [{"instruction": f"질문 {i}", "input": "", "output": f"답 {i}"} for i in range(5)]
    (tmp_path / "ko_alpaca.json").write_text("\n  " + json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    batches = list(read_source(SourceFiles("a", "", "auto", [str(tmp_path / "ko_alpaca.json")]), batch_rows=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    out = to_schema_batch(pd.concat(batches, ignore_index=True), "instructions")
    assert out["_reject"].tolist() == [""] * 5 and out["messages"][4][1]["content"] == "답 4"
    (tmp_path / "mixed.json").write_text(json.dumps([{"text": "가"}, 3, "x"]), encoding="utf-8")
    df = pd.concat(read_source(SourceFiles("m", "", "auto", [str(tmp_path / "mixed.json")])))
    assert df["_reject"].tolist() == ["", "read:not_an_object", "read:not_an_object"]


def test_json_object_holding_the_rows_under_a_key_is_a_clear_error(tmp_path):
    (tmp_path / "wrapped.json").write_text(
        json.dumps({"version": 1, "data": [{"text": "가"}]}, indent=2), encoding="utf-8"
    )
    with pytest.raises(StepFailed) as err:
        list(read_source(SourceFiles("w", "", "auto", [str(tmp_path / "wrapped.json")])))
    assert "wrapped.json" in err.value.message and "'data'" in err.value.message
    assert "jq -c '.data[]'" in err.value.hint
    (tmp_path / "one.json").write_text(json.dumps({"text": "한 줄"}, indent=2, ensure_ascii=False), encoding="utf-8")
    assert pd.concat(read_source(SourceFiles("o", "", "auto", [str(tmp_path / "one.json")])))["text"].tolist() == [
        "한 줄"
    ]


@pytest.mark.parametrize("encoding", ["utf-8", "cp949"])
def test_jsonl_byte_ranges_read_every_row_once_in_order(tmp_path, encoding):
    """A JSON Lines file read in byte ranges (as worker processes read a large file) gives the rows of one
    whole read: every line once, in order, whatever byte a range starts at."""
    from kollm.data.readers import jsonl_ranges

    lines = [json.dumps({"text": f"{i}번째 문서입니다. " * (i % 7 + 1)}, ensure_ascii=False) for i in range(60)]
    lines[10] = "{not json"
    lines[20] = ""
    body = "\n".join(lines) + "\n"
    data = (b"\xef\xbb\xbf" if encoding == "utf-8" else b"") + body.encode(encoding)
    path = tmp_path / "big.jsonl"
    path.write_bytes(data)
    src = SourceFiles("s", "", "auto", [str(path)])
    whole = pd.concat(read_source(src, encoding=encoding), ignore_index=True)
    assert len(whole) == 59 and whole["_reject"].tolist()[10] == "read:invalid_json"
    for piece in (len(data), 97, 500, 1000, len(data) - 1):
        ranges = jsonl_ranges(str(path), encoding, piece) or [(0, len(data))]
        assert (
            ranges[0][0] == 0 and ranges[-1][1] == len(data) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        )
        parts = [df for r in ranges for df in read_source(src, encoding=encoding, batch_rows=7, byte_range=r)]
        got = pd.concat(parts, ignore_index=True)
        assert got["text"].fillna("").tolist() == whole["text"].fillna("").tolist()
        assert got["_reject"].tolist() == whole["_reject"].tolist()
    assert jsonl_ranges(str(path), encoding, len(data)) is None  # small enough: read whole


def test_json_arrays_and_urls_are_not_cut_into_byte_ranges(tmp_path):
    from kollm.data.readers import jsonl_ranges

    rows = [{"text": f"문서 {i}"} for i in range(50)]
    (tmp_path / "array.json").write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    assert jsonl_ranges(str(tmp_path / "array.json"), "utf-8", 100) is None
    (tmp_path / "one.json").write_text(json.dumps({"text": "가" * 500}, indent=2, ensure_ascii=False), encoding="utf-8")
    assert jsonl_ranges(str(tmp_path / "one.json"), "utf-8", 100) is None
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "\xff"}\n' * 50)
    assert jsonl_ranges(str(tmp_path / "bad.jsonl"), "utf-8", 100) is None  # the whole read reports the bytes
    assert jsonl_ranges("memory://kollm-test/x.jsonl", "utf-8", 100) is None
