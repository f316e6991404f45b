"""Packing document pieces into fixed-length rows.

A segment is ``(piece, offset, length)``: ``length`` tokens of piece ``piece`` starting at
``offset``. Packers return one list of segments per row; a row's unused tail is padding.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from thruput.data.errors import DataError

Segment = tuple[int, int, int]


def pack_best_fit(segments: Sequence[Segment], n_rows: int, seq_len: int) -> list[list[Segment]]:
    """Best-fit decreasing into ``n_rows`` rows of ``seq_len``, splitting only when nothing fits.

    Longest segment first (ties by input order) into the row with the least room that still
    holds it whole; when no row does, it fills the roomiest row and the rest goes on. With
    ``sum(lengths) == n_rows * seq_len`` every row is exactly full.
    """
    total = sum(s[2] for s in segments)
    if total > n_rows * seq_len:
        raise DataError(f"{total} tokens do not fit in {n_rows} rows of {seq_len}")
    free = np.full(n_rows, seq_len, dtype=np.int64)
    rows: list[list[Segment]] = [[] for _ in range(n_rows)]
    order = sorted(range(len(segments)), key=lambda i: (-segments[i][2], i))
    for i in order:
        piece, offset, left = segments[i]
        while left > 0:
            fits = free >= left
            if fits.any():
                r = int(np.argmin(np.where(fits, free, np.iinfo(np.int64).max)))
                take = left
            else:
                r = int(np.argmax(free))
                take = int(free[r])
            rows[r].append((piece, offset, take))
            free[r] -= take
            offset += take
            left -= take
    return rows


def pack_in_order(segments: Sequence[Segment], n_rows: int, seq_len: int) -> list[list[Segment]]:
    """Concatenate segments in order and cut into rows; padding only at the tail of the last row."""
    rows: list[list[Segment]] = [[]]
    room = seq_len
    for piece, offset, left in segments:
        while left > 0:
            if room == 0:
                rows.append([])
                room = seq_len
            take = min(left, room)
            rows[-1].append((piece, offset, take))
            room -= take
            offset += take
            left -= take
    if len(rows) > n_rows:
        raise DataError(f"segments need {len(rows)} rows of {seq_len}, only {n_rows} available")
    rows.extend([] for _ in range(n_rows - len(rows)))
    return rows


def one_per_row(segments: Sequence[Segment], seq_len: int) -> list[list[Segment]]:
    """No packing: each segment (at most ``seq_len`` long) alone in a row, padded."""
    for s in segments:
        if s[2] > seq_len:
            raise DataError(f"segment of {s[2]} tokens is longer than seq_len {seq_len}")
    return [[s] for s in segments]
