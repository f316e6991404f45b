"""JSON Lines source with random access through a cached byte-offset index."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from thruput.data.errors import DataError
from thruput.data.sources import MalformedRecord, Record, Source, expand_paths

_READ_BLOCK = 1 << 24  # bytes scanned per read while indexing
_INDEX_VERSION = 1


def default_cache_dir() -> Path:
    """Where indexes are cached unless a source is given ``cache_dir``."""
    return Path(tempfile.gettempdir()) / "thruput-index"


def _scan_lines(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, line number) of every non-blank line; ``end`` excludes the newline."""
    ends: list[np.ndarray] = []
    offset = 0
    with path.open("rb") as f:
        while True:
            block = f.read(_READ_BLOCK)
            if not block:
                break
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10) + offset
            ends.append(newlines)
            offset += len(block)
    ends_arr = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
    if offset and (ends_arr.size == 0 or ends_arr[-1] != offset - 1):
        ends_arr = np.append(ends_arr, offset)  # last line without a trailing newline
    starts_arr = np.concatenate([[0], ends_arr[:-1] + 1]).astype(np.int64) if ends_arr.size else ends_arr
    lines = np.arange(1, ends_arr.size + 1, dtype=np.int64)
    keep = ends_arr - starts_arr > 0
    # A lone "\r" (CRLF files) counts as blank too.
    return starts_arr[keep], ends_arr[keep].astype(np.int64), lines[keep]


class JsonlSource(Source):
    """Records are the JSON objects of one or more ``.jsonl`` files (path, glob or list).

    Text is the string field ``text_key`` unless a ``transform`` is given. The byte-offset index
    is built once per file, cached under ``cache_dir`` (default: ``default_cache_dir()``) and
    rebuilt when the file's size or modification time changes; ``rebuilt_indexes`` counts the
    files indexed by this instance. Blank lines are not records. A line that is not valid JSON,
    not an object, or lacks a string ``text_key`` is malformed (error names file and line).
    """

    def __init__(
        self,
        name: str,
        paths: str | Path | Sequence[str | Path],
        *,
        text_key: str = "text",
        cache_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, **kwargs)
        self.paths = expand_paths(name, paths)
        self.text_key = text_key
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.rebuilt_indexes = 0
        parts = [self._index(path) for path in self.paths]
        self._file = np.concatenate(
            [np.full(len(p[0]), i, dtype=np.int32) for i, p in enumerate(parts)]
        )
        self._start = np.concatenate([p[0] for p in parts])
        self._end = np.concatenate([p[1] for p in parts])
        self._line = np.concatenate([p[2] for p in parts])
        self._handles: dict[int, BinaryIO] = {}
        self._pid = os.getpid()

    def _index(self, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        try:
            stat = path.stat()
            if path.is_dir():
                raise IsADirectoryError(21, "Is a directory")
            with path.open("rb"):
                pass
        except OSError as exc:
            raise DataError(f"source '{self.name}': file '{path}' is not readable: {exc}") from exc
        key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()
        cache = self.cache_dir / f"{key}.npz"
        meta = np.array([_INDEX_VERSION, stat.st_size, stat.st_mtime_ns], dtype=np.int64)
        if cache.exists():
            try:
                with np.load(cache) as z:
                    if np.array_equal(z["meta"], meta):
                        return z["start"], z["end"], z["line"]
            except (OSError, ValueError, KeyError):
                pass  # a corrupt or foreign cache file is simply rebuilt
        start, end, line = _scan_lines(path)
        self.rebuilt_indexes += 1
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, meta=meta, start=start, end=end, line=line)
            os.replace(tmp, cache)  # atomic: concurrent readers never see half a file
        except OSError:
            pass  # caching is an optimisation; an unwritable cache dir only costs a rescan
        return start, end, line

    def __len__(self) -> int:
        return int(self._start.size)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def _handle(self, file_id: int) -> BinaryIO:
        if self._pid != os.getpid():  # forked: never share a file position with the parent
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(file_id)
        if handle is None:
            path = self.paths[file_id]
            try:
                handle = path.open("rb")
            except OSError as exc:
                raise DataError(f"source '{self.name}': file '{path}' is not readable: {exc}") from exc
            self._handles[file_id] = handle
        return handle

    def read(self, index: int) -> Record:
        file_id = int(self._file[index])
        start, end = int(self._start[index]), int(self._end[index])
        handle = self._handle(file_id)
        handle.seek(start)
        raw = handle.read(end - start)
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MalformedRecord(f"source '{self.name}': {self.where(index)}: malformed JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise MalformedRecord(
                f"source '{self.name}': {self.where(index)}: expected a JSON object, got {type(record).__name__}"
            )
        return record

    def default_text(self, record: Record) -> Any:
        value = record.get(self.text_key)
        if not isinstance(value, str):
            raise MalformedRecord(f"no string field '{self.text_key}'")
        return value

    def where(self, index: int) -> str:
        return f"file '{self.paths[int(self._file[index])]}' line {int(self._line[index])}"

    def describe(self) -> str:
        return "no records in " + ", ".join(f"'{p}'" for p in self.paths)
