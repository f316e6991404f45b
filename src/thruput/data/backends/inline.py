"""The inline backend: tokenizes in the calling thread; no processes, for tests, debugging and tiny data."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from thruput.data.backends.base import ChunkBackend
from thruput.data.backends.options import BackendOptions
from thruput.data.sources import Source
from thruput.data.stream import Chunk, StreamOrder, tokenize_chunk
from thruput.data.tokenize import Tokenizer


class InlineBackend(ChunkBackend):
    """Reads and tokenizes ``chunk_docs`` documents at a time in the thread that asks for a batch.

    ``InlineBackend(chunk_docs=8)`` or ``InlineBackend(BackendOptions(...))``; it reads only
    ``chunk_docs`` (``DataError`` for any other option set).
    """

    READS = ("chunk_docs",)

    def __init__(self, options: BackendOptions | Mapping[str, Any] | None = None, **fields: Any) -> None:
        self.options = BackendOptions.of(options, **fields).check_for("inline", self.READS)
        self._state: dict[str, tuple[Source, StreamOrder, int]] = {}
        self._tokenizer: Tokenizer | None = None

    def start(self, sources: Sequence[Source], tokenizer: Tokenizer, seed: int, positions: Mapping[str, int]) -> None:
        self._tokenizer = tokenizer
        self._state = {s.name: (s, StreamOrder(s, seed), int(positions[s.name])) for s in sources}

    def fetch(self, name: str) -> Chunk:
        source, order, position = self._state[name]
        assert self._tokenizer is not None, "start() must be called before fetch()"
        chunk = tokenize_chunk(source, self._tokenizer, order, position, self.options.chunk_docs)
        self._state[name] = (source, order, position + self.options.chunk_docs)
        return chunk

    def stats(self) -> dict[str, Any]:
        return {"backend": "inline", "workers": {name: 0 for name in self._state}}

    def stop(self) -> None:
        self._state = {}
