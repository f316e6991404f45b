"""Source-loader worker processes: the local backend.

Every source has its own pool of worker processes. A task is a run of stream positions; the
worker tokenizes it and puts the tokens in a fresh shared-memory block, sending back only
per-document lengths (no per-sample pickling); the backend copies the tokens out and unlinks the
block (``worker_process``). Each worker has its own pipe, and the backend knows which tasks
each worker has not answered. A thread of the backend serves the pipes: it takes replies as they
come and hands the next task of the source, in stream order, to whichever worker is free (at
most ``_DEPTH`` unanswered per worker), so a slow chunk holds up no task but itself.

A worker that dies, at any moment, is replaced and its unanswered tasks go back to the front of
the queue: a chunk is a pure function of (source, seed, positions), so no sample is lost or
repeated. Its half-written blocks are unlinked. More than ``max_failures`` deaths in one
source's pool raise ``DataError`` naming the source. Workers die with the consumer's process.

Prefetch is bounded per source (``prefetch_chunks`` tasks in flight, at least two per worker):
when the consumer stops fetching, workers run dry and wait. As soon as every source has delivered
tokens, and then every ``rescale_every`` fetched chunks, the pools are resized: a source's share of
``cpu_budget`` is its measured preprocessing CPU seconds per token times the tokens consumed from
it, clamped to ``[min_workers, max_workers]``.
"""
from __future__ import annotations

import bisect
import logging
import multiprocessing as mp
import os
import secrets
import selectors
import signal
import threading
import time
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

log = logging.getLogger(__name__)

_POLL_S = 0.2  # how often a waiting thread checks that the backend is open and its server alive
_STOP_S = 2.0  # how long close() lets workers finish before it kills them
_DEPTH = 1  # unanswered tasks per worker: more would queue a task behind a slow chunk


@dataclass(eq=False)
class _Worker:
    proc: Any
    conn: Any
    tasks: dict[int, str] = field(default_factory=dict)  # unanswered: start position -> block name
    retiring: bool = False  # told to stop after its tasks (the pool shrank)


@dataclass(eq=False)
class _Pool:
    source: Source
    workers: list[_Worker] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)  # tasks in flight no worker holds, ascending
    target: int = 0  # workers not retiring
    next_submit: int = 0
    next_fetch: int = 0
    ready: dict[int, Chunk] = field(default_factory=dict)
    error: DataError | None = None  # raised by the next fetch
    events: int = 0  # replies and deaths seen: a fetch's wait_s restarts on each
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
        self._cv = threading.Condition()  # guards the pools: fetch(), the pipe server, close()
        self._server: threading.Thread | None = None
        self._forker: ThreadPoolExecutor | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, sources: Sequence[Source], tokenizer: Tokenizer, seed: int, positions: Mapping[str, int]) -> None:
        self.close()
        self._ctx = mp.get_context(self.start_method)
        resource_tracker.ensure_running()  # workers inherit it, so shm blocks have one owner
        # PR_SET_PDEATHSIG fires when the *thread* that forked a worker ends: every worker is
        # started from this one thread, which lives as long as the backend.
        self._forker = ThreadPoolExecutor(1, thread_name_prefix="thruput-workers")
        self._selector = selectors.DefaultSelector()  # every worker's pipe and process sentinel
        self._tokenizer, self._seed = tokenizer, seed
        self._blocks = f"thr_{os.getpid()}_{secrets.token_hex(3)}_"  # block names: this prefix, a serial
        self._serial = 0
        self._fetches = 0
        self._measured = False
        self._failure: BaseException | None = None
        self._closed = False
        with self._cv:
            for source in sources:
                pos = int(positions[source.name])
                pool = _Pool(source, next_submit=pos, next_fetch=pos)
                self._pools[source.name] = pool
                self._resize(pool, self.min_workers)
                self._submit(pool)
        self._server = threading.Thread(target=self._serve, name="thruput-worker-pipes", daemon=True)
        self._server.start()

    def close(self) -> None:
        """Stop every worker (bounded: killed after ``_STOP_S``) and free every block in flight."""
        self._closed = True  # first: fetch() and the pipe server give up within _POLL_S
        if self._server is not None:
            self._server.join(3 * _STOP_S)  # it may be replacing a dead worker
            if self._server.is_alive():
                log.warning("thruput.data: the worker pipe server did not stop within %.0f s", 3 * _STOP_S)
            self._server = None
        locked = self._cv.acquire(timeout=3 * _STOP_S)
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
            if self._pools:
                self._selector.close()
            self._pools = {}
            if self._forker is not None:
                self._forker.shutdown(wait=False)
                self._forker = None
            self._cv.notify_all()
        finally:
            if locked:
                self._cv.release()

    def pids(self) -> dict[str, list[int]]:
        """Process ids of each source's live workers (for fault injection and accounting)."""
        with self._cv:
            return {n: [w.proc.pid for w in p.workers] for n, p in self._pools.items()}

    # --- data -----------------------------------------------------------------------------------

    def fetch(self, name: str) -> Chunk:
        with self._cv:
            if self._closed:
                raise DataError("workers: backend closed while fetching")
            pool = self._pools[name]
            deadline, seen = time.monotonic() + self.wait_s, pool.events
            while pool.next_fetch not in pool.ready:
                if pool.error is not None:
                    raise pool.error
                if self._closed:
                    raise DataError("workers: backend closed while fetching")
                if self._server is None or not self._server.is_alive():
                    raise DataError(f"workers: the thread serving the worker pipes died: {self._failure!r}")
                self._cv.wait(_POLL_S)
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
            if not self._measured and all(p.tokens for p in self._pools.values()):
                self._measured = True
                self._rescale()
            elif self.rescale_every and self._fetches % self.rescale_every == 0:
                self._rescale()
            self._submit(pool)
            return chunk

    def _submit(self, pool: _Pool) -> None:
        limit = max(self.prefetch_chunks, 2 * pool.target)
        while (pool.next_submit - pool.next_fetch) // self.chunk_docs < limit:
            pool.queued.append(pool.next_submit)
            pool.next_submit += self.chunk_docs
        self._hand_out(pool)

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "process",
            "workers": {n: p.target for n, p in self._pools.items()},
            "cpu_s_per_token": {n: (p.cpu_s / p.tokens if p.tokens else 0.0) for n, p in self._pools.items()},
            "worker_failures": {n: p.failures for n, p in self._pools.items()},
        }

    # --- the pipe server ------------------------------------------------------------------------

    def _serve(self) -> None:
        """Take replies and deaths as they come, and keep every free worker busy (a thread)."""
        try:
            while not self._closed:
                events = self._selector.select(_POLL_S)
                if not events:
                    continue
                with self._cv:
                    if self._closed:
                        return
                    for key, _ in events:
                        pool, worker = key.data
                        if worker in pool.workers and pool.error is None:
                            self._on_event(pool, worker, replied=key.fileobj is worker.conn)
                    self._cv.notify_all()
        except BaseException as exc:  # fetch() sees the thread gone and raises a DataError with this
            self._failure = exc
            raise

    def _on_event(self, pool: _Pool, worker: _Worker, replied: bool) -> None:
        pool.events += 1
        try:
            if not (replied and self._receive(pool, worker)):
                self._requeue(pool, self._reap(pool, worker))
            self._hand_out(pool)
        except DataError as exc:
            pool.error = exc
            for w in pool.workers:  # nothing more to take from this pool: close() stops them
                self._unwatch(w)

    def _hand_out(self, pool: _Pool) -> None:
        """Give the earliest queued tasks to the least busy workers with room; resend a dead one's."""
        while pool.queued:
            free = [w for w in pool.workers if not w.retiring and len(w.tasks) < _DEPTH]
            if not free:
                return
            worker = min(free, key=lambda w: len(w.tasks))
            start = pool.queued.pop(0)
            self._serial += 1
            block = f"{self._blocks}{self._serial}"
            register_block(block)
            worker.tasks[start] = block
            try:
                worker.conn.send((start, self.chunk_docs, block))
            except OSError:
                self._requeue(pool, self._reap(pool, worker))

    @staticmethod
    def _requeue(pool: _Pool, starts: Iterable[int]) -> None:
        for start in starts:
            bisect.insort(pool.queued, start)

    def _receive(self, pool: _Pool, worker: _Worker, hand_out: bool = True) -> bool:
        """Take one reply of ``worker``; False when its pipe is closed (it died)."""
        try:
            reply = worker.conn.recv()
        except (EOFError, OSError):
            return False
        block = worker.tasks.pop(reply[1])
        if hand_out:
            self._hand_out(pool)  # first: the worker waits for its next task while we copy this one
        if reply[0] == "error":
            discard_block(block)
            raise DataError(reply[2])
        _, start, records, lengths, skipped, cpu_s, size = reply
        pool.ready[start] = Chunk(pool.source.name, start, records, lengths, take_block(block, size), skipped, cpu_s)
        return True

    # --- worker processes -----------------------------------------------------------------------

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
        self._selector.register(ours, selectors.EVENT_READ, (pool, worker))
        self._selector.register(proc.sentinel, selectors.EVENT_READ, (pool, worker))

    def _unwatch(self, worker: _Worker) -> None:
        for obj in (worker.conn, worker.proc.sentinel):
            try:
                self._selector.unregister(obj)
            except KeyError:
                pass  # already

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
            if not self._receive(pool, worker, hand_out=False):
                break
        worker.proc.join(_STOP_S)
        if worker.proc.is_alive():  # its pipe broke but it lives on: end it
            worker.proc.kill()
            worker.proc.join(_STOP_S)
        self._unwatch(worker)
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
                pass  # already dead: the pipe server reaps it and resends its tasks
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


def _signal_name(exitcode: int | None) -> str:
    """`` (SIGKILL)`` for a worker ended by a signal (negative exit code), else nothing."""
    if exitcode is None or exitcode >= 0:
        return ""
    try:
        return f" ({signal.Signals(-exitcode).name})"
    except ValueError:
        return ""
