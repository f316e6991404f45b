"""Source-loader worker processes: the local backend.

Every source has its own pool of worker processes (``pools``). A task is a run of stream
positions; the worker tokenizes it and puts the tokens in a fresh shared-memory block, sending
back only per-document lengths (no per-sample pickling); the backend copies the tokens out and
unlinks the block (``worker``). A worker that dies is replaced and its work redone, with
the same chunks; workers die with the trainer's process.

Prefetch is bounded per source (``prefetch_chunks`` tasks in flight, at least two per worker):
when the consumer stops fetching, workers run dry and wait. As soon as every source has delivered
tokens, and then every ``rescale_every`` fetched chunks, the pools are resized: a source's share of
``cpu_budget`` is its measured preprocessing CPU seconds per token times the tokens consumed from
it, clamped to ``[min_workers, max_workers]`` (``scaling.pool_sizes``, the rule Ray's pools follow).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from thruput.data.backends.base import ChunkBackend
from thruput.data.backends.options import SHARED, BackendOptions
from thruput.data.backends.process.pools import POLL_S, Pool, WorkerPools
from thruput.data.backends.scaling import in_flight, pool_sizes
from thruput.data.errors import DataError
from thruput.data.sources import Source
from thruput.data.stream import Chunk
from thruput.data.tokenize import Tokenizer


class ProcessBackend(ChunkBackend):
    """Worker processes per source, autoscaled within ``cpu_budget`` (default: all CPUs).

    ``ProcessBackend(max_workers=2)`` or ``ProcessBackend(BackendOptions(...))``: see
    ``BackendOptions`` (``DataError`` for a Ray-only option). ``start_method`` is a
    multiprocessing start method; ``fork`` (the default where available) lets sources carry
    lambdas as filters and transforms, the others need picklable ones. A worker's ``DataError``
    is raised again by ``fetch``. A dead worker is replaced and its work redone (same chunks);
    ``max_failures`` deaths per source are survived, the next one raises ``DataError``.
    ``fetch`` raises ``DataError`` too when the source's live workers produce nothing for
    ``wait_s`` seconds (a read that hangs).
    """

    READS = (*SHARED, "start_method")

    def __init__(self, options: BackendOptions | Mapping[str, Any] | None = None, **fields: Any) -> None:
        self.options = BackendOptions.of(options, **fields).check_for("process", self.READS)
        self.cpu_budget = self.options.cpu_budget or os.cpu_count() or 1
        methods = mp.get_all_start_methods()
        self.start_method = self.options.start_method or ("fork" if "fork" in methods else methods[0])
        self._workers: WorkerPools | None = None
        self._fetches = 0
        self._measured = False

    @property
    def _pools(self) -> dict[str, Pool]:
        return self._workers.pools if self._workers is not None else {}

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, sources: Sequence[Source], tokenizer: Tokenizer, seed: int, positions: Mapping[str, int]) -> None:
        self.stop()
        o = self.options
        workers = WorkerPools(tokenizer, seed, start_method=self.start_method, chunk_docs=o.chunk_docs, max_failures=o.max_failures)
        self._fetches = 0
        self._measured = False
        with workers.cv:
            for source in sources:
                pool = workers.add(source, int(positions[source.name]))
                workers.resize(pool, o.min_workers)
                workers.submit(pool, self._limit(pool))
        workers.serve()
        self._workers = workers

    def stop(self) -> None:
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
            wait_s = self.options.wait_s
            deadline, seen = time.monotonic() + wait_s, pool.events
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
                    deadline, seen = time.monotonic() + wait_s, pool.events
                elif time.monotonic() > deadline:
                    raise DataError(
                        f"source '{name}': no chunk for {wait_s:g} s from its {len(pool.workers)} live "
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
            every = self.options.rescale_every
            if not self._measured and all(p.tokens for p in workers.pools.values()):
                self._measured = True
                self._rescale(workers)
            elif every and self._fetches % every == 0:
                self._rescale(workers)
            workers.submit(pool, self._limit(pool))
            return chunk

    def _limit(self, pool: Pool) -> int:
        return in_flight(self.options.prefetch_chunks, pool.target)

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
        cost = [p.cpu_s / p.tokens if p.tokens else 0.0 for p in pools.values()]
        demand = [p.fetched_tokens for p in pools.values()]
        sizes = pool_sizes(cost, demand, self.cpu_budget, self.options.min_workers, self.options.max_workers)
        return dict(zip(pools, sizes))

    def _rescale(self, workers: WorkerPools) -> None:
        for name, target in self.targets().items():
            workers.resize(workers.pools[name], target)
