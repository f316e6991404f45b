"""Source-loader worker processes: the local backend.

Every source has its own pool of worker processes. The consumer hands each task (a run of
stream positions) to one worker over that worker's own pipe and keeps, per worker, the tasks it
has not answered. The worker tokenizes the run and puts the tokens in a fresh shared-memory
block, sending back only per-document lengths (no per-sample pickling); the consumer copies the
tokens out and unlinks the block (``worker_process``).

A worker that dies, at any moment, is replaced and its unanswered tasks go to the pool's other
workers: a chunk is a pure function of (source, seed, positions), so no sample is lost or
repeated. Its half-written blocks are unlinked. More than ``max_failures`` deaths in one
source's pool raise ``DataError`` naming the source. Workers die with the consumer's process.

Prefetch is bounded per source (``prefetch_chunks`` tasks in flight, at least two per worker):
when the consumer stops fetching, workers run dry and wait. As soon as every source has delivered
tokens, and then every ``rescale_every`` fetched chunks, the pools are resized: a source's share of
``cpu_budget`` is its measured preprocessing CPU seconds per token times the tokens consumed from
it, clamped to ``[min_workers, max_workers]``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import selectors
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from typing import Any

import numpy as np

from thruput.data.errors import DataError
from thruput.data.sources import Source
from thruput.data.stream import Chunk
from thruput.data.tokenize import Tokenizer
from thruput.data.worker_process import discard_block, register_block, take_block, worker_main

_POLL_S = 0.2  # how often a waiting fetch() checks that the backend is still open
_STOP_S = 2.0  # how long close() lets workers finish before it terminates them


@dataclass(eq=False)
class _Worker:
    proc: Any
    conn: Any
    tasks: dict[int, str] = field(default_factory=dict)  # unanswered: start position -> block name
    retiring: bool = False  # told to stop after its tasks (the pool shrank)


@dataclass
class _Pool:
    source: Source
    workers: list[_Worker] = field(default_factory=list)
    events: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)  # replies and deaths
    target: int = 0  # workers not retiring
    next_submit: int = 0
    next_fetch: int = 0
    ready: dict[int, Chunk] = field(default_factory=dict)
    failures: int = 0
    cpu_s: float = 0.0
    tokens: int = 0
    fetched_tokens: int = 0


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
        self._pools: dict[str, _Pool] = {}
        self._fetches = 0
        self._measured = False
        self._closed = True
        self._lock = threading.Lock()  # fetch() against close() from another thread
        self._forker: ThreadPoolExecutor | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, sources: Sequence[Source], tokenizer: Tokenizer, seed: int, positions: Mapping[str, int]) -> None:
        self.close()
        self._ctx = mp.get_context(self.start_method)
        resource_tracker.ensure_running()  # workers inherit it, so shm blocks have one owner
        # PR_SET_PDEATHSIG fires when the *thread* that forked a worker ends: every worker is
        # started from this one thread, which lives as long as the backend.
        self._forker = ThreadPoolExecutor(1, thread_name_prefix="thruput-workers")
        self._tokenizer, self._seed = tokenizer, seed
        self._blocks = f"thr_{os.getpid()}_{secrets.token_hex(3)}_"  # block names: this prefix, a serial
        self._serial = 0
        self._closed = False
        self._fetches = 0
        self._measured = False
        for source in sources:
            pos = int(positions[source.name])
            pool = _Pool(source, next_submit=pos, next_fetch=pos)
            self._pools[source.name] = pool
            self._resize(pool, self.min_workers)
            self._submit(pool)

    def close(self) -> None:
        """Stop every worker (bounded: terminated after ``_STOP_S``) and free every block in flight."""
        self._closed = True  # first: a fetch() in another thread gives up within _POLL_S
        locked = self._lock.acquire(timeout=10 * _POLL_S)
        try:
            workers = [w for pool in self._pools.values() for w in pool.workers]
            for w in workers:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            deadline = time.monotonic() + _STOP_S
            for w in workers:
                w.proc.join(max(deadline - time.monotonic(), 0.0))
            for w in workers:
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join(_STOP_S)
                w.conn.close()
                for block in w.tasks.values():
                    discard_block(block)
                w.tasks.clear()
            for pool in self._pools.values():
                pool.events.close()
            self._pools = {}
            if self._forker is not None:
                self._forker.shutdown(wait=False)
                self._forker = None
        finally:
            if locked:
                self._lock.release()

    def pids(self) -> dict[str, list[int]]:
        """Process ids of each source's live workers (for fault injection and accounting)."""
        return {n: [w.proc.pid for w in p.workers] for n, p in self._pools.items()}

    # --- workers ------------------------------------------------------------------------------

    def _spawn(self, pool: _Pool) -> None:
        ours, theirs = self._ctx.Pipe()
        # A forkserver, not this process, is the parent of the workers it starts.
        parent = None if self.start_method == "forkserver" else os.getpid()
        proc = self._ctx.Process(
            target=worker_main,
            args=(pool.source, self._tokenizer, self._seed, theirs, parent),
            name=f"thruput-{pool.source.name}",
            daemon=True,
        )
        assert self._forker is not None, "start() must be called first"
        self._forker.submit(proc.start).result()
        theirs.close()  # the worker holds the only other end: its death reads as end-of-file here
        worker = _Worker(proc, ours)
        pool.workers.append(worker)
        pool.events.register(ours, selectors.EVENT_READ, worker)
        pool.events.register(proc.sentinel, selectors.EVENT_READ, worker)

    def _dispatch(self, pool: _Pool, starts: Iterable[int]) -> None:
        """Send each task to the least busy worker; a worker found dead is reaped and its tasks resent."""
        todo = deque(starts)
        while todo:
            start = todo.popleft()
            worker = min((w for w in pool.workers if not w.retiring), key=lambda w: len(w.tasks))
            self._serial += 1
            block = f"{self._blocks}{self._serial}"
            register_block(block)
            worker.tasks[start] = block
            try:
                worker.conn.send((start, self.chunk_docs, block))
            except OSError:
                todo.extend(self._reap(pool, worker))

    def _receive(self, pool: _Pool, worker: _Worker) -> bool:
        """Take one reply of ``worker``; False when its pipe is closed (it died)."""
        try:
            reply = worker.conn.recv()
        except (EOFError, OSError):
            return False
        block = worker.tasks.pop(reply[1])
        if reply[0] == "error":
            discard_block(block)
            raise DataError(reply[2])
        _, start, records, lengths, skipped, cpu_s, size = reply
        pool.ready[start] = Chunk(pool.source.name, start, records, lengths, take_block(block, size), skipped, cpu_s)
        return True

    def _reap(self, pool: _Pool, worker: _Worker) -> list[int]:
        """Remove a dead (or exiting) worker; returns the tasks it left unanswered, to be resent.

        Replies it sent before dying are kept. A death replaces the worker, unless it was
        retiring, and counts as a failure of the source; one too many raises ``DataError``.
        """
        while True:  # every reply written before the death is still in the pipe
            try:
                if not worker.conn.poll(0):
                    break
            except (EOFError, OSError):
                break
            if not self._receive(pool, worker):
                break
        worker.proc.join(_STOP_S)
        if worker.proc.is_alive():  # its pipe broke but it lives on: end it
            worker.proc.kill()
            worker.proc.join(_STOP_S)
        pool.events.unregister(worker.conn)
        pool.events.unregister(worker.proc.sentinel)
        worker.conn.close()
        pool.workers.remove(worker)
        lost = list(worker.tasks)
        for block in worker.tasks.values():
            discard_block(block)  # created or half created before the death, or not at all
        worker.tasks.clear()
        code = worker.proc.exitcode
        if worker.retiring and code == 0:
            return lost
        pool.failures += 1
        if pool.failures > self.max_failures:
            raise DataError(
                f"source '{pool.source.name}': worker process {worker.proc.pid} died with exit code "
                f"{code}{_signal_name(code)}, death {pool.failures} of its workers "
                f"(max_failures={self.max_failures}); the source keeps failing, stopping"
            )
        if not worker.retiring:
            self._spawn(pool)
        return lost

    # --- scaling ------------------------------------------------------------------------------

    def _resize(self, pool: _Pool, target: int) -> None:
        while pool.target < target:
            self._spawn(pool)
            pool.target += 1
        while pool.target > target:
            worker = min((w for w in pool.workers if not w.retiring), key=lambda w: len(w.tasks))
            worker.retiring = True
            try:
                worker.conn.send(None)  # it exits once the tasks sent before are answered
            except OSError:
                pass  # already dead: reaped, and its tasks resent, by the next fetch
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
        starts = []
        while (pool.next_submit - pool.next_fetch) // self.chunk_docs < limit:
            starts.append(pool.next_submit)
            pool.next_submit += self.chunk_docs
        self._dispatch(pool, starts)

    def fetch(self, name: str) -> Chunk:
        with self._lock:
            if self._closed:
                raise DataError("workers: backend closed while fetching")
            pool = self._pools[name]
            deadline = time.monotonic() + self.wait_s
            while pool.next_fetch not in pool.ready:
                if self._closed:
                    raise DataError("workers: backend closed while fetching")
                if self._poll(pool):
                    deadline = time.monotonic() + self.wait_s
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
            if not self._measured and all(p.tokens for p in self._pools.values()):
                self._measured = True
                self._rescale()
            elif self.rescale_every and self._fetches % self.rescale_every == 0:
                self._rescale()
            self._submit(pool)
            return chunk

    def _poll(self, pool: _Pool) -> bool:
        """Wait up to ``_POLL_S`` for replies or deaths in ``pool``; True if any came."""
        events = pool.events.select(_POLL_S)
        for key, _ in events:
            worker = key.data
            if worker not in pool.workers:
                continue  # reaped on its other event
            if key.fileobj is worker.conn and self._receive(pool, worker):
                continue
            self._dispatch(pool, self._reap(pool, worker))
        return bool(events)

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "process",
            "workers": {n: p.target for n, p in self._pools.items()},
            "cpu_s_per_token": {n: (p.cpu_s / p.tokens if p.tokens else 0.0) for n, p in self._pools.items()},
            "worker_failures": {n: p.failures for n, p in self._pools.items()},
        }


def _signal_name(exitcode: int | None) -> str:
    """`` (SIGKILL)`` for a worker ended by a signal (negative exit code), else nothing."""
    if exitcode is None or exitcode >= 0:
        return ""
    try:
        return f" ({signal.Signals(-exitcode).name})"
    except ValueError:
        return ""
