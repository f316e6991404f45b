"""The one protocol between the ``Loader`` and a backend, and the base of the in-process backends.

The ``Loader`` calls ``open(plan, rank, world_size, state)``, then ``batch(step)`` for
consecutive steps from ``state["step"]``; ``close()`` releases everything and ``open`` may be
called again. A batch is numpy arrays (the ``Loader`` makes tensors, pins and copies them) and
comes with the loader state after it; both are built by ``assemble.build_batches`` and
``assemble.loader_state``, whoever runs them. Backends differ only in who tokenizes: the
calling thread (``InlineBackend``), worker processes (``ProcessBackend``), or Ray actors
shared by all ranks (``RayBackend``, which also builds the batches in an actor).
"""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from thruput.data.assemble import StreamReader, build_batches, loader_state, open_readers
from thruput.data.errors import DataError
from thruput.data.plan import Plan
from thruput.data.sources import Source
from thruput.data.stream import Chunk
from thruput.data.tokenize import Tokenizer


@runtime_checkable
class Backend(Protocol):
    def open(self, plan: Plan, rank: int, world_size: int, state: Mapping[str, Any]) -> None:
        """Prepare rank ``rank``'s batches of ``plan`` for ``world_size`` ranks, from ``state``."""
        ...

    def batch(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """This rank's batch of ``step`` (numpy arrays and plain values) and the loader state after it.

        Blocks until ready; raises ``DataError`` when a source fails or a wait exceeds its bound.
        """
        ...

    def stats(self) -> dict[str, Any]:
        """Plain-data figures: ``backend`` (its name), workers per source, CPU seconds per token, ..."""
        ...

    def close(self) -> None:
        """Stop all work and free its resources; idempotent, and wakes a ``batch`` blocked in another thread."""
        ...


class ChunkBackend(ABC):
    """A backend that tokenizes for this process: ``start``/``fetch`` give chunks in stream order,
    and ``open``/``batch`` build this rank's batches from them in the calling thread."""

    def open(self, plan: Plan, rank: int, world_size: int, state: Mapping[str, Any]) -> None:
        self.close()
        positions = {name: int(cursor["position"]) for name, cursor in state["sources"].items()}
        self.start(plan.sources, plan.document_tokenizer, plan.seed, positions)
        self._plan, self._rank, self._world_size = plan, rank, world_size
        self._next_step = int(state["step"])
        self._readers: list[StreamReader] = open_readers(plan, state, lambda name: functools.partial(self.fetch, name))

    def batch(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        if getattr(self, "_readers", None) is None:
            raise DataError(f"{type(self).__name__}: open() must be called before batch()")
        if step != self._next_step:
            raise DataError(f"{type(self).__name__}: asked for step {step}, the next one is {self._next_step}")
        (arrays,) = build_batches(self._plan, self._readers, step, [self._rank], self._world_size)
        self._next_step = step + 1
        return arrays, loader_state(self._plan, self._readers, step + 1)

    def close(self) -> None:
        self._readers = None  # type: ignore[assignment]
        self.stop()

    @abstractmethod
    def start(self, sources: Sequence[Source], tokenizer: Tokenizer, seed: int, positions: Mapping[str, int]) -> None:
        """Begin producing each source's stream from ``positions[name]`` (stops what ran before)."""

    @abstractmethod
    def fetch(self, name: str) -> Chunk:
        """The next chunk of source ``name``, blocking: contiguous, in stream order; ``DataError`` if it failed."""

    @abstractmethod
    def stop(self) -> None:
        """Stop producing chunks and free what that holds; ``start`` may be called again."""

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...
