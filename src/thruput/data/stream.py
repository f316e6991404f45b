"""Per-source token streams: the epoch order of records and tokenizing a chunk of it.

Source ``s`` is read as an endless stream: position ``k`` is record ``order(epoch)[k % n]`` with
``epoch = k // n``. The order shuffles the source's blocks, then the records inside each block,
seeded by (seed, crc32(name), epoch); it does not depend on weights, world size or workers, so
a stream position is a complete cursor.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import numpy as np

from thruput.data.sources import MalformedRecord, Source
from thruput.data.tokenize import DocumentTokenizer, Tokenizer


def epoch_order(block_sizes: np.ndarray, seed: int, name: str, epoch: int) -> np.ndarray:
    """Record indices of one epoch: blocks shuffled, then records shuffled inside each block."""
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode()), epoch]))
    starts = np.concatenate([[0], np.cumsum(block_sizes)[:-1]]).astype(np.int64)
    if block_sizes.size == 1:
        return rng.permutation(int(block_sizes[0])).astype(np.int64)
    parts = [starts[b] + rng.permutation(int(block_sizes[b])) for b in rng.permutation(block_sizes.size)]
    return np.concatenate(parts).astype(np.int64)


class StreamOrder:
    """Maps stream positions of one source to (epoch, record index), caching the current epoch."""

    def __init__(self, source: Source, seed: int) -> None:
        self.name = source.name
        self.size = len(source)
        self.blocks = source.block_sizes()
        self.seed = seed
        self._epoch = -1
        self._order = np.zeros(0, dtype=np.int64)

    def record(self, position: int) -> int:
        epoch, i = divmod(position, self.size)
        if epoch != self._epoch:
            self._order = epoch_order(self.blocks, self.seed, self.name, epoch)
            self._epoch = epoch
        return int(self._order[i])


@dataclass
class Chunk:
    """Tokens of ``count`` consecutive stream positions of one source, starting at ``start``.

    ``tokens`` holds all documents back to back (int32); ``lengths[i]`` is document i's token
    count (0 when filtered out or skipped as malformed); ``skipped[i]`` marks skipped records.
    ``cpu_s`` is the preprocessing CPU time spent on the chunk (for autoscaling).
    """

    source: str
    start: int
    records: np.ndarray
    lengths: np.ndarray
    tokens: np.ndarray
    skipped: np.ndarray
    cpu_s: float

    @property
    def count(self) -> int:
        return int(self.records.size)


def tokenize_chunk(source: Source, tokenizer: Tokenizer, order: StreamOrder, start: int, count: int) -> Chunk:
    """Read, filter, transform and tokenize stream positions ``[start, start + count)``.

    ``tokenizer``: the plan's ``document_tokenizer`` (it appends the EOS when the plan has one);
    any other tokenizer is used as it is, without an EOS.

    Raises the source's ``MalformedRecord`` unless ``source.on_error == "skip"``.
    """
    t0 = time.process_time()
    documents = tokenizer if isinstance(tokenizer, DocumentTokenizer) else DocumentTokenizer(tokenizer, None)
    records = np.array([order.record(k) for k in range(start, start + count)], dtype=np.int64)
    arrays: list[np.ndarray] = []
    skipped = np.zeros(count, dtype=bool)
    lengths = np.zeros(count, dtype=np.int64)
    for i, rec in enumerate(records):
        try:
            text = source.text(int(rec))
        except MalformedRecord:
            if source.on_error != "skip":
                raise
            skipped[i] = True
            continue
        if text is None:
            continue
        ids = documents(text)
        arrays.append(ids)
        lengths[i] = ids.size
    tokens = np.concatenate(arrays).astype(np.int32, copy=False) if arrays else np.zeros(0, np.int32)
    return Chunk(source.name, start, records, lengths, tokens, skipped, time.process_time() - t0)
