"""Sources, tokenizers, index caching and every source error case."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from thruput.data import (
    ByteTokenizer,
    DataError,
    HFTokenizer,
    JsonlSource,
    MalformedRecord,
    MemorySource,
    ParquetSource,
    TextFilesSource,
    stdlib_corpus,
)
from thruput.data.corpus import docstrings, sections, stdlib_files, stdlib_sections


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_random_access_and_blank_lines(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": f"doc {i}"}) if i != 2 else "" for i in range(6)])
    src = JsonlSource("a", p, cache_dir=tmp_path / "cache")
    assert len(src) == 5  # the blank line is not a record
    assert [src.text(i) for i in (4, 0, 2)] == ["doc 5", "doc 0", "doc 3"]
    assert src.where(2) == f"file '{p}' line 4"


def test_jsonl_without_trailing_newline_and_glob(tmp_path):
    (tmp_path / "x1.jsonl").write_text('{"text": "a"}\n{"text": "b"}')
    (tmp_path / "x2.jsonl").write_text('{"body": "c"}\n')
    src = JsonlSource("x", str(tmp_path / "x*.jsonl"), cache_dir=tmp_path / "c", transform=lambda r: r.get("text", r.get("body")))
    assert [src.text(i) for i in range(len(src))] == ["a", "b", "c"]


def test_jsonl_index_is_cached_and_rebuilt_on_change(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": "x"})] * 3)
    cache = tmp_path / "cache"
    assert JsonlSource("a", p, cache_dir=cache).rebuilt_indexes == 1
    again = JsonlSource("a", p, cache_dir=cache)
    assert again.rebuilt_indexes == 0 and len(again) == 3
    write_jsonl(p, [json.dumps({"text": "y"})] * 5)
    os.utime(p, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = JsonlSource("a", p, cache_dir=cache)
    assert changed.rebuilt_indexes == 1 and len(changed) == 5


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "ok"}', '{"text": "ok"}', '{"text": broken', '{"text": 3}', "[1]"])
    src = JsonlSource("web", p, cache_dir=tmp_path)
    with pytest.raises(MalformedRecord, match=rf"source 'web': file '{p}' line 3: malformed JSON"):
        src.text(2)
    with pytest.raises(MalformedRecord, match=r"line 4: field 'text' is int, not a string"):
        src.text(3)
    with pytest.raises(MalformedRecord, match=r"line 5: expected a JSON object, got list"):
        src.text(4)


def test_missing_file_errors_name_source_and_file(tmp_path):
    with pytest.raises(DataError, match=r"source 'web': no such file or folder '.*nope.jsonl'"):
        JsonlSource("web", tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"source 'pq': no such file or folder '.*nope.parquet'"):
        ParquetSource("pq", tmp_path / "nope.parquet")
    with pytest.raises(DataError, match=r"source 'txt': no files match '.*\*.txt'"):
        TextFilesSource("txt", str(tmp_path / "*.txt"))


def test_unreadable_file_errors(tmp_path):
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"source 'pq': file '.*junk.parquet' is not a readable parquet file"):
        ParquetSource("pq", tmp_path / "junk.parquet")
    f = tmp_path / "gone.txt"
    f.write_text("x")
    src = TextFilesSource("txt", [f])
    f.unlink()
    with pytest.raises(DataError, match=r"source 'txt': file '.*gone.txt' is not readable"):
        src.text(0)


def test_empty_sources(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(DataError, match=r"source 'e' is empty \(no records in '.*empty.jsonl'\)"):
        JsonlSource("e", p, cache_dir=tmp_path).check()
    with pytest.raises(DataError, match=r"source 'm' is empty"):
        MemorySource("m", []).check()


def test_parquet_row_groups(tmp_path):
    p = tmp_path / "d.parquet"
    texts = [f"row {i}" for i in range(10)] + [None]
    pq.write_table(pa.table({"text": texts}), p, row_group_size=4)
    src = ParquetSource("pq", p)
    assert len(src) == 11
    assert src.block_sizes().tolist() == [4, 4, 3]
    assert [src.text(i) for i in (9, 0, 5)] == ["row 9", "row 0", "row 5"]
    with pytest.raises(MalformedRecord, match=rf"source 'pq': file '{p}' row group 2 row 2: column 'text' is NoneType"):
        src.text(10)
    with pytest.raises(DataError, match=r"has no column 'body' \(columns: text\)"):
        ParquetSource("pq", p, text_field="body")


def test_text_files_and_bad_utf8(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_bytes(b"\xff\xfe bad")
    src = TextFilesSource("t", str(tmp_path / "*.txt"))
    assert src.text(0) == "alpha"
    with pytest.raises(MalformedRecord, match=r"source 't': file '.*b.txt': not valid utf-8"):
        src.text(1)


def test_filter_and_transform():
    src = MemorySource("m", ["keep a", "drop b", "keep c"], filter=lambda r: r.startswith("keep"), transform=str.upper)
    assert [src.text(i) for i in range(3)] == ["KEEP A", None, "KEEP C"]
    bad = MemorySource("m", ["x"], transform=lambda r: 1 / 0)
    with pytest.raises(MalformedRecord, match=r"source 'm': record 0: filter/transform failed: ZeroDivisionError"):
        bad.text(0)


def test_byte_tokenizer():
    ids = ByteTokenizer().encode("hé")
    assert ids.dtype == np.int32 and ids.tolist() == [104, 195, 169]


def test_hf_tokenizer_roundtrip_and_errors(tmp_path):
    import pickle

    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    hf = HFTokenizer(path)
    assert hf.vocab_size == 3
    assert hf.encode("hello world zzz").tolist() == [1, 2, 0]
    assert pickle.loads(pickle.dumps(hf)).encode("world").tolist() == [2]
    with pytest.raises(DataError, match="tokenizer file '.*missing.json' does not exist"):
        HFTokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="could not be loaded"):
        HFTokenizer(tmp_path / "bad.json")


def test_stdlib_corpus_code_and_prose():
    code, prose = stdlib_corpus(max_files=20)
    assert code.name == "code" and prose.name == "prose" and len(code) == 20
    text = code.text(0)
    assert isinstance(text, str) and len(text) > 0
    assert docstrings('"""Mod."""\ndef f():\n    """Fn."""\n') == "Mod.\n\nFn."
    assert docstrings("def (") == ""


def test_sections_cut_at_line_ends_and_rejoin():
    assert sections("a\nbb\nccc\n", 6) == ["a\nbb\n", "ccc\n"]
    # An over-long line is cut between characters, never inside a multi-byte one (é is 2 bytes).
    assert sections("a\n" + "é" * 5 + "\n", 4) == ["a\n", "éé", "éé", "é\n"]
    text = stdlib_files(3)[0].read_text(encoding="utf-8")
    parts = sections(text, 257)
    assert "".join(parts) == text and max(len(p.encode()) for p in parts) <= 257
    with pytest.raises(ValueError, match="at least 4"):
        sections("x", 3)


def test_stdlib_sections_cached_jsonl(tmp_path):
    path = stdlib_sections(129, max_files=3, directory=tmp_path)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    modules = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(3)]
    assert texts == [t for m in modules for t in sections(m, 129)]
    assert stdlib_sections(129, max_files=3, directory=tmp_path) == path  # cached, not rewritten
