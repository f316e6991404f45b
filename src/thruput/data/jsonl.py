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
from thruput.data.sources import FieldError, MalformedRecord, Record, Source, expand_paths

_READ_BLOCK = 1 << 24  # bytes scanned per read while indexing
_INDEX_VERSION = 2  # 2: lines of JSON whitespace only (blank CRLF lines) are not records
_BOM = b"\xef\xbb\xbf"
_JSON_SPACE = np.zeros(256, dtype=bool)
_JSON_SPACE[[9, 10, 13, 32]] = True  # the only whitespace JSON allows: tab, LF, CR, space
_MAX_LISTED_FIELDS = 20


def default_cache_dir() -> Path:
    """Where indexes are cached unless a source is given ``cache_dir``."""
    return Path(tempfile.gettempdir()) / "thruput-index"


def _scan_lines(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, line number) of every line with more than JSON whitespace; ``end`` excludes the LF.

    Lines end at LF, so CRLF files work (JSON ignores the CR); a line of spaces, tabs or a lone CR
    is blank, and a UTF-8 byte-order mark at the start of the file is skipped.
    """
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    filled: list[np.ndarray] = []
    with path.open("rb") as f:
        offset = 3 if f.read(3) == _BOM else 0
        f.seek(offset)
        line_start, line_filled = offset, False  # the line that runs on past the last block
        while block := f.read(_READ_BLOCK):
            data = np.frombuffer(block, dtype=np.uint8)
            newlines = np.flatnonzero(data == 10)
            bounds = np.concatenate([[0], newlines + 1])
            bounds = bounds[bounds < data.size]  # no empty piece after a final LF
            # Per piece between LFs (the LF included): does it hold a byte that is not whitespace?
            # Most pieces start with one ("{") or continue a line that has one; only blocks with
            # other pieces need the full scan.
            piece_filled = ~_JSON_SPACE[data[bounds]]
            piece_filled[0] |= line_filled
            if not piece_filled.all():
                piece_filled = np.logical_or.reduceat(~_JSON_SPACE[data], bounds)
                piece_filled[0] |= line_filled
            if newlines.size:
                starts.append(np.concatenate([[line_start], offset + newlines[:-1] + 1]))
                ends.append(offset + newlines)
                filled.append(piece_filled[: newlines.size])
                line_start, line_filled = offset + int(newlines[-1]) + 1, False
            if bounds.size > newlines.size:  # the block ends inside a line
                line_filled = bool(piece_filled[-1])
            offset += data.size
    if line_start < offset:  # the last line has no final LF
        starts.append(np.array([line_start]))
        ends.append(np.array([offset]))
        filled.append(np.array([line_filled]))
    if not starts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    keep = np.concatenate(filled)
    lines = np.arange(1, keep.size + 1, dtype=np.int64)
    return (np.concatenate(starts).astype(np.int64)[keep], np.concatenate(ends).astype(np.int64)[keep], lines[keep])


class JsonlSource(Source):
    """Records are the JSON objects of one or more JSON Lines files: a path, a glob, a folder or a list.

    A folder stands for its ``*.jsonl`` files, recursively (see ``expand_paths``). Files must be
    uncompressed UTF-8 (a ``.gz`` file is refused: random access needs byte offsets); LF or CRLF
    line ends. Text is the string field ``text_field`` unless a ``transform`` is given. The
    byte-offset index is built once per file, cached under ``cache_dir`` (default:
    ``default_cache_dir()``) and rebuilt when the file's size or modification time changes;
    ``rebuilt_indexes`` counts the files indexed by this instance. Blank lines (whitespace only)
    are not records. A line that is not valid JSON or not an object is malformed; one without a
    string ``text_field`` raises ``FieldError`` listing the fields it has (errors name file and line).
    """

    folder_patterns = ("*.jsonl",)

    def __init__(
        self,
        name: str,
        paths: str | Path | Sequence[str | Path],
        *,
        text_field: str = "text",
        cache_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(name, **kwargs)
        self.paths = expand_paths(name, paths, self.folder_patterns)
        compressed = [p for p in self.paths if p.suffix in (".gz", ".bz2", ".xz", ".zst")]
        if compressed:
            raise DataError(f"source '{name}': file '{compressed[0]}' is compressed; JsonlSource reads "
                            "uncompressed files only (random access needs byte offsets): decompress it")
        self.text_field = text_field
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
        if self.text_field not in record:
            names = list(record)
            listed = ", ".join(names[:_MAX_LISTED_FIELDS]) + (", ..." if len(names) > _MAX_LISTED_FIELDS else "")
            raise FieldError(f"no field '{self.text_field}' (fields: {listed or 'none'})")
        value = record[self.text_field]
        if not isinstance(value, str):
            raise FieldError(f"field '{self.text_field}' is {type(value).__name__}, not a string")
        return value

    def where(self, index: int) -> str:
        return f"file '{self.paths[int(self._file[index])]}' line {int(self._line[index])}"

    def describe(self) -> str:
        return "no records in " + ", ".join(f"'{p}'" for p in self.paths)
