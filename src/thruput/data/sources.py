"""Sources: one dataset each, with random access by record index.

A source has a ``name``, a ``weight`` (a number or a schedule, see ``thruput.data.mixture``), an
optional ``filter`` (raw record -> keep?) and ``transform`` (raw record -> text or token ids), and
``on_error``: ``"raise"`` (default) stops at the first malformed record with a ``DataError`` naming
the source, file and line; ``"skip"`` drops it and counts it (see ``Loader.skipped``).

Sources are read inside worker processes, so they (and their filter/transform) must survive
``fork`` or pickling; open file handles are never pickled.
"""
from __future__ import annotations

import glob as _glob
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from thruput.data.errors import DataError

Record = Any
Text = "str | np.ndarray"


class MalformedRecord(DataError):
    """A record that cannot be turned into text; skippable with ``on_error="skip"``."""


class FieldError(MalformedRecord):
    """The text field is missing or not a string; the message lists the fields that are there.

    Its own class because it usually means a wrong ``text_field``, not a bad record: the run's
    config check reports it under that key.
    """


class Source:
    """Base class: subclasses implement ``__len__``, ``read`` and ``where``.

    ``folder_patterns``: the file names a folder given as a path stands for (see ``expand_paths``).
    ``weight`` is a float or a ``step -> float`` callable (schedule). ``block_sizes()`` tells the
    shuffler which records are cheap to read together (e.g. parquet row groups): the epoch order
    shuffles blocks, then records within each block.
    """

    folder_patterns: tuple[str, ...] = ()

    def __init__(
        self,
        name: str,
        *,
        weight: float | Callable[[int], float] = 1.0,
        filter: Callable[[Record], bool] | None = None,
        transform: Callable[[Record], Any] | None = None,
        on_error: str = "raise",
    ) -> None:
        if not name or not isinstance(name, str):
            raise DataError(f"source name must be a non-empty string, got {name!r}")
        if on_error not in ("raise", "skip"):
            raise DataError(f"source '{name}': on_error must be 'raise' or 'skip', got {on_error!r}")
        self.name = name
        self.weight = weight
        self.filter = filter
        self.transform = transform
        self.on_error = on_error

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> Record:
        """The raw record at ``index``; ``MalformedRecord`` if it cannot be parsed."""
        raise NotImplementedError

    def where(self, index: int) -> str:
        """Human-readable location of a record, e.g. ``file 'a.jsonl' line 3``."""
        raise NotImplementedError

    def block_sizes(self) -> np.ndarray:
        return np.array([len(self)], dtype=np.int64)

    def default_text(self, record: Record) -> Any:
        """Text of a raw record when no ``transform`` is given."""
        return record

    def text(self, index: int) -> Any:
        """Text (str) or token ids (int array) of record ``index``; ``None`` when filtered out.

        Raises ``MalformedRecord`` naming the source and location when the record is unusable.
        """
        record = self.read(index)
        try:
            if self.filter is not None and not self.filter(record):
                return None
            out = self.transform(record) if self.transform is not None else self.default_text(record)
        except MalformedRecord as exc:
            if str(exc).startswith(f"source '{self.name}'"):
                raise
            raise type(exc)(f"source '{self.name}': {self.where(index)}: {exc}") from exc
        except DataError:
            raise
        except Exception as exc:
            raise MalformedRecord(
                f"source '{self.name}': {self.where(index)}: filter/transform failed: {exc!r}"
            ) from exc
        if isinstance(out, (str, np.ndarray)) or out is None:
            return out
        if isinstance(out, Sequence) and all(isinstance(t, (int, np.integer)) for t in out):
            return np.asarray(out, dtype=np.int32)
        raise MalformedRecord(
            f"source '{self.name}': {self.where(index)}: record text must be str or token ids, "
            f"got {type(out).__name__}"
        )

    def check(self) -> None:
        """Raise ``DataError`` if the source holds no records."""
        if len(self) == 0:
            raise DataError(f"source '{self.name}' is empty ({self.describe()})")

    def describe(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, records={len(self)})"


class MemorySource(Source):
    """Records held in memory: strings, or pre-tokenized integer sequences (used as-is)."""

    def __init__(self, name: str, records: Sequence[Any], **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> Record:
        return self.records[index]

    def where(self, index: int) -> str:
        return f"record {index}"

    def describe(self) -> str:
        return "in-memory, no records"


def expand_paths(name: str, paths: str | Path | Sequence[str | Path], patterns: Sequence[str]) -> list[Path]:
    """Expand a path, glob pattern or folder (or a list of them) into existing files, in order.

    A glob (``**`` recursive) stands for the files it matches, sorted (folders it matches are left
    out). A folder stands for every file under it, recursively, whose name matches one of
    ``patterns`` (e.g. ``("*.jsonl",)``), sorted by path; names starting with ``.`` (hidden files
    and folders) are left out. Raises ``DataError`` naming the source and the path when a plain
    path does not exist, or a glob or folder yields no file.
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[Path] = []
    for item in items:
        text = str(item)
        if _glob.has_magic(text):
            matches = sorted(Path(m) for m in _glob.glob(text, recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"source '{name}': no files match '{text}'")
            out.extend(matches)
            continue
        path = Path(text)
        if path.is_dir():
            if not patterns:
                raise DataError(f"source '{name}': '{path}' is a folder; give its files or a glob")
            found = sorted({f for pattern in patterns for f in path.rglob(pattern)
                            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)})
            if not found:
                wanted = " or ".join(patterns)
                raise DataError(f"source '{name}': folder '{path}' holds no files named {wanted} "
                                "(searched recursively)")
            out.extend(found)
        elif path.exists():
            out.append(path)
        else:
            raise DataError(f"source '{name}': no such file or folder '{path}'")
    if not out:
        raise DataError(f"source '{name}': no files given")
    return out


class TextFilesSource(Source):
    """One document per file: a path, a glob pattern (``**`` recursive), a folder or a list of them.

    A folder stands for its ``*.txt`` and ``*.md`` files, recursively (a glob picks other kinds:
    ``"src/**/*.py"``). Files are decoded as UTF-8 (``encoding``); a file that does not decode is
    a malformed record.
    """

    folder_patterns = ("*.txt", "*.md")

    def __init__(
        self,
        name: str,
        paths: str | Path | Sequence[str | Path],
        *,
        encoding: str = "utf-8",
        **kwargs: Any,
    ) -> None:
        super().__init__(name, **kwargs)
        self.paths = expand_paths(name, paths, self.folder_patterns)
        self.encoding = encoding

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> Record:
        path = self.paths[index]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"source '{self.name}': file '{path}' is not readable: {exc}") from exc
        try:
            return data.decode(self.encoding)
        except UnicodeDecodeError as exc:
            raise MalformedRecord(
                f"source '{self.name}': file '{path}': not valid {self.encoding} ({exc.reason} at byte {exc.start})"
            ) from exc

    def where(self, index: int) -> str:
        return f"file '{self.paths[index]}'"

    def describe(self) -> str:
        return "no files"
