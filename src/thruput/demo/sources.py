"""The demo's source kinds: corpora made from this Python's standard library, no files needed.

Registered as entry points of the group ``thruput.source_kinds`` (pyproject.toml), so a run
config names them like any other kind. Each takes the option ``max_files`` (the first N sorted
standard-library modules; default: all, ``stdlib_long``: the 64 largest).

* ``stdlib_code``: one module per document; ``stdlib_prose``: its docstrings as one document;
  ``stdlib_long``: the largest modules, long documents that packing must split across rows.
* ``stdlib_sections``: modules cut at line ends into sections of one row (``seq_len + 1`` bytes).
* ``stdlib_functions``, ``stdlib_docstrings``: one function or class, or one docstring, per document.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from thruput.config import ConfigError, RunConfig, SourceConfig
from thruput.data import JsonlSource, Source, TextFilesSource
from thruput.data.corpus import default_corpus_dir, docstrings, stdlib_definitions, stdlib_files, stdlib_sections
from thruput.data_config import SourceKind

_OPTIONS = {"max_files": int}


def _check_max_files(s: SourceConfig, cfg: RunConfig, key: str) -> None:
    if s.options.get("max_files", 1) <= 0:
        raise ConfigError(f"{key}.options.max_files: must be positive, got {s.options['max_files']}")


def _code(s: SourceConfig, cfg: RunConfig, common: dict[str, Any]) -> Source:
    return TextFilesSource(s.name, stdlib_files(s.options.get("max_files")), **common)


def _prose(s: SourceConfig, cfg: RunConfig, common: dict[str, Any]) -> Source:
    return TextFilesSource(s.name, stdlib_files(s.options.get("max_files")), transform=docstrings, **common)


def _long(s: SourceConfig, cfg: RunConfig, common: dict[str, Any]) -> Source:
    files = sorted(stdlib_files(), key=lambda p: (-p.stat().st_size, str(p)))[: s.options.get("max_files") or 64]
    return TextFilesSource(s.name, sorted(files), **common)


def _sections(s: SourceConfig, cfg: RunConfig, common: dict[str, Any]) -> Source:
    path = stdlib_sections(cfg.data.seq_len + 1, s.options.get("max_files"), directory=default_corpus_dir(cfg.cache_dir))
    return JsonlSource(s.name, path, **common)


def _check_sections(s: SourceConfig, cfg: RunConfig, key: str) -> None:
    _check_max_files(s, cfg, key)
    if cfg.data.seq_len < 3:
        raise ConfigError(f"data.seq_len: kind 'stdlib_sections' ({key}) cuts modules into rows of "
                          f"seq_len + 1 >= 4 bytes, got seq_len {cfg.data.seq_len}")


def _definitions(part: str) -> Callable[[SourceConfig, RunConfig, dict[str, Any]], Source]:
    def build(s: SourceConfig, cfg: RunConfig, common: dict[str, Any]) -> Source:
        paths = stdlib_definitions(s.options.get("max_files"), directory=default_corpus_dir(cfg.cache_dir))
        return JsonlSource(s.name, paths[part], **common)

    return build


STDLIB_CODE = SourceKind(_code, options=_OPTIONS, check=_check_max_files)
STDLIB_PROSE = SourceKind(_prose, options=_OPTIONS, check=_check_max_files)
STDLIB_LONG = SourceKind(_long, options=_OPTIONS, check=_check_max_files)
STDLIB_SECTIONS = SourceKind(_sections, options=_OPTIONS, check=_check_sections)
STDLIB_FUNCTIONS = SourceKind(_definitions("functions"), options=_OPTIONS, check=_check_max_files)
STDLIB_DOCSTRINGS = SourceKind(_definitions("docstrings"), options=_OPTIONS, check=_check_max_files)
