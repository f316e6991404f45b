"""Source-loader worker processes: the local backend.

Every source has its own pool of worker processes fed from its own task queue. A task is a run
of stream positions; the worker tokenizes it and puts the tokens in a fresh shared-memory block,
sending back only its name and the per-document lengths (no per-sample pickling). The consumer
copies the tokens out and unlinks the block.

Prefetch is bounded per source (``prefetch_chunks`` tasks in flight, at least two per worker):
when the consumer stops fetching, workers run dry and wait. As soon as every source has delivered
tokens, and then every ``rescale_every`` fetched chunks, the pools are resized: a source's share of
``cpu_budget`` is its measured preprocessing CPU seconds per token times the tokens consumed from
it, clamped to ``[min_workers, max_workers]``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

from thruput.data.errors import DataError
from thruput.data.sources import Source
from thruput.data.stream import Chunk, StreamOrder, tokenize_chunk
from thruput.data.tokenize import Tokenizer

_POLL_S = 0.2


def _worker_main(source: Source, tokenizer: Tokenizer, seed: int, tasks: Any, results: Any) -> None:
    order = StreamOrder(source, seed)
    while True:
        task = tasks.get()
        if task is None:
            return
        start, count = task
        try:
            chunk = tokenize_chunk(source, tokenizer, order, start, count)
        except Exception as exc:
            message = str(exc) if isinstance(exc, DataError) else f"source '{source.name}': {exc!r}"
            results.put(("error", start, message))
            continue
        name = None
        if chunk.tokens.size:
            shm = shared_memory.SharedMemory(create=True, size=chunk.tokens.nbytes)
            np.ndarray(chunk.tokens.shape, np.int32, buffer=shm.buf)[:] = chunk.tokens
            name = shm.name
            shm.close()
        results.put(("ok", start, chunk.records, chunk.lengths, chunk.skipped, chunk.cpu_s, name, chunk.tokens.size))


def _take_tokens(name: str | None, size: int) -> np.ndarray:
    if name is None:
        return np.zeros(0, dtype=np.int32)
    shm = shared_memory.SharedMemory(name=name)
    try:
        return np.ndarray((size,), np.int32, buffer=shm.buf).copy()
    finally:
        shm.close()
        shm.unlink()


@dataclass
class _Pool:
    source: Source
    tasks: Any
    results: Any
    procs: list[Any] = field(default_factory=list)
    target: int = 0
    next_submit: int = 0
    next_fetch: int = 0
    ready: dict[int, Chunk] = field(default_factory=dict)
    cpu_s: float = 0.0
    tokens: int = 0
    fetched_tokens: int = 0


class ProcessBackend:
    """Worker processes per source, autoscaled within ``cpu_budget`` (default: all CPUs).

    ``start_method`` is a multiprocessing start method; ``fork`` (the default where available)
    lets sources carry lambdas as filters and transforms, the others need picklable ones.
    A worker's ``DataError`` is raised again by ``fetch``; a worker that dies raises one too.
    """

    def __init__(
        self,
        *,
        min_workers: int = 1,
        max_workers: int = 4,
        cpu_budget: int | None = None,
        chunk_docs: int = 32,
        prefetch_chunks: int = 4,
        rescale_every: int = 16,
        start_method: str | None = None,
    ) -> None:
        if not 1 <= min_workers <= max_workers:
            raise DataError(f"workers: need 1 <= min_workers <= max_workers, got {min_workers}, {max_workers}")
        if chunk_docs < 1 or prefetch_chunks < 1:
            raise DataError("workers: chunk_docs and prefetch_chunks must be >= 1")
        self.min_workers, self.max_workers = min_workers, max_workers
        self.cpu_budget = cpu_budget if cpu_budget is not None else (os.cpu_count() or 1)
        self.chunk_docs, self.prefetch_chunks, self.rescale_every = chunk_docs, prefetch_chunks, rescale_every
        methods = mp.get_all_start_methods()
        self.start_method = start_method or ("fork" if "fork" in methods else methods[0])
        self._pools: dict[str, _Pool] = {}
        self._fetches = 0
        self._measured = False
        self._closed = True

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, sources: Sequence[Source], tokenizer: Tokenizer, seed: int, positions: Mapping[str, int]) -> None:
        self.close()
        ctx = mp.get_context(self.start_method)
        resource_tracker.ensure_running()  # workers inherit it, so shm blocks have one owner
        self._ctx, self._tokenizer, self._seed = ctx, tokenizer, seed
        self._closed = False
        self._fetches = 0
        self._measured = False
        for source in sources:
            pos = int(positions[source.name])
            pool = _Pool(source, ctx.Queue(), ctx.Queue(), next_submit=pos, next_fetch=pos)
            self._pools[source.name] = pool
            self._resize(pool, self.min_workers)
            self._submit(pool)

    def close(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            for _ in pool.procs:
                pool.tasks.put(None)
        for pool in self._pools.values():
            deadline = time.monotonic() + 2.0
            for p in pool.procs:
                p.join(max(deadline - time.monotonic(), 0.0))
                if p.is_alive():
                    p.terminate()
                    p.join()
            self._drain(pool)
            pool.tasks.close()
            pool.results.close()
        self._pools = {}

    @staticmethod
    def _drain(pool: _Pool) -> None:
        """Unlink shared memory of results nobody will read."""
        while True:
            try:
                msg = pool.results.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            if msg[0] == "ok" and msg[6] is not None:
                _take_tokens(msg[6], 0)

    # --- scaling ------------------------------------------------------------------------------

    def _resize(self, pool: _Pool, target: int) -> None:
        pool.procs = [p for p in pool.procs if p.is_alive()]
        while pool.target < target:
            p = self._ctx.Process(
                target=_worker_main,
                args=(pool.source, self._tokenizer, self._seed, pool.tasks, pool.results),
                name=f"thruput-{pool.source.name}",
                daemon=True,
            )
            p.start()
            pool.procs.append(p)
            pool.target += 1
        while pool.target > target:
            pool.tasks.put(None)  # one worker exits once the tasks queued before it are done
            pool.target -= 1

    def targets(self) -> dict[str, int]:
        """Workers per source that the budget gives, from measured cost per token and demand.

        The total stays within ``cpu_budget`` unless ``min_workers`` per source alone exceeds it.
        """
        names = list(self._pools)
        work = np.array(
            [
                (p.cpu_s / p.tokens if p.tokens else 0.0) * max(p.fetched_tokens, 1)
                for p in self._pools.values()
            ]
        )
        if work.sum() <= 0:
            return {n: self.min_workers for n in names}
        share = work / work.sum() * self.cpu_budget
        counts = np.clip(np.floor(share), self.min_workers, self.max_workers).astype(int)
        # Raising cheap sources to min_workers can overdraw the budget: take it back from the largest.
        while counts.sum() > self.cpu_budget and (counts > self.min_workers).any():
            counts[int(np.argmax(np.where(counts > self.min_workers, counts, -1)))] -= 1
        spare = self.cpu_budget - counts.sum()
        for i in np.argsort(-(share - np.floor(share)), kind="stable"):
            if spare <= 0:
                break
            if counts[i] < self.max_workers and share[i] > counts[i]:
                counts[i] += 1
                spare -= 1
        return dict(zip(names, counts.tolist()))

    def _rescale(self) -> None:
        for name, target in self.targets().items():
            self._resize(self._pools[name], target)

    # --- data -----------------------------------------------------------------------------------

    def _submit(self, pool: _Pool) -> None:
        limit = max(self.prefetch_chunks, 2 * pool.target)
        while (pool.next_submit - pool.next_fetch) // self.chunk_docs < limit:
            pool.tasks.put((pool.next_submit, self.chunk_docs))
            pool.next_submit += self.chunk_docs

    def fetch(self, name: str) -> Chunk:
        pool = self._pools[name]
        while pool.next_fetch not in pool.ready:
            if self._closed:
                raise DataError("workers: backend closed while fetching")
            try:
                msg = pool.results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [p for p in pool.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise DataError(f"source '{name}': worker process {dead[0].pid} died with exit code {dead[0].exitcode}")
                continue
            if msg[0] == "error":
                raise DataError(msg[2])
            _, start, records, lengths, skipped, cpu_s, shm_name, size = msg
            pool.ready[start] = Chunk(name, start, records, lengths, _take_tokens(shm_name, size), skipped, cpu_s)
        chunk = pool.ready.pop(pool.next_fetch)
        pool.next_fetch += chunk.count
        pool.cpu_s += chunk.cpu_s
        pool.tokens += chunk.tokens.size
        pool.fetched_tokens += chunk.tokens.size
        self._fetches += 1
        # Scale as soon as every source has a measured cost: rescale_every chunks at min_workers
        # can drain a costly source's prefetch before the first periodic rescale.
        if not self._measured and all(p.tokens for p in self._pools.values()):
            self._measured = True
            self._rescale()
        elif self.rescale_every and self._fetches % self.rescale_every == 0:
            self._rescale()
        self._submit(pool)
        return chunk

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "process",
            "workers": {n: p.target for n, p in self._pools.items()},
            "cpu_s_per_token": {n: (p.cpu_s / p.tokens if p.tokens else 0.0) for n, p in self._pools.items()},
        }
