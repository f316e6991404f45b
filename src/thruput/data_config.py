"""The run config's data section as ``thruput.data`` objects, and the check that runs first.

``build_sources`` and ``build_tokenizer`` turn ``RunConfig.data`` into sources and a tokenizer;
``check_data`` opens what they name before training starts, so a wrong path, field or vocabulary
size is a ``ConfigError`` naming its key instead of a failure in a worker minutes later.
"""
from __future__ import annotations

from typing import Any

from thruput.config import ConfigError, RunConfig, ScheduleConfig, SourceConfig
from thruput.data import (ByteTokenizer, DataError, FieldError, HFTokenizer, JsonlSource, MalformedRecord,
                          ParquetSource, TextFilesSource)
from thruput.data.corpus import default_corpus_dir, docstrings, stdlib_definitions, stdlib_files, stdlib_sections
from thruput.models.kinds import vocab_size

FILE_KINDS = ("jsonl", "parquet", "text")
_CHECKED_RECORDS = 8  # records read per file-backed source by check_data


def build_source(cfg: RunConfig, s: SourceConfig) -> Any:
    """One configured source as a ``thruput.data`` source (the stdlib kinds need no files)."""
    weight = s.weight.build() if isinstance(s.weight, ScheduleConfig) else s.weight
    common = {"weight": weight, "on_error": cfg.data.on_error}
    if s.kind == "stdlib_code":
        return TextFilesSource(s.name, stdlib_files(s.max_files), **common)
    if s.kind == "stdlib_prose":
        return TextFilesSource(s.name, stdlib_files(s.max_files), transform=docstrings, **common)
    if s.kind == "stdlib_long":
        # The largest modules: long documents that packing must split across rows.
        files = sorted(stdlib_files(), key=lambda p: (-p.stat().st_size, str(p)))[: s.max_files or 64]
        return TextFilesSource(s.name, sorted(files), **common)
    if s.kind == "stdlib_sections":
        # Modules cut at line ends into sections of one row each (seq_len + 1 byte tokens).
        path = stdlib_sections(cfg.data.seq_len + 1, s.max_files, directory=default_corpus_dir(cfg.cache_dir))
        return JsonlSource(s.name, path, **common)
    if s.kind in ("stdlib_functions", "stdlib_docstrings"):
        paths = stdlib_definitions(s.max_files, directory=default_corpus_dir(cfg.cache_dir))
        return JsonlSource(s.name, paths[s.kind.removeprefix("stdlib_")], **common)
    if s.kind == "jsonl":
        return JsonlSource(s.name, s.path, text_field=s.text_field, **common)
    if s.kind == "parquet":
        return ParquetSource(s.name, s.path, text_field=s.text_field, **common)
    return TextFilesSource(s.name, s.path, **common)


def build_sources(cfg: RunConfig) -> list:
    """The configured sources as ``thruput.data`` sources."""
    return [build_source(cfg, s) for s in cfg.data.sources]


def build_tokenizer(cfg: RunConfig) -> Any:
    """``data.tokenizer`` (a tokenizer.json or a folder holding one), or UTF-8 bytes;
    ``ConfigError`` naming ``data.tokenizer`` when it cannot be loaded."""
    if cfg.data.tokenizer is None:
        return ByteTokenizer()
    try:
        return HFTokenizer(cfg.data.tokenizer)
    except DataError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None


def check_data(cfg: RunConfig) -> None:
    """Catch a wrong data config before anything heavy starts, as a ``ConfigError`` naming the key.

    Loads the tokenizer (``data.tokenizer``), compares its vocabulary with the model's
    and ``data.eos``, then opens every file-backed source (``data.sources[i].path``: missing
    files, empty folders and globs, unreadable or empty files) and reads its first records
    (``data.sources[i].text_field``: a field or column that is not there). With
    ``on_error = "raise"`` any malformed record among those read is an error; with ``"skip"``
    only a text field that none of them has.
    """
    tokenizer = build_tokenizer(cfg)
    where = f"'{cfg.data.tokenizer}'" if cfg.data.tokenizer else "bytes"
    key, vocab = vocab_size(cfg.model)
    if vocab < tokenizer.vocab_size:
        raise ConfigError(f"{key}: {vocab} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size} tokens, {where})")
    if cfg.data.eos and getattr(tokenizer, "eos_id", None) is None:
        raise ConfigError(f"data.eos: true, but the tokenizer ({where}) has no EOS token")
    for i, s in enumerate(cfg.data.sources):
        if s.kind not in FILE_KINDS:
            continue
        key = f"data.sources[{i}]"
        try:
            source = build_source(cfg, s)
            source.check()  # no records at all
        except FieldError as exc:
            raise ConfigError(f"{key}.text_field: {exc}") from None
        except DataError as exc:
            raise ConfigError(f"{key}.path: {exc}") from None
        _check_first_records(source, key, cfg.data.on_error)


def _check_first_records(source: Any, key: str, on_error: str) -> None:
    count = min(len(source), _CHECKED_RECORDS)
    errors: list[MalformedRecord] = []
    for index in range(count):
        try:
            source.text(index)
        except MalformedRecord as exc:
            if on_error == "raise":
                raise ConfigError(f"{key}.{'text_field' if isinstance(exc, FieldError) else 'path'}: {exc}") from None
            errors.append(exc)
        except DataError as exc:  # a file that cannot be read at all
            raise ConfigError(f"{key}.path: {exc}") from None
    if count and len(errors) == count and all(isinstance(e, FieldError) for e in errors):
        raise ConfigError(f"{key}.text_field: {errors[0]}")
