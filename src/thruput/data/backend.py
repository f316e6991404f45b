"""The interface between the loader and whatever produces token chunks, and the in-process backend.

A backend turns stream positions of each source into ``Chunk``s. The loader calls ``start`` with
the first position wanted per source, then ``fetch(name)`` repeatedly: chunks of a source must come
back in stream order, contiguous, whatever the number of workers. ``close`` releases everything.
The local process backend lives in ``workers.py``; a Ray backend implements the same protocol.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from thruput.data.sources import Source
from thruput.data.stream import Chunk, StreamOrder, tokenize_chunk
from thruput.data.tokenize import Tokenizer


class Backend(Protocol):
    def start(self, sources: Sequence[Source], tokenizer: Tokenizer, seed: int, positions: Mapping[str, int]) -> None:
        """Begin producing each source's stream from ``positions[name]``."""
        ...

    def fetch(self, name: str) -> Chunk:
        """The next chunk of source ``name``, blocking; raises the worker's ``DataError`` if one failed."""
        ...

    def stats(self) -> dict[str, Any]:
        """Plain-data figures: workers per source, measured CPU seconds per token, ..."""
        ...

    def close(self) -> None:
        """Stop all work and free its resources; ``start`` may be called again afterwards."""
        ...


class InlineBackend:
    """Tokenizes in the calling thread: no processes, for tests, debugging and tiny data."""

    def __init__(self, chunk_docs: int = 32) -> None:
        self.chunk_docs = chunk_docs
        self._state: dict[str, tuple[Source, StreamOrder, int]] = {}
        self._tokenizer: Tokenizer | None = None

    def start(self, sources: Sequence[Source], tokenizer: Tokenizer, seed: int, positions: Mapping[str, int]) -> None:
        self._tokenizer = tokenizer
        self._state = {s.name: (s, StreamOrder(s, seed), int(positions[s.name])) for s in sources}

    def fetch(self, name: str) -> Chunk:
        source, order, position = self._state[name]
        assert self._tokenizer is not None, "start() must be called before fetch()"
        chunk = tokenize_chunk(source, self._tokenizer, order, position, self.chunk_docs)
        self._state[name] = (source, order, position + self.chunk_docs)
        return chunk

    def stats(self) -> dict[str, Any]:
        return {"backend": "inline", "workers": {name: 0 for name in self._state}}

    def close(self) -> None:
        self._state = {}
