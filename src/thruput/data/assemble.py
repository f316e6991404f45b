"""Turning per-source token streams into one rank's batch for one step.

``StreamReader`` consumes one source's chunks in order and hands out document pieces; its
cursor (stream position, token offset inside that document, skipped count) is all the state.
``build_rows`` mixes the step's pieces, balances them over ranks and packs this rank's rows;
``collate`` makes the tensors.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from thruput.data.balance import assign_pieces, lpt_equal_count
from thruput.data.errors import DataError
from thruput.data.pack import Segment, one_per_row, pack_best_fit, pack_in_order
from thruput.data.plan import Plan
from thruput.data.stream import Chunk
from thruput.labels import IGNORE_INDEX


@dataclass
class Piece:
    """``tokens`` of one document from ``offset``; ``next_token`` follows them (-100 at the document's end)."""

    source: int
    epoch: int
    record: int
    offset: int
    tokens: np.ndarray
    next_token: int


class StreamReader:
    """Consumes one source's chunks in stream order; ``fetch()`` returns the next chunk."""

    def __init__(self, name: str, size: int, fetch: Callable[[], Chunk], position: int, offset: int, skipped: int):
        self.name, self.size, self._fetch = name, size, fetch
        self.position, self.offset, self.skipped = position, offset, skipped
        self._docs: deque[tuple[int, int, np.ndarray, bool]] = deque()  # (position, record, tokens, skipped)
        self._next_position = position

    def state(self) -> dict[str, int]:
        return {"position": self.position, "offset": self.offset, "skipped": self.skipped}

    def current(self) -> tuple[int, np.ndarray]:
        """Record and tokens of the document at the cursor, skipping empty ones."""
        empty_run = 0
        while True:
            while not self._docs:
                chunk = self._fetch()
                if chunk.start != self._next_position:
                    raise RuntimeError(f"source '{self.name}': backend sent position {chunk.start}, expected {self._next_position}")
                ends = np.cumsum(chunk.lengths)
                for i in range(chunk.count):
                    toks = chunk.tokens[ends[i] - chunk.lengths[i] : ends[i]]
                    self._docs.append((chunk.start + i, int(chunk.records[i]), toks, bool(chunk.skipped[i])))
                self._next_position += chunk.count
            pos, record, toks, skipped = self._docs[0]
            assert pos == self.position
            if self.offset < toks.size:
                return record, toks
            if self.offset == 0:  # an empty document: filtered out or skipped as malformed
                self.skipped += int(skipped)
                empty_run += 1
                if empty_run > self.size:
                    raise DataError(f"source '{self.name}' produced no tokens in a whole epoch (all records filtered or skipped)")
            self._docs.popleft()
            self.position += 1
            self.offset = 0

    def take(self, n: int, max_piece: int, source_index: int) -> list[Piece]:
        """The next ``n`` tokens as pieces of at most ``max_piece`` tokens each."""
        pieces = []
        while n > 0:
            record, toks = self.current()
            take = min(n, max_piece, toks.size - self.offset)
            end = self.offset + take
            nxt = int(toks[end]) if end < toks.size else IGNORE_INDEX
            pieces.append(Piece(source_index, self.position // self.size, record, self.offset, toks[self.offset : end], nxt))
            self.offset = end
            n -= take
            if end == toks.size:
                self._docs.popleft()
                self.position += 1
                self.offset = 0
        return pieces


def mix(plan: Plan, readers: list[StreamReader], step: int) -> list[Piece]:
    """The step's pieces from all sources, in source order: a pure function of cursors and step."""
    pieces: list[Piece] = []
    for i, (reader, quota) in enumerate(zip(readers, plan.quotas(step))):
        if plan.packing:
            pieces.extend(reader.take(int(quota), plan.seq_len, i))
        else:
            for _ in range(int(quota)):  # one row: up to seq_len tokens of one document
                record, toks = reader.current()
                pieces.extend(reader.take(min(plan.seq_len, toks.size - reader.offset), plan.seq_len, i))
    return pieces


def rank_rows(plan: Plan, pieces: list[Piece], rank: int, world_size: int) -> list[list[Segment]]:
    """This rank's rows. Every rank computes the same global split, so none is lost or duplicated."""
    rows_per_rank = plan.rows_per_step // world_size
    lengths = [p.tokens.size for p in pieces]
    segments = [(i, 0, n) for i, n in enumerate(lengths)]
    if plan.packing:
        if plan.balance == "lpt":
            mine = assign_pieces(lengths, world_size, rows_per_rank * plan.seq_len, plan.cost)[rank]
            return pack_best_fit(mine, rows_per_rank, plan.seq_len)
        rows = pack_in_order(segments, plan.rows_per_step, plan.seq_len)
        return rows[rank * rows_per_rank : (rank + 1) * rows_per_rank]
    rows = one_per_row(segments, plan.seq_len)
    if plan.balance == "lpt":
        chosen = lpt_equal_count([plan.cost.cost([n]) for n in lengths], world_size)[rank]
    else:
        chosen = list(range(rank * rows_per_rank, (rank + 1) * rows_per_rank))
    return [rows[i] for i in chosen]


def collate(plan: Plan, pieces: list[Piece], rows: list[list[Segment]], step: int) -> dict[str, Any]:
    """Tensors for ``rows``: see ``Loader`` for the meaning of every key."""
    import torch  # here, not at the top: Ray's constructor actors build batches without torch

    arrays = collate_arrays(plan, pieces, rows, step)
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}


def collate_arrays(plan: Plan, pieces: list[Piece], rows: list[list[Segment]], step: int) -> dict[str, Any]:
    """``collate`` with numpy arrays instead of tensors."""
    T = plan.seq_len
    B = len(rows)
    input_ids = np.zeros((B, T), dtype=np.int64)
    labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, T), dtype=np.int64)
    segment_ids = np.zeros((B, T), dtype=np.int32)
    cu = [0]
    per_source = np.zeros(len(plan.sources), dtype=np.int64)
    documents = []
    for b, row in enumerate(rows):
        t = 0
        for piece_id, off, n in row:
            p = pieces[piece_id]
            input_ids[b, t : t + n] = p.tokens[off : off + n]
            labels[b, t : t + n - 1] = p.tokens[off + 1 : off + n]
            labels[b, t + n - 1] = p.tokens[off + n] if off + n < p.tokens.size else p.next_token
            # A piece of a split document continues its positions: a continuation, not a new start.
            position_ids[b, t : t + n] = np.arange(p.offset + off, p.offset + off + n)
            segment_ids[b, t : t + n] = len(cu) - 1
            per_source[p.source] += n
            documents.append((plan.sources[p.source].name, p.epoch, p.record, p.offset + off, n))
            t += n
            cu.append(b * T + t)
        if t < T:  # padding: its own segment so attention never mixes it with a document
            position_ids[b, t:] = np.arange(T - t)
            segment_ids[b, t:] = len(cu) - 1
            cu.append((b + 1) * T)
    seqlens = np.diff(cu)
    used = int(per_source.sum())
    return {
        "input_ids": input_ids,
        "shift_labels": labels,
        "position_ids": position_ids,
        "segment_ids": segment_ids,
        "cu_seqlens": np.asarray(cu, dtype=np.int32),
        "max_seqlen": int(seqlens.max()) if seqlens.size else 0,
        "tokens_per_source": {s.name: int(n) for s, n in zip(plan.sources, per_source)},
        "padding_ratio": 1.0 - used / (B * T) if B else 0.0,
        "documents": documents,
        "step": step,
    }
