"""What runs inside a source-loader worker process, and the shared-memory blocks it hands over.

A worker reads tasks ``(start, count, block)`` from its own pipe, tokenizes stream positions
``[start, start + count)`` and writes the tokens into a new shared-memory block named ``block``
(the name is chosen by the consumer, so the consumer can free the block of a worker that died
half way). It answers on the same pipe. A private pipe per worker, not a queue shared by the
pool: a process killed while holding a ``multiprocessing.Queue``'s lock wedges that queue for
every other process; a pipe has no lock and one reader and one writer.

Who frees a block: the consumer registers every name with multiprocessing's resource tracker
before it sends the task, and unregisters it when it copies the tokens out and unlinks the
block (or discards a dead worker's unanswered task). If the consumer itself is killed, its
workers die with it (``PR_SET_PDEATHSIG`` on Linux, a parent-pid check elsewhere), the last
holder of the tracker's pipe is gone, and the tracker unlinks every name still registered.
"""
from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
import threading
import time
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

from thruput.data.errors import DataError
from thruput.data.sources import Source
from thruput.data.stream import StreamOrder, tokenize_chunk
from thruput.data.tokenize import Tokenizer

PARENT_CHECK_S = 0.5  # how often a worker without the kernel's help checks that its parent lives
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None) -> None:
    """Have the kernel SIGKILL this process when its parent ends; exit now if it already has.

    ``parent_pid``: the expected parent (None when it is not the consumer, e.g. a forkserver).
    Where the kernel cannot (not Linux), a thread checks the parent's pid every ``PARENT_CHECK_S``.
    """
    parent = os.getppid() if parent_pid is None else parent_pid
    if not set_parent_death_signal():
        threading.Thread(target=_exit_when_orphaned, args=(parent,), name="thruput-parent", daemon=True).start()
    if os.getppid() != parent:
        os._exit(0)  # the parent died before the signal was set


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def set_parent_death_signal() -> bool:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on Linux; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def worker_main(source: Source, tokenizer: Tokenizer, seed: int, conn: Any, parent_pid: int | None) -> None:
    """Serve tasks from ``conn`` until told to stop (``None``); the process ends with its parent."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle; it stops us
    # A forked worker shares the trainer's heap until it writes to it; a full collection would
    # write to every inherited object (~40 MiB private per worker, measured): keep them out of it.
    gc.freeze()
    order = StreamOrder(source, seed)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        start, count, block = task
        try:
            chunk = tokenize_chunk(source, tokenizer, order, start, count)
            if chunk.tokens.size:
                write_block(block, chunk.tokens)
        except Exception as exc:
            message = str(exc) if isinstance(exc, DataError) else f"source '{source.name}': {exc!r}"
            reply: tuple[Any, ...] = ("error", start, message)
        else:
            reply = ("ok", start, chunk.records, chunk.lengths, chunk.skipped, chunk.cpu_s, chunk.tokens.size)
        try:
            conn.send(reply)
        except OSError:
            return  # the consumer is gone


def write_block(name: str, tokens: np.ndarray) -> None:
    """Create shared-memory block ``name`` holding ``tokens`` (int32)."""
    shm = shared_memory.SharedMemory(name=name, create=True, size=tokens.nbytes)
    try:
        np.ndarray(tokens.shape, np.int32, buffer=shm.buf)[:] = tokens
    finally:
        shm.close()


def take_block(name: str, size: int) -> np.ndarray:
    """Copy ``size`` int32 tokens out of block ``name`` and free it (no block when ``size`` is 0)."""
    if not size:
        discard_block(name)
        return np.zeros(0, dtype=np.int32)
    shm = shared_memory.SharedMemory(name=name)
    try:
        return np.ndarray((size,), np.int32, buffer=shm.buf).copy()
    finally:
        shm.close()
        shm.unlink()  # also unregisters it from the resource tracker


def register_block(name: str) -> None:
    """Have the resource tracker unlink block ``name`` should every process using it die."""
    resource_tracker.register(_tracked(name), "shared_memory")


def discard_block(name: str) -> None:
    """Free block ``name`` if it was (even partly) created, and drop it from the resource tracker."""
    try:
        shared_memory._posixshmem.shm_unlink(_tracked(name))  # what SharedMemory.unlink calls; works on an empty block
    except FileNotFoundError:
        pass
    resource_tracker.unregister(_tracked(name), "shared_memory")


def _tracked(name: str) -> str:
    return "/" + name  # SharedMemory prepends the slash POSIX wants, and tracks that name
