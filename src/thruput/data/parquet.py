"""Parquet source: random access that reads one row group at a time."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from thruput.data.errors import DataError
from thruput.data.sources import FieldError, MalformedRecord, Record, Source, expand_paths


_STRING_TYPES = ("string", "large_string", "string_view")


def _check_text_column(name: str, path: Path, schema: Any, column: str) -> None:
    """``FieldError`` unless ``column`` is in ``schema`` with a string type (dictionary-encoded or not)."""
    if column not in schema.names:
        raise FieldError(f"source '{name}': file '{path}' has no column '{column}' "
                         f"(columns: {', '.join(schema.names)})")
    import pyarrow as pa

    kind = schema.field(column).type
    if str(kind.value_type if pa.types.is_dictionary(kind) else kind) not in _STRING_TYPES:
        raise FieldError(f"source '{name}': file '{path}': column '{column}' is {kind}, not a string")


class ParquetSource(Source):
    """Records are the rows of parquet files (a path, a glob, a folder or a list); text is the string
    column ``text_field``.

    A folder stands for its ``*.parquet`` files, recursively (see ``expand_paths``). A file without
    the column, or whose column is not of a string type, raises ``FieldError`` listing the columns
    it has. The index is the files' footers (row counts per row group), read once at construction.
    ``block_sizes()`` returns the row groups, so an epoch visits row groups in a shuffled order
    and reads each one once. A null or non-string value is a malformed record (error names the
    file, row group and row).
    """

    folder_patterns = ("*.parquet",)

    def __init__(
        self,
        name: str,
        paths: str | Path | Sequence[str | Path],
        *,
        text_field: str = "text",
        **kwargs: Any,
    ) -> None:
        import pyarrow.parquet as pq

        super().__init__(name, **kwargs)
        self.paths = expand_paths(name, paths, self.folder_patterns)
        self.text_field = text_field
        groups: list[tuple[int, int, int]] = []  # (file id, row group, rows)
        for file_id, path in enumerate(self.paths):
            try:
                meta = pq.ParquetFile(path).metadata
            except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError)
                raise DataError(f"source '{name}': file '{path}' is not a readable parquet file: {exc}") from exc
            _check_text_column(name, path, meta.schema.to_arrow_schema(), text_field)
            groups.extend((file_id, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
        self._groups = np.array(groups, dtype=np.int64).reshape(-1, 3)
        self._group_start = np.concatenate([[0], np.cumsum(self._groups[:, 2])]).astype(np.int64)
        self._cached: tuple[int, list[Any]] | None = None
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._group_start[-1])

    def block_sizes(self) -> np.ndarray:
        return self._groups[:, 2].copy()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cached"] = None
        return state

    def _locate(self, index: int) -> tuple[int, int]:
        group = int(np.searchsorted(self._group_start, index, side="right") - 1)
        return group, index - int(self._group_start[group])

    def _rows(self, group: int) -> list[Any]:
        if self._pid != os.getpid():
            self._cached, self._pid = None, os.getpid()
        if self._cached is None or self._cached[0] != group:
            import pyarrow.parquet as pq

            file_id, row_group, _ = (int(v) for v in self._groups[group])
            path = self.paths[file_id]
            try:
                table = pq.ParquetFile(path).read_row_group(row_group, columns=[self.text_field])
            except (OSError, ValueError) as exc:
                raise DataError(f"source '{self.name}': file '{path}' is not readable: {exc}") from exc
            self._cached = (group, table.column(0).to_pylist())
        return self._cached[1]

    def read(self, index: int) -> Record:
        group, row = self._locate(index)
        return self._rows(group)[row]

    def default_text(self, record: Record) -> Any:
        if not isinstance(record, str):
            raise MalformedRecord(f"column '{self.text_field}' is {type(record).__name__}, not a string")
        return record

    def where(self, index: int) -> str:
        group, row = self._locate(index)
        file_id, row_group, _ = (int(v) for v in self._groups[group])
        return f"file '{self.paths[file_id]}' row group {row_group} row {row}"

    def describe(self) -> str:
        return "no rows in " + ", ".join(f"'{p}'" for p in self.paths)
