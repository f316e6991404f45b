"""Parquet source: random access that reads one row group at a time."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from thruput.data.errors import DataError
from thruput.data.sources import MalformedRecord, Record, Source, expand_paths


class ParquetSource(Source):
    """Records are the rows of one or more parquet files; text is the string column ``text_column``.

    The index is the files' footers (row counts per row group), read once at construction.
    ``block_sizes()`` returns the row groups, so an epoch visits row groups in a shuffled order
    and reads each one once. A null or non-string value is a malformed record (error names the
    file, row group and row).
    """

    def __init__(
        self,
        name: str,
        paths: str | Path | Sequence[str | Path],
        *,
        text_column: str = "text",
        **kwargs: Any,
    ) -> None:
        import pyarrow.parquet as pq

        super().__init__(name, **kwargs)
        self.paths = expand_paths(name, paths)
        self.text_column = text_column
        groups: list[tuple[int, int, int]] = []  # (file id, row group, rows)
        for file_id, path in enumerate(self.paths):
            try:
                meta = pq.ParquetFile(path).metadata
            except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError)
                raise DataError(f"source '{name}': file '{path}' is not a readable parquet file: {exc}") from exc
            if text_column not in meta.schema.names:
                raise DataError(f"source '{name}': file '{path}' has no column '{text_column}'")
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
                table = pq.ParquetFile(path).read_row_group(row_group, columns=[self.text_column])
            except (OSError, ValueError) as exc:
                raise DataError(f"source '{self.name}': file '{path}' is not readable: {exc}") from exc
            self._cached = (group, table.column(0).to_pylist())
        return self._cached[1]

    def read(self, index: int) -> Record:
        group, row = self._locate(index)
        return self._rows(group)[row]

    def default_text(self, record: Record) -> Any:
        if not isinstance(record, str):
            raise MalformedRecord(f"column '{self.text_column}' is {type(record).__name__}, not a string")
        return record

    def where(self, index: int) -> str:
        group, row = self._locate(index)
        file_id, row_group, _ = (int(v) for v in self._groups[group])
        return f"file '{self.paths[file_id]}' row group {row_group} row {row}"

    def describe(self) -> str:
        return "no rows in " + ", ".join(f"'{p}'" for p in self.paths)
