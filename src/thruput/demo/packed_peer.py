"""The strongest data peer: padding-free packed rows, mixed by tokens like thruput's plan.

What a 2026 user who cares about throughput writes with torch and transformers: a torch
``DataLoader`` whose batch sampler hands out each source's token quota per step as document
pieces (``QuotaPieces``), collated by transformers' ``DataCollatorWithFlattening``
(``FlattenCollate``: ``position_ids`` restart at every piece, ``-100`` at each piece's start).
``bench loader`` takes one ``[1, tokens]`` row per step; ``bench e2e`` cuts the step into rows of
``seq_len`` (``PackedRows``), each flattened alike, and trains on them with a dense document mask
(the block-diagonal causal mask that transformers builds from such position ids on CPU, where
SDPA has no variable-length kernel).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

Piece = tuple[int, int, int, int]  # (source, record, start token, length)


def step_quotas(weights: Sequence[float], tokens: int) -> np.ndarray:
    """Tokens per source for one step: ``floor(w * tokens)``, the leftover to the largest remainders.

    Each source's count is ``floor`` or ``ceil`` of ``w * tokens``, as in thruput's plan (which
    hands its leftover out by seeded systematic sampling), so the two differ by at most one token
    per source per step, and not at all where every ``w * tokens`` is a whole number.
    """
    exact = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * tokens
    base = np.floor(exact).astype(np.int64)
    leftover = int(tokens - base.sum())
    base[np.lexsort((np.arange(base.size), -(exact - base)))[:leftover]] += 1
    return base


class DocumentCursor:
    """One source's documents in a seeded random order per epoch, handed out as pieces."""

    def __init__(self, lengths: np.ndarray, seed: int, source: int) -> None:
        self.lengths, self.seed, self.source = lengths, seed, source
        self._order = self._records()
        self.record, self.start = next(self._order), 0

    def _records(self) -> Iterator[int]:
        for epoch in itertools.count():
            for r in np.random.default_rng([self.seed, self.source, epoch]).permutation(len(self.lengths)).tolist():
                if self.lengths[r] > 0:
                    yield r

    def take(self, tokens: int, max_piece: int) -> list[Piece]:
        """The next ``tokens`` tokens as ``(source, record, start, length)`` pieces of at most ``max_piece``."""
        pieces = []
        while tokens > 0:
            n = min(tokens, max_piece, int(self.lengths[self.record]) - self.start)
            pieces.append((self.source, self.record, self.start, n))
            self.start += n
            tokens -= n
            if self.start == self.lengths[self.record]:
                self.record, self.start = next(self._order), 0
        return pieces


class QuotaPieces:
    """Batch sampler of the packed peer: per step, each source's token quota as document pieces.

    A step is a list of ``(source, record, start, length)`` pieces of at most ``seq_len`` tokens:
    each source's documents in a seeded random order per epoch, cut where the step's quota ends
    and continued in the next step, the way thruput's plan mixes by tokens. Endless.
    """

    def __init__(self, lengths: Sequence[np.ndarray], weights: Sequence[float], tokens: int, seq_len: int,
                 seed: int) -> None:
        self.lengths, self.quotas, self.seq_len, self.seed = list(lengths), step_quotas(weights, tokens), seq_len, seed

    def __iter__(self) -> Iterator[list[Piece]]:
        cursors = [DocumentCursor(lens, self.seed, s) for s, lens in enumerate(self.lengths)]
        while True:
            yield [p for cursor, quota in zip(cursors, self.quotas) for p in cursor.take(int(quota), self.seq_len)]


class FlattenCollate:
    """transformers' ``DataCollatorWithFlattening`` (one ``[1, tokens]`` row, ``position_ids``
    restarting per piece, ``-100`` labels at each piece's start), plus ``tokens_per_source``."""

    def __init__(self, names: Sequence[str]) -> None:
        from transformers import DataCollatorWithFlattening

        self.names, self.collate = list(names), DataCollatorWithFlattening(return_tensors="pt")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        per_source = dict.fromkeys(self.names, 0)
        for f in features:
            per_source[self.names[f["source"]]] += len(f["input_ids"])
        batch = self.collate([{"input_ids": f["input_ids"]} for f in features])
        batch["tokens_per_source"] = per_source
        return batch


class PackedRows:
    """Batch sampler of ``bench e2e``'s packed peer: ``QuotaPieces`` cut into rows of ``seq_len``.

    Each step's pieces fill ``rows`` rows of exactly ``seq_len`` tokens in order (the quotas sum
    to ``rows * seq_len``); a piece that crosses a row's end is split there, its second part a new
    piece of the next row, as a flattening collator sees it. Yields ``(row, source, record,
    start, length)`` per piece, ``steps`` steps.
    """

    def __init__(self, lengths: Sequence[np.ndarray], weights: Sequence[float], rows: int, seq_len: int,
                 steps: int, seed: int) -> None:
        self.pieces = QuotaPieces(lengths, weights, rows * seq_len, seq_len, seed)
        self.rows, self.seq_len, self.steps = rows, seq_len, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int, int]]]:
        for pieces in itertools.islice(iter(self.pieces), self.steps):
            yield list(self._rows(pieces))

    def _rows(self, pieces: list[Piece]) -> Iterator[tuple[int, int, int, int, int]]:
        row, room = 0, self.seq_len
        for source, record, start, n in pieces:
            while n:
                take = min(n, room)
                yield row, source, record, start, take
                start, n, room = start + take, n - take, room - take
                if not room:
                    row, room = row + 1, self.seq_len


class DocumentPieces(Dataset):
    """One piece ``(row, source, record, start, length)`` of a document's tokens, from a dataset
    with ``tokens(source, record)`` (``padded_peer.ChunkDataset``)."""

    def __init__(self, documents: Any) -> None:
        self.documents = documents

    def __getitem__(self, piece: tuple[int, int, int, int, int]) -> dict[str, Any]:
        row, source, record, start, n = piece
        tokens = self.documents.tokens(source, record)[start:start + n]
        return {"input_ids": tokens.tolist(), "source": source, "row": row}


class RowsCollate:
    """``FlattenCollate`` per row, stacked into ``[rows, seq_len]``: ``input_ids``, ``position_ids``,
    ``shift_labels`` (transformers' ``labels`` moved one left, as ``ForCausalLMLoss`` does, so the
    last token of each row and of each piece has no target), ``cu_seqlens`` of the pieces,
    ``tokens_per_source`` and ``padding_ratio`` (0: every row is full)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names, self.flatten = list(names), FlattenCollate(names)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        from thruput.hf.loss import shifted_targets

        rows = [self.flatten([f for f in features if f["row"] == r]) for r in range(features[-1]["row"] + 1)]
        input_ids = torch.cat([r["input_ids"] for r in rows])
        lengths = [len(f["input_ids"]) for f in features]
        per_source = dict.fromkeys(self.names, 0)
        for r in rows:
            for name, n in r["tokens_per_source"].items():
                per_source[name] += n
        return {"input_ids": input_ids, "position_ids": torch.cat([r["position_ids"] for r in rows]),
                "shift_labels": shifted_targets(torch.cat([r["labels"] for r in rows]), None),
                "cu_seqlens": torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32),
                "tokens_per_source": per_source, "padding_ratio": 1.0 - sum(lengths) / input_ids.numel()}


def packed_rows_loader(documents: Any, lengths: Sequence[np.ndarray], weights: Sequence[float], *, rows: int,
                       seq_len: int, steps: int, seed: int = 0, workers: int = 1) -> DataLoader:
    """``bench e2e``'s packed peer: ``steps`` batches of ``rows`` padding-free rows of ``seq_len``,
    each source's share of tokens ``weights`` (normalised), documents from ``documents``."""
    sampler = PackedRows(lengths, weights, rows, seq_len, steps, seed)
    return DataLoader(DocumentPieces(documents), batch_sampler=sampler, num_workers=workers,
                      collate_fn=RowsCollate(documents.names), persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


def attention_scores(sampler: PackedRows) -> dict[str, int]:
    """Attention scores over the sampler's steps: ``dense`` (each row's T^2, what a dense
    document mask computes), ``per_document`` (each piece's L^2, what the documents need)."""
    dense = per_document = 0
    for step in sampler:
        dense += sampler.rows * sampler.seq_len**2
        per_document += sum(n * n for *_, n in step)
    return {"dense": dense, "per_document": per_document}
