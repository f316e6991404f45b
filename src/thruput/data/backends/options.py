"""The options of every backend, declared and checked once.

    Loader(plan, backend="process", workers={"max_workers": 2, "chunk_docs": 16})

``workers=`` (a mapping or a ``BackendOptions``) becomes one ``BackendOptions``; each backend
states which fields it reads, and an option set for another backend is refused rather than
ignored.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from thruput.data.errors import DataError


@dataclass(frozen=True)
class BackendOptions:
    """How source loaders run; every field has a default.

    Shared by the process and Ray backends:

    * ``min_workers``, ``max_workers``: loaders per source; ``cpu_budget``: CPUs all loaders may
      use together (None: all of this machine's for ``process``, the cluster's for ``ray``). Pool
      sizes follow measured CPU seconds per token times tokens consumed (``scaling.pool_sizes``).
    * ``chunk_docs``: documents per task (the inline backend reads only this);
      ``prefetch_chunks``: tasks in flight per source (at least two per loader).
    * ``rescale_every``: re-size the pools every this many fetched chunks (``process``) or
      steps (``ray``); 0 never after the first sizing.
    * ``max_failures``: loader deaths per source survived; the next one raises ``DataError``.
    * ``wait_s``: seconds without progress before a wait raises ``DataError`` (a read that hangs,
      or with Ray a rank that stopped iterating).

    ``process`` only: ``start_method`` (a multiprocessing start method; default ``fork`` where
    available). ``ray`` only: ``address`` (a cluster; None: the running connection or a local
    127.0.0.1-only instance), ``run_id`` (names the run's namespace; default: a hash of the
    plan), ``shadows`` (warm spare loader processes), ``ahead`` (steps built past the slowest
    rank), ``max_recoveries`` (planner or constructor deaths survived per open).

    Raises ``DataError`` naming the option when a value is out of range.
    """

    min_workers: int = 1
    max_workers: int = 4
    cpu_budget: int | None = None
    chunk_docs: int = 32
    prefetch_chunks: int = 4
    rescale_every: int = 16
    max_failures: int = 3
    wait_s: float = 300.0
    start_method: str | None = None
    address: str | None = None
    run_id: str | None = None
    shadows: int = 1
    ahead: int = 4
    max_recoveries: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_workers <= self.max_workers:
            raise DataError(f"backend options: need 1 <= min_workers <= max_workers, got {self.min_workers}, {self.max_workers}")
        if self.chunk_docs < 1 or self.prefetch_chunks < 1:
            raise DataError(
                f"backend options: chunk_docs and prefetch_chunks must be >= 1, got {self.chunk_docs}, {self.prefetch_chunks}"
            )
        if self.cpu_budget is not None and self.cpu_budget < 1:
            raise DataError(
                f"backend options: cpu_budget must be >= 1 (None: all CPUs), got {self.cpu_budget}; "
                "backend='inline' reads without worker processes"
            )
        if self.ahead < 1:
            raise DataError(f"backend options: ahead must be >= 1, got {self.ahead}")
        for name in ("rescale_every", "max_failures", "shadows", "max_recoveries"):
            if getattr(self, name) < 0:
                raise DataError(f"backend options: {name} must be >= 0, got {getattr(self, name)}")
        if not self.wait_s > 0:
            raise DataError(f"backend options: wait_s must be > 0, got {self.wait_s}")

    @classmethod
    def of(cls, options: BackendOptions | Mapping[str, Any] | None = None, **fields: Any) -> BackendOptions:
        """``options`` (a mapping, or ``BackendOptions``) with ``fields`` on top; ``DataError`` for unknown keys."""
        if isinstance(options, BackendOptions) and not fields:
            return options
        base = dataclasses.asdict(options) if isinstance(options, BackendOptions) else dict(options or {})
        merged = {**base, **fields}
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(merged) - set(known))
        if unknown:
            raise DataError(f"backend options: unknown {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
        return cls(**merged)

    def without(self, *names: str) -> BackendOptions:
        """These options with ``names`` back at their defaults."""
        return dataclasses.replace(self, **{n: _DEFAULTS[n] for n in names})

    def check_for(self, backend: str, reads: Collection[str]) -> BackendOptions:
        """Self, if every option set away from its default is one ``backend`` ``reads``; else ``DataError``."""
        foreign = [f.name for f in dataclasses.fields(self) if f.name not in reads and getattr(self, f.name) != _DEFAULTS[f.name]]
        if foreign:
            raise DataError(
                f"backend options: the {backend} backend does not use {', '.join(map(repr, foreign))} "
                f"(it reads {', '.join(sorted(reads)) or 'none'})"
            )
        return self


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(BackendOptions)}
# What the process and Ray backends both read; each adds its own (``READS`` on the backend).
SHARED = ("min_workers", "max_workers", "cpu_budget", "chunk_docs", "prefetch_chunks", "rescale_every", "max_failures", "wait_s")
