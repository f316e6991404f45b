"""Data input as documented: folders as paths, line endings, the text field, tokenizer files."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import thruput.data.jsonl as jsonl
from thruput.data import DataError, FieldError, HFTokenizer, JsonlSource, ParquetSource, TextFilesSource


def _tree(root, files: dict[str, str]):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_jsonl_folder_reads_its_jsonl_files_recursively_sorted(tmp_path):
    data = _tree(tmp_path / "web", {
        "b.jsonl": '{"text": "b"}\n',
        "a.jsonl": '{"text": "a1"}\n{"text": "a2"}\n',
        "sub/c.jsonl": '{"text": "c"}\n',
        "notes.txt": "not json",
        "old.jsonl.gz": "not read",
        ".hidden.jsonl": '{"text": "hidden"}\n',
        ".cache/d.jsonl": '{"text": "hidden too"}\n',
    })
    for path in (data, f"{data}/"):
        src = JsonlSource("web", path, cache_dir=tmp_path / "idx")
        assert [p.relative_to(data).as_posix() for p in src.paths] == ["a.jsonl", "b.jsonl", "sub/c.jsonl"]
        assert [src.text(i) for i in range(len(src))] == ["a1", "a2", "b", "c"]


def test_parquet_folder_reads_its_parquet_files(tmp_path):
    (tmp_path / "books" / "part").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["x", "y"]}), tmp_path / "books" / "1.parquet")
    pq.write_table(pa.table({"text": ["z"]}), tmp_path / "books" / "part" / "2.parquet")
    (tmp_path / "books" / "README.md").write_text("not parquet")
    src = ParquetSource("books", tmp_path / "books")
    assert [src.text(i) for i in range(len(src))] == ["x", "y", "z"]


def test_text_folder_reads_txt_and_md_files(tmp_path):
    data = _tree(tmp_path / "docs", {"b.md": "bee", "a.txt": "ay", "deep/c.txt": "see", "x.py": "code", ".d.txt": "hidden"})
    src = TextFilesSource("docs", data)
    assert [src.text(i) for i in range(len(src))] == ["ay", "bee", "see"]
    # Other kinds by glob, as documented.
    assert TextFilesSource("py", str(data / "**" / "*.py")).text(0) == "code"


@pytest.mark.parametrize("make, wanted", [
    (lambda p: JsonlSource("s", p), r"\*\.jsonl"),
    (lambda p: ParquetSource("s", p), r"\*\.parquet"),
    (lambda p: TextFilesSource("s", p), r"\*\.txt or \*\.md"),
])
def test_folder_without_matching_files_is_one_line_error(tmp_path, make, wanted):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "other.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=rf"^source 's': folder '.*empty' holds no files named {wanted} \(searched recursively\)$"):
        make(tmp_path / "empty")


def test_compressed_jsonl_is_refused_not_misread(tmp_path):
    (tmp_path / "a.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(DataError, match=r"a.jsonl.gz' is compressed; .* decompress it"):
        JsonlSource("s", tmp_path / "a.jsonl.gz", cache_dir=tmp_path)


@pytest.mark.parametrize("block", [None, 1, 2, 7])  # index blocks cut lines at every byte too
def test_jsonl_line_endings_blank_lines_and_bom(tmp_path, monkeypatch, block):
    if block:
        monkeypatch.setattr(jsonl, "_READ_BLOCK", block)
    files = {
        "crlf": b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n  \r\n\t\r\n{"text": "c"}\r\n',
        "lf": b'{"text": "a"}\n\n{"text": "b"}\n   \n \t {"text": "c"}\n',  # JSON may follow spaces
        "no_final_newline": b'{"text": "a"}\r\n\r\n{"text": "b"}\n{"text": "c"}',
        "bom": b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n{"text": "c"}',
        "bom_alone": b'\xef\xbb\xbf\r\n{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n',
    }
    lines = {"crlf": [1, 3, 6], "lf": [1, 3, 5], "no_final_newline": [1, 3, 4], "bom": [1, 2, 3], "bom_alone": [2, 3, 4]}
    for name, raw in files.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(raw)
        src = JsonlSource(name, path, cache_dir=tmp_path / f"idx{block}")
        assert [src.text(i) for i in range(len(src))] == ["a", "b", "c"], name
        assert [src.where(i) for i in range(len(src))] == [f"file '{path}' line {n}" for n in lines[name]], name


def test_whitespace_only_file_is_empty(tmp_path):
    (tmp_path / "w.jsonl").write_bytes(b"\r\n  \r\n\t\n")
    with pytest.raises(DataError, match=r"source 'w' is empty"):
        JsonlSource("w", tmp_path / "w.jsonl", cache_dir=tmp_path).check()


def test_missing_text_field_lists_the_fields_there(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "t", "id": 1}) + "\n")
    src = JsonlSource("web", path, text_field="content", cache_dir=tmp_path)
    with pytest.raises(FieldError, match=rf"^source 'web': file '{path}' line 1: no field 'content' \(fields: text, id\)$"):
        src.text(0)
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"body": ["t"], "n": [1]}), p)
    with pytest.raises(FieldError, match=r"^source 'pq': file '.*x.parquet' has no column 'text' \(columns: body, n\)$"):
        ParquetSource("pq", p)
    with pytest.raises(FieldError, match=r"column 'n' is int64, not a string$"):
        ParquetSource("pq", p, text_field="n")
    dictionary = tmp_path / "dict.parquet"
    pq.write_table(pa.table({"text": pa.array(["a", "b", "a"]).dictionary_encode()}), dictionary)
    assert ParquetSource("pq", dictionary).text(2) == "a"


TEXTS = ["hello world, the quick brown fox jumps"] * 50


def test_hf_tokenizer_from_folder_with_eos(tmp_path, bpe):
    tok = bpe(tmp_path / "tok", TEXTS)
    for path in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        hf = HFTokenizer(path)
        assert hf.path == tmp_path / "tok" / "tokenizer.json"
        assert hf.vocab_size == tok.get_vocab_size(with_added_tokens=True)
        assert hf.eos_id == tok.token_to_id("<|endoftext|>") and hf.eos_token == "<|endoftext|>"
        assert hf.encode("hello world").tolist() == tok.encode("hello world").ids


def test_hf_tokenizer_eos_from_config_or_argument_or_none(tmp_path, bpe):
    bpe(tmp_path / "a", TEXTS, special=("[UNK]", "</s>", "<|endoftext|>"))
    assert HFTokenizer(tmp_path / "a").eos_id is None  # two EOS-like tokens: no guess
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    hf = HFTokenizer(tmp_path / "a")
    assert hf.eos_token == "</s>" and hf.eos_id == 1
    assert HFTokenizer(tmp_path / "a", eos_token="[UNK]").eos_id == 0
    with pytest.raises(DataError, match=r"eos token '<eos>' is not in its vocabulary"):
        HFTokenizer(tmp_path / "a", eos_token="<eos>")
    bpe(tmp_path / "b", TEXTS, special=("[UNK]",))
    assert HFTokenizer(tmp_path / "b").eos_id is None


def test_hf_tokenizer_missing_or_corrupt_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^tokenizer file '.*empty/tokenizer.json' does not exist$"):
        HFTokenizer(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    with pytest.raises(DataError) as info:
        HFTokenizer(tmp_path / "bad")
    message = str(info.value)
    assert message.startswith(f"tokenizer file '{tmp_path / 'bad' / 'tokenizer.json'}' could not be loaded: ")
    assert "\n" not in message
