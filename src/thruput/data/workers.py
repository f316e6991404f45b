"""Source-loader worker processes: the local backend.

Every source has its own pool of worker processes (``worker_pools``). A task is a run of stream
positions; the worker tokenizes it and puts the tokens in a fresh shared-memory block, sending
back only per-document lengths (no per-sample pickling); the backend copies the tokens out and
unlinks the block (``worker_process``). A worker that dies is replaced and its work redone, with
the same chunks; workers die with the trainer's process.

Prefetch is bounded per source (``prefetch_chunks`` tasks in flight, at least two per worker):
when the consumer stops fetching, workers run dry and wait. As soon as every source has delivered
tokens, and then every ``rescale_every`` fetched chunks, the pools are resized: a source's share of
``cpu_budget`` is its measured preprocessing CPU seconds per token times the tokens consumed from
it, clamped to ``[min_workers, max_workers]``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from thruput.data.errors import DataError
from thruput.data.sources import Source
from thruput.data.stream import Chunk
from thruput.data.tokenize import Tokenizer
from thruput.data.worker_pools import POLL_S, Pool, WorkerPools


class ProcessBackend:
    """Worker processes per source, autoscaled within ``cpu_budget`` (default: all CPUs).

    ``start_method`` is a multiprocessing start method; ``fork`` (the default where available)
    lets sources carry lambdas as filters and transforms, the others need picklable ones.
    A worker's ``DataError`` is raised again by ``fetch``. A dead worker is replaced and its
    work redone (same chunks); ``max_failures`` deaths per source are survived, the next one
    raises ``DataError``. ``fetch`` raises ``DataError`` too when the source's live workers
    produce nothing for ``wait_s`` seconds (a read that hangs).
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
        max_failures: int = 3,
        wait_s: float = 300.0,
        start_method: str | None = None,
    ) -> None:
        if not 1 <= min_workers <= max_workers:
            raise DataError(f"workers: need 1 <= min_workers <= max_workers, got {min_workers}, {max_workers}")
        if chunk_docs < 1 or prefetch_chunks < 1:
            raise DataError("workers: chunk_docs and prefetch_chunks must be >= 1")
        if max_failures < 0 or not wait_s > 0:
            raise DataError(f"workers: need max_failures >= 0 and wait_s > 0, got {max_failures}, {wait_s}")
        self.min_workers, self.max_workers = min_workers, max_workers
        self.cpu_budget = cpu_budget if cpu_budget is not None else (os.cpu_count() or 1)
        self.chunk_docs, self.prefetch_chunks, self.rescale_every = chunk_docs, prefetch_chunks, rescale_every
        self.max_failures, self.wait_s = max_failures, wait_s
        methods = mp.get_all_start_methods()
        self.start_method = start_method or ("fork" if "fork" in methods else methods[0])
        self._workers: WorkerPools | None = None
        self._fetches = 0
        self._measured = False

    @property
    def _pools(self) -> dict[str, Pool]:
        return self._workers.pools if self._workers is not None else {}

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, sources: Sequence[Source], tokenizer: Tokenizer, seed: int, positions: Mapping[str, int]) -> None:
        self.close()
        workers = WorkerPools(
            tokenizer, seed, start_method=self.start_method, chunk_docs=self.chunk_docs, max_failures=self.max_failures
        )
        self._fetches = 0
        self._measured = False
        with workers.cv:
            for source in sources:
                pool = workers.add(source, int(positions[source.name]))
                workers.resize(pool, self.min_workers)
                workers.submit(pool, self._limit(pool))
        workers.serve()
        self._workers = workers

    def close(self) -> None:
        """Stop every worker (killed when it does not stop in time) and free every block in flight."""
        workers, self._workers = self._workers, None
        if workers is not None:
            workers.close()

    def pids(self) -> dict[str, list[int]]:
        """Process ids of each source's live workers (for fault injection and accounting)."""
        workers = self._workers
        if workers is None:
            return {}
        with workers.cv:
            return workers.pids()

    # --- data -----------------------------------------------------------------------------------

    def fetch(self, name: str) -> Chunk:
        workers = self._workers
        if workers is None:
            raise DataError("workers: backend closed while fetching")
        with workers.cv:
            pool = workers.pools[name]
            deadline, seen = time.monotonic() + self.wait_s, pool.events
            while True:
                if workers.closed:  # checked holding cv, after every wait: close() may have run meanwhile
                    raise DataError("workers: backend closed while fetching")
                if pool.next_fetch in pool.ready:
                    break
                if pool.error is not None:
                    raise pool.error
                if not workers.serving():
                    raise DataError(f"workers: the thread serving the worker pipes died: {workers.failure!r}") from workers.failure
                workers.cv.wait(POLL_S)
                if pool.events != seen:
                    deadline, seen = time.monotonic() + self.wait_s, pool.events
                elif time.monotonic() > deadline:
                    raise DataError(
                        f"source '{name}': no chunk for {self.wait_s:g} s from its {len(pool.workers)} live "
                        "worker processes (a read that hangs?); raise wait_s if one chunk may take longer"
                    )
            chunk = pool.ready.pop(pool.next_fetch)
            pool.next_fetch += chunk.count
            pool.cpu_s += chunk.cpu_s
            pool.tokens += chunk.tokens.size
            pool.fetched_tokens += chunk.tokens.size
            self._fetches += 1
            # Scale as soon as every source has a measured cost: rescale_every chunks at min_workers
            # can drain a costly source's prefetch before the first periodic rescale.
            if not self._measured and all(p.tokens for p in workers.pools.values()):
                self._measured = True
                self._rescale(workers)
            elif self.rescale_every and self._fetches % self.rescale_every == 0:
                self._rescale(workers)
            workers.submit(pool, self._limit(pool))
            return chunk

    def _limit(self, pool: Pool) -> int:
        return max(self.prefetch_chunks, 2 * pool.target)

    def stats(self) -> dict[str, Any]:
        pools = self._pools
        return {
            "backend": "process",
            "workers": {n: p.target for n, p in pools.items()},
            "cpu_s_per_token": {n: (p.cpu_s / p.tokens if p.tokens else 0.0) for n, p in pools.items()},
            "worker_failures": {n: p.failures for n, p in pools.items()},
        }

    # --- scaling ------------------------------------------------------------------------------

    def targets(self) -> dict[str, int]:
        """Workers per source that the budget gives, from measured cost per token and demand.

        The total stays within ``cpu_budget`` unless ``min_workers`` per source alone exceeds it.
        """
        pools = self._pools
        names = list(pools)
        work = np.array(
            [
                (p.cpu_s / p.tokens if p.tokens else 0.0) * max(p.fetched_tokens, 1)
                for p in pools.values()
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

    def _rescale(self, workers: WorkerPools) -> None:
        for name, target in self.targets().items():
            workers.resize(workers.pools[name], target)
