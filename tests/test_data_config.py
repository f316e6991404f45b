"""The config's data section: tokenizer, EOS, and a wrong path or field caught before training."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import thruput.train as train_module
from thruput.config import ConfigError, from_dict
from thruput.data_config import check_data
from thruput.train import build_loader, train

WORDS = ["some words to learn merges from, again and again"] * 30


@pytest.fixture
def data(tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    (web / "x.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 2, "id": i}) + "\n" for i in range(20)))
    pq.write_table(pa.table({"body": [f"row {i} " * 7 for i in range(20)]}), tmp_path / "books.parquet")
    return tmp_path


def _cfg(data, *sources, **data_keys):
    sources = sources or ({"name": "web", "kind": "jsonl", "path": str(data / "web")},)
    return from_dict({"steps": 2, "model": {"d_model": 32, "n_layers": 1, "n_heads": 2},
                      "data": {"seq_len": 32, "batch_size": 2, **data_keys, "sources": list(sources)},
                      "optimizer": {"warmup_steps": 1}, "profile": {"enabled": False}})


@pytest.mark.parametrize("source, message", [
    ({"name": "web", "kind": "jsonl", "path": "{data}/web", "text_field": "content"},
     r"^data.sources\[1\].text_field: source 'web': file '.*x.jsonl' line 1: no field 'content' \(fields: text, id\)$"),
    ({"name": "web", "kind": "jsonl", "path": "{data}/web/*.json"}, r"^data.sources\[1\].path: source 'web': no files match"),
    ({"name": "web", "kind": "jsonl", "path": "{data}/nope"}, r"^data.sources\[1\].path: source 'web': no such file or folder"),
    ({"name": "web", "kind": "text", "path": "{data}/web"}, r"^data.sources\[1\].path: .* holds no files named \*.txt or \*.md"),
    ({"name": "books", "kind": "parquet", "path": "{data}/books.parquet"},
     r"^data.sources\[1\].text_field: source 'books': file .* has no column 'text' \(columns: body\)$"),
])
def test_wrong_path_or_field_is_a_config_error_naming_the_key(data, source, message):
    good = {"name": "ok", "kind": "parquet", "path": str(data / "books.parquet"), "text_field": "body"}
    source = {k: v.format(data=data) for k, v in source.items()}
    with pytest.raises(ConfigError, match=message):
        check_data(_cfg(data, good, source))


def test_skip_mode_tolerates_bad_records_but_not_a_field_none_has(data):
    mixed = data / "mixed.jsonl"
    mixed.write_text('{"id": 1}\n' + json.dumps({"text": "fine"}) + "\n")
    check_data(_cfg(data, {"name": "m", "kind": "jsonl", "path": str(mixed)}, on_error="skip"))
    with pytest.raises(ConfigError, match=r"^data.sources\[0\].text_field: .* line 1: no field 'text'"):
        check_data(_cfg(data, {"name": "m", "kind": "jsonl", "path": str(mixed)}))
    with pytest.raises(ConfigError, match=r"^data.sources\[0\].text_field: .* no field 'body' \(fields: text, id\)$"):
        check_data(_cfg(data, {"name": "w", "kind": "jsonl", "path": str(data / "web"), "text_field": "body"},
                        on_error="skip"))


def test_vocab_size_below_the_tokenizer_and_bad_tokenizer_are_config_errors(data, bpe):
    tok = bpe(data / "tok", WORDS, vocab_size=300)
    n = tok.get_vocab_size(with_added_tokens=True)
    with pytest.raises(ConfigError, match=rf"^model.vocab_size: 256 is smaller than the tokenizer's vocabulary \({n} tokens"):
        check_data(_cfg(data, tokenizer=str(data / "tok")))
    with pytest.raises(ConfigError, match=r"^data.tokenizer: tokenizer file '.*nowhere' does not exist$"):
        check_data(_cfg(data, tokenizer=str(data / "nowhere")))
    with pytest.raises(ConfigError, match=r"^data.eos: true, but the tokenizer \(bytes\) has no EOS token$"):
        check_data(_cfg(data, eos=True))


def test_train_refuses_a_bad_config_before_building_the_model_or_workers(data, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("started although the config is wrong")

    monkeypatch.setattr(train_module, "build_model", never)
    cfg = _cfg(data, {"name": "web", "kind": "jsonl", "path": str(data / "web"), "text_field": "content"})
    with pytest.raises(ConfigError, match=r"data.sources\[0\].text_field"):
        train(cfg, loader_factory=never)


def test_train_with_a_tokenizer_folder_eos_and_a_schedule(data, bpe):
    tok = bpe(data / "tok", WORDS)
    eos = tok.token_to_id("<|endoftext|>")
    sources = ({"name": "web", "kind": "jsonl", "path": str(data / "web"),
                "weight": {"schedule": "linear", "start": 1.0, "end": 0.0, "steps": 4}},
               {"name": "books", "kind": "parquet", "path": str(data), "text_field": "body", "weight": 0.5})
    cfg = _cfg(data, *sources, tokenizer=str(data / "tok"))
    cfg.model.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    loader = build_loader(cfg, 0, 1)
    try:
        assert loader.plan.eos_id == eos and loader.plan.tokenizer.path == data / "tok" / "tokenizer.json"
        assert loader.plan.weights_at(2).tolist() == [0.5, 0.5]  # linear at step 2 of 4, and 0.5
        batch = next(loader)
        assert (batch["input_ids"] == eos).any() and (batch["shift_labels"] == eos).any()
    finally:
        loader.close()
    assert len(train(cfg).losses) == 2


def test_cli_prints_a_bad_data_config_as_one_line(data, capsys):
    from thruput.cli import main

    path = data / "run.toml"
    path.write_text(f'steps = 2\n[[data.sources]]\nname = "web"\nkind = "jsonl"\npath = "{data / "web"}"\n'
                    'text_field = "content"\n')
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("thruput train: data.sources[0].text_field: source 'web': file ")
    assert err.endswith("line 1: no field 'content' (fields: text, id)") and "\n" not in err


def test_an_unknown_source_kind_names_its_key_and_lists_the_known_kinds(data):
    good = {"name": "web", "kind": "jsonl", "path": str(data / "web")}
    with pytest.raises(ConfigError) as err:
        _cfg(data, good, {"name": "x", "kind": "csv", "path": str(data)})
    message = str(err.value)
    assert message.startswith("data.sources[1].kind: unknown source kind 'csv' (known: ")
    # The data layer's kinds and, through their entry points, the demo's.
    for kind in ("jsonl", "memory", "parquet", "text", "stdlib_code", "stdlib_sections"):
        assert kind in message


@pytest.mark.parametrize("source, message", [
    ({"name": "m", "kind": "memory"}, r"^data.sources\[0\].options.texts: kind 'memory' needs a non-empty list"),
    ({"name": "m", "kind": "memory", "options": {"texts": ["a"], "max_files": 3}},
     r"^data.sources\[0\].options.max_files: not an option of kind 'memory' \(its options: texts\)$"),
    ({"name": "c", "kind": "stdlib_code", "options": {"max_files": "all"}},
     r"^data.sources\[0\].options.max_files: expected int, got str 'all'$"),
    ({"name": "c", "kind": "stdlib_code", "options": {"max_files": 0}},
     r"^data.sources\[0\].options.max_files: must be positive, got 0$"),
    ({"name": "w", "kind": "jsonl", "path": "x", "options": {"max_files": 3}},
     r"^data.sources\[0\].options.max_files: not an option of kind 'jsonl' \(its options: none\)$"),
])
def test_a_kinds_options_are_checked_by_the_kind(data, source, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(data, source)


def test_memory_and_registered_kinds_build_through_the_registry(data, monkeypatch):
    from thruput import data_config
    from thruput.data import MemorySource
    from thruput.data_config import SourceKind, build_sources, register_source_kind, source_kinds

    monkeypatch.setattr(data_config, "_KINDS", dict(data_config._KINDS))  # this test's kinds end with it
    texts = ["first document", "second one"]
    cfg = _cfg(data, {"name": "m", "kind": "memory", "options": {"texts": texts}, "weight": 2.0})
    (source,) = build_sources(cfg)
    assert isinstance(source, MemorySource) and source.records == texts and source.weight == 2.0

    built = []

    def upper(s, run_cfg, common):
        built.append((s.name, run_cfg.data.seq_len, common))
        return MemorySource(s.name, [t.upper() for t in s.options["texts"]], **common)

    kind = SourceKind(upper, options={"texts": list})
    register_source_kind("upper_test", kind)
    register_source_kind("upper_test", kind)  # the same kind again: no error
    with pytest.raises(ValueError, match="'upper_test' is already registered"):
        register_source_kind("upper_test", SourceKind(upper))
    assert "upper_test" in source_kinds()
    (source,) = build_sources(_cfg(data, {"name": "u", "kind": "upper_test", "options": {"texts": texts}}))
    assert source.records == ["FIRST DOCUMENT", "SECOND ONE"]
    assert built == [("u", 32, {"weight": 1.0, "on_error": "raise"})]


def test_the_demo_kinds_are_not_in_the_core_config():
    import typing

    from thruput.config import SourceConfig

    assert typing.get_type_hints(SourceConfig)["kind"] is str
    assert not hasattr(SourceConfig, "max_files")


def test_entry_point_kinds_are_listed_without_importing_them_and_load_on_first_use():
    import subprocess
    import sys

    code = ("import sys\n"
            "from thruput.data_config import source_kind, source_kinds\n"
            "assert 'stdlib_sections' in source_kinds() and 'thruput.demo.sources' not in sys.modules\n"
            "from thruput.demo.sources import STDLIB_SECTIONS\n"
            "assert source_kind('stdlib_sections') is STDLIB_SECTIONS\n")
    subprocess.run([sys.executable, "-c", code], check=True)
