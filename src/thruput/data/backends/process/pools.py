"""The worker processes of the process backend, and the pipes to them.

Each worker has its own pipe, and the consumer knows which tasks each worker has not answered
(a task is a run of stream positions). A thread serves the pipes: it takes replies as they
come and hands the source's next task, in stream order, to whichever worker is free. A worker
holds one unanswered task at a time, so a slow chunk holds up no task but itself; it gets the
next one before its reply's tokens are copied out, so it hardly waits.

A worker that dies, at any moment, is replaced and its unanswered tasks go back to the front
of the queue: a chunk is a pure function of (source, seed, positions), so none is lost or
repeated. Replies it sent before dying are kept; its half-written blocks are unlinked (the
consumer names every block). More than ``max_failures`` deaths in one source's pool end that
pool with a ``DataError`` naming the source.
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
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from typing import Any

from thruput.data.backends.process.worker import discard_block, register_block, take_block, worker_main
from thruput.data.errors import DataError
from thruput.data.sources import Source
from thruput.data.stream import Chunk
from thruput.data.tokenize import Tokenizer

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting thread checks that the pools are open and their server alive
STOP_S = 2.0  # how long close() lets workers finish before it kills them


@dataclass(eq=False)
class Worker:
    proc: Any
    conn: Any
    tasks: dict[int, str] = field(default_factory=dict)  # unanswered: start position -> block name
    retiring: bool = False  # told to stop after its tasks (the pool shrank)


@dataclass(eq=False)
class Pool:
    """One source's workers, its tasks in flight and the chunks ready, in stream positions."""

    source: Source
    workers: list[Worker] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)  # tasks in flight no worker holds, ascending
    target: int = 0  # workers not retiring
    next_submit: int = 0
    next_fetch: int = 0
    ready: dict[int, Chunk] = field(default_factory=dict)
    error: DataError | None = None  # for the next fetch to raise
    events: int = 0  # replies and deaths seen (progress, for a fetch's time limit)
    failures: int = 0
    cpu_s: float = 0.0
    tokens: int = 0
    fetched_tokens: int = 0


class WorkerPools:
    """Every source's pool of worker processes and the thread that serves their pipes.

    ``cv`` guards all of it; the server notifies it after each round of replies and deaths.
    """

    def __init__(self, tokenizer: Tokenizer, seed: int, *, start_method: str, chunk_docs: int, max_failures: int) -> None:
        self.tokenizer, self.seed, self.start_method = tokenizer, seed, start_method
        self.chunk_docs, self.max_failures = chunk_docs, max_failures
        self.cv = threading.Condition()
        self.pools: dict[str, Pool] = {}
        self.closed = False
        self.failure: BaseException | None = None  # what ended the server, if not close()
        self._ctx = mp.get_context(start_method)
        resource_tracker.ensure_running()  # workers inherit it, so shm blocks have one owner
        # PR_SET_PDEATHSIG fires when the *thread* that forked a worker ends: every worker is
        # started from this one thread, which lives as long as the pools.
        self._forker = ThreadPoolExecutor(1, thread_name_prefix="thruput-workers")
        self._selector = selectors.DefaultSelector()  # every worker's pipe and process sentinel
        self._blocks = f"thr_{os.getpid()}_{secrets.token_hex(3)}_"  # block names: this prefix, a serial
        self._serial = 0
        self._server = threading.Thread(target=self._serve, name="thruput-worker-pipes", daemon=True)

    # --- used by the backend, holding cv ------------------------------------------------------

    def add(self, source: Source, position: int) -> Pool:
        pool = self.pools[source.name] = Pool(source, next_submit=position, next_fetch=position)
        return pool

    def resize(self, pool: Pool, target: int) -> None:
        while pool.target < target:
            self._spawn(pool)
            pool.target += 1
        while pool.target > target:
            worker = min((w for w in pool.workers if not w.retiring), key=lambda w: len(w.tasks))
            worker.retiring = True
            try:
                worker.conn.send(None)  # it exits once the task sent before is answered
            except OSError:
                pass  # already dead: the server reaps it and resends its task
            pool.target -= 1

    def submit(self, pool: Pool, limit: int) -> None:
        """Queue tasks until ``limit`` chunks are in flight (fetched ones leave it), and hand them out."""
        while (pool.next_submit - pool.next_fetch) // self.chunk_docs < limit:
            pool.queued.append(pool.next_submit)
            pool.next_submit += self.chunk_docs
        self._hand_out(pool)

    def serving(self) -> bool:
        return self._server.is_alive()

    def pids(self) -> dict[str, list[int]]:
        return {n: [w.proc.pid for w in p.workers] for n, p in self.pools.items()}

    # --- lifecycle ------------------------------------------------------------------------------

    def serve(self) -> None:
        self._server.start()

    def close(self) -> None:
        """Stop every worker (killed after ``STOP_S``) and free every block in flight; bounded."""
        self.closed = True  # first: fetch() and the server give up within POLL_S
        if self._server.is_alive():
            self._server.join(3 * STOP_S)  # it may be replacing a dead worker
            if self._server.is_alive():
                log.warning("thruput.data: the worker pipe server did not stop within %.0f s", 3 * STOP_S)
        locked = self.cv.acquire(timeout=3 * STOP_S)
        try:
            workers = [w for pool in self.pools.values() for w in pool.workers]
            for w in workers:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            deadline = time.monotonic() + STOP_S
            for w in workers:
                w.proc.join(max(deadline - time.monotonic(), 0.0))
            for w in workers:
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join(STOP_S)
                w.conn.close()
                for block in w.tasks.values():
                    discard_block(block)
                w.tasks.clear()
            self._selector.close()
            self._forker.shutdown(wait=False)
            self.cv.notify_all()
        finally:
            if locked:
                self.cv.release()

    # --- the server -----------------------------------------------------------------------------

    def _serve(self) -> None:
        """Take replies and deaths as they come and keep every free worker busy (a thread)."""
        try:
            while not self.closed:
                events = self._selector.select(POLL_S)
                if not events:
                    continue
                with self.cv:
                    if self.closed:
                        return
                    for key, _ in events:
                        pool, worker = key.data
                        if worker in pool.workers and pool.error is None:
                            self._on_event(pool, worker, replied=key.fileobj is worker.conn)
                    self.cv.notify_all()
        except BaseException as exc:  # fetch() sees the server gone and raises a DataError from it
            self.failure = exc

    def _on_event(self, pool: Pool, worker: Worker, replied: bool) -> None:
        pool.events += 1
        try:
            if not (replied and self._receive(pool, worker)):
                self._requeue(pool, self._reap(pool, worker))
                self._hand_out(pool)
        except DataError as exc:
            pool.error = exc
            for w in pool.workers:  # nothing more to take from this pool: close() stops them
                self._unwatch(w)

    def _hand_out(self, pool: Pool) -> None:
        """Give the earliest queued tasks to free workers; resend a dead one's."""
        while pool.queued:
            free = [w for w in pool.workers if not w.retiring and not w.tasks]
            if not free:
                return
            worker, start = free[0], pool.queued.pop(0)
            self._serial += 1
            block = f"{self._blocks}{self._serial}"
            register_block(block)
            worker.tasks[start] = block
            try:
                worker.conn.send((start, self.chunk_docs, block))
            except OSError:
                self._requeue(pool, self._reap(pool, worker))

    @staticmethod
    def _requeue(pool: Pool, starts: Iterable[int]) -> None:
        for start in starts:
            bisect.insort(pool.queued, start)

    def _receive(self, pool: Pool, worker: Worker, hand_out: bool = True) -> bool:
        """Take one reply of ``worker``; False when its pipe is closed (it died)."""
        try:
            reply = worker.conn.recv()
        except (EOFError, OSError):
            return False
        block = worker.tasks.pop(reply[1])
        try:
            if hand_out:
                self._hand_out(pool)  # first: the worker waits for its next task while we copy this one
        finally:  # the block is ours now, whatever handing out raised
            tokens = take_block(block, reply[6]) if reply[0] == "ok" else discard_block(block)
        if reply[0] == "error":
            raise DataError(reply[2])
        _, start, records, lengths, skipped, cpu_s, _ = reply
        pool.ready[start] = Chunk(pool.source.name, start, records, lengths, tokens, skipped, cpu_s)
        return True

    # --- worker processes -----------------------------------------------------------------------

    def _spawn(self, pool: Pool) -> None:
        ours, theirs = self._ctx.Pipe()
        # A forkserver, not this process, is the parent of the workers it starts.
        parent = None if self.start_method == "forkserver" else os.getpid()
        proc = self._ctx.Process(
            target=worker_main,
            args=(pool.source, self.tokenizer, self.seed, theirs, parent),
            name=f"thruput-{pool.source.name}",
            daemon=True,
        )
        self._forker.submit(proc.start).result()
        theirs.close()  # the worker holds the only other end: its death reads as end-of-file here
        worker = Worker(proc, ours)
        pool.workers.append(worker)
        self._selector.register(ours, selectors.EVENT_READ, (pool, worker))
        self._selector.register(proc.sentinel, selectors.EVENT_READ, (pool, worker))

    def _unwatch(self, worker: Worker) -> None:
        for obj in (worker.conn, worker.proc.sentinel):
            try:
                self._selector.unregister(obj)
            except KeyError:
                pass  # already

    def _reap(self, pool: Pool, worker: Worker) -> list[int]:
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
        worker.proc.join(STOP_S)
        if worker.proc.is_alive():  # its pipe broke but it lives on: end it
            worker.proc.kill()
            worker.proc.join(STOP_S)
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


def _signal_name(exitcode: int | None) -> str:
    """`` (SIGKILL)`` for a worker ended by a signal (negative exit code), else nothing."""
    if exitcode is None or exitcode >= 0:
        return ""
    try:
        return f" ({signal.Signals(-exitcode).name})"
    except ValueError:
        return ""
