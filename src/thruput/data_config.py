"""The run config's data section as ``thruput.data`` objects, and the check that runs first.

Source kinds are a registry: a name maps to a ``SourceKind`` that builds the source from its
``SourceConfig``. The data layer's kinds (``jsonl``, ``parquet``, ``text``, ``memory``) are
registered here; a package adds its own with ``register_source_kind`` or, so that a config file
can name them before anything imports the package, an entry point in the group
``thruput.source_kinds`` whose object is a ``SourceKind`` (the demo's ``stdlib_*`` kinds,
``thruput.demo.sources``). ``build_sources`` and ``build_tokenizer`` turn ``RunConfig.data``
into sources and a tokenizer; ``check_data`` opens what they name before training starts, so a
wrong path, field or vocabulary size is a ``ConfigError`` naming its key instead of a failure in
a worker minutes later.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from thruput.config import ConfigError, RunConfig, ScheduleConfig, SourceConfig
from thruput.data import (ByteTokenizer, DataError, FieldError, HFTokenizer, JsonlSource, MalformedRecord,
                          MemorySource, ParquetSource, Source, TextFilesSource)
from thruput.models.kinds import vocab_size

ENTRY_POINT_GROUP = "thruput.source_kinds"
_CHECKED_RECORDS = 8  # records read per file-backed source by check_data


@dataclass(frozen=True)
class SourceKind:
    """How one ``kind`` of ``data.sources`` becomes a source.

    ``build(s, cfg, common)`` returns the ``thruput.data`` source of ``SourceConfig`` ``s`` (``cfg``:
    the ``RunConfig``; ``common``: the ``weight`` and ``on_error`` keywords every source takes).
    ``files``: the kind reads ``path``, which is then required and opened by ``check_data``.
    ``options``: the names and types of the keys it takes in ``options``. ``check(s, cfg, key)``:
    further validation, raising ``ConfigError`` naming a key under ``key`` (``data.sources[i]``)
    or another key of the run.
    """

    build: Callable[[SourceConfig, RunConfig, dict[str, Any]], Source]
    files: bool = False
    options: dict[str, type] = field(default_factory=dict)
    check: Callable[[SourceConfig, RunConfig, str], None] | None = None


_KINDS: dict[str, SourceKind] = {}


def register_source_kind(name: str, kind: SourceKind) -> None:
    """Make ``kind`` buildable as ``data.sources[i].kind = name``; ``ValueError`` if taken."""
    if name in _KINDS and _KINDS[name] is not kind:
        raise ValueError(f"source kind {name!r} is already registered")
    _KINDS[name] = kind


def source_kinds() -> list[str]:
    """Every kind a config may name: the registered ones and the entry points (not imported)."""
    return sorted(set(_KINDS) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def source_kind(name: str, key: str = "kind") -> SourceKind:
    """The registered ``SourceKind`` of ``name``, loading its entry point on first use;
    ``ConfigError`` naming ``key`` and listing the known kinds when there is none."""
    if name not in _KINDS:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            raise ConfigError(f"{key}: unknown source kind {name!r} (known: {', '.join(source_kinds())})")
        kind = found[0].load()
        if not isinstance(kind, SourceKind):
            raise ConfigError(f"{key}: entry point {found[0].value!r} of kind {name!r} is not a SourceKind")
        register_source_kind(name, kind)
    return _KINDS[name]


def check_source(cfg: RunConfig, index: int) -> None:
    """``ConfigError`` naming the key when ``data.sources[index]`` is not a valid source of its
    kind: an unknown kind, a missing ``path``, an option the kind does not take or of a wrong type."""
    s, key = cfg.data.sources[index], f"data.sources[{index}]"
    kind = source_kind(s.kind, f"{key}.kind")
    if kind.files and not s.path:
        raise ConfigError(f"{key}.path: required for kind {s.kind!r}")
    for name, value in s.options.items():
        if name not in kind.options:
            known = ", ".join(sorted(kind.options)) or "none"
            raise ConfigError(f"{key}.options.{name}: not an option of kind {s.kind!r} (its options: {known})")
        want = kind.options[name]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{key}.options.{name}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    if kind.check is not None:
        kind.check(s, cfg, key)


def build_source(cfg: RunConfig, s: SourceConfig) -> Source:
    """One configured source as a ``thruput.data`` source, built by its kind."""
    weight = s.weight.build() if isinstance(s.weight, ScheduleConfig) else s.weight
    return source_kind(s.kind).build(s, cfg, {"weight": weight, "on_error": cfg.data.on_error})


def _memory_check(s: SourceConfig, cfg: RunConfig, key: str) -> None:
    texts = s.options.get("texts")
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ConfigError(f"{key}.options.texts: kind 'memory' needs a non-empty list of strings")


register_source_kind("jsonl", SourceKind(
    lambda s, cfg, common: JsonlSource(s.name, s.path, text_field=s.text_field, **common), files=True))
register_source_kind("parquet", SourceKind(
    lambda s, cfg, common: ParquetSource(s.name, s.path, text_field=s.text_field, **common), files=True))
register_source_kind("text", SourceKind(lambda s, cfg, common: TextFilesSource(s.name, s.path, **common), files=True))
register_source_kind("memory", SourceKind(
    lambda s, cfg, common: MemorySource(s.name, s.options["texts"], **common), options={"texts": list},
    check=_memory_check))


def build_sources(cfg: RunConfig) -> list[Source]:
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
        if not source_kind(s.kind).files:
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
