"""Local process backend: shared-memory transport, ordering, backpressure, autoscaling, failures."""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from thruput.data import ByteTokenizer, DataError, MemorySource
from thruput.data.backends import InlineBackend
from thruput.data.backends.process.backend import ProcessBackend


def shm_names():
    return {n for n in os.listdir("/dev/shm")} if os.path.isdir("/dev/shm") else set()


def spin(record):
    """A transform ~20x costlier per token than plain bytes (CPU time, not sleep)."""
    t0 = time.process_time()
    while time.process_time() - t0 < 0.002:
        pass
    return record


def test_chunks_match_inline_in_order_and_shm_is_freed():
    sources = [MemorySource("a", [f"doc {i} " * (i % 5 + 1) for i in range(50)]), MemorySource("b", [[1, 2, 3]] * 7)]
    before = shm_names()
    proc = ProcessBackend(min_workers=2, max_workers=2, chunk_docs=6)
    inline = InlineBackend(chunk_docs=6)
    for b in (proc, inline):
        b.start(sources, ByteTokenizer(), seed=5, positions={"a": 12, "b": 3})
    try:
        for _ in range(12):
            for name in ("a", "b"):
                x, y = proc.fetch(name), inline.fetch(name)
                assert x.start == y.start
                assert np.array_equal(x.records, y.records) and np.array_equal(x.lengths, y.lengths)
                assert np.array_equal(x.tokens, y.tokens)
    finally:
        proc.close()
    assert shm_names() <= before  # every block unlinked, including prefetched ones never read


def test_prefetch_is_bounded():
    src = MemorySource("a", ["x" * 10] * 100)
    proc = ProcessBackend(min_workers=1, max_workers=1, chunk_docs=4, prefetch_chunks=3)
    proc.start([src], ByteTokenizer(), seed=0, positions={"a": 0})
    try:
        proc.fetch("a")
        time.sleep(0.3)
        pool = proc._pools["a"]
        in_flight = (pool.next_submit - pool.next_fetch) // 4
        assert in_flight == 3 and len(pool.ready) <= 3
    finally:
        proc.close()


def test_targets_follow_cost_per_token_within_budget():
    src = [MemorySource(n, ["x"]) for n in "abcd"]
    proc = ProcessBackend(min_workers=1, max_workers=5, cpu_budget=8)
    proc.start(src, ByteTokenizer(), seed=0, positions={n: 0 for n in "abcd"})
    try:
        for name, cost in zip("abcd", (20.0, 1.0, 1.0, 1.0)):
            pool = proc._pools[name]
            pool.cpu_s, pool.tokens, pool.fetched_tokens = cost * 1000, 1000, 1000
        targets = proc.targets()
        assert targets == {"a": 5, "b": 1, "c": 1, "d": 1}
        assert sum(targets.values()) <= 8
    finally:
        proc.close()


def test_targets_stay_within_budget_when_min_workers_raise_cheap_sources():
    src = [MemorySource(n, ["x"]) for n in "abcd"]
    proc = ProcessBackend(min_workers=1, max_workers=6, cpu_budget=6)
    proc.start(src, ByteTokenizer(), seed=0, positions={n: 0 for n in "abcd"})
    try:
        for name, cost in zip("abcd", (40.0, 1.0, 1.0, 1.0)):
            pool = proc._pools[name]
            pool.cpu_s, pool.tokens, pool.fetched_tokens = cost * 1000, 1000, 1000
        assert proc.targets() == {"a": 3, "b": 1, "c": 1, "d": 1}  # a's share is 5.6 of 6
    finally:
        proc.close()


@pytest.mark.slow
def test_autoscaling_gives_the_slow_source_more_workers():
    slow = MemorySource("slow", ["y" * 50] * 400, transform=spin)
    fast = MemorySource("fast", ["z" * 50] * 400)
    proc = ProcessBackend(min_workers=1, max_workers=3, cpu_budget=4, chunk_docs=4, rescale_every=4)
    proc.start([slow, fast], ByteTokenizer(), seed=0, positions={"slow": 0, "fast": 0})
    try:
        for _ in range(8):
            proc.fetch("slow")
            proc.fetch("fast")
        stats = proc.stats()
        assert stats["workers"] == {"slow": 3, "fast": 1}
        assert stats["cpu_s_per_token"]["slow"] > 5 * stats["cpu_s_per_token"]["fast"]
    finally:
        proc.close()


def test_pools_scale_as_soon_as_every_source_is_measured():
    slow = MemorySource("slow", ["y" * 50] * 40, transform=spin)
    fast = MemorySource("fast", ["z" * 50] * 40)
    proc = ProcessBackend(min_workers=1, max_workers=3, cpu_budget=4, chunk_docs=4, rescale_every=1000)
    proc.start([slow, fast], ByteTokenizer(), seed=0, positions={"slow": 0, "fast": 0})
    try:
        proc.fetch("slow")
        assert proc.stats()["workers"] == {"slow": 1, "fast": 1}  # "fast" not measured yet
        proc.fetch("fast")
        assert proc.stats()["workers"] == {"slow": 3, "fast": 1}
    finally:
        proc.close()


def die(record):
    os._exit(3)


def test_worker_death_is_reported():
    proc = ProcessBackend(min_workers=1, max_workers=1)
    proc.start([MemorySource("m", ["x"], transform=die)], ByteTokenizer(), seed=0, positions={"m": 0})
    try:
        with pytest.raises(DataError, match=r"source 'm': worker process \d+ died with exit code 3"):
            proc.fetch("m")
    finally:
        proc.close()


def test_bad_worker_options():
    with pytest.raises(DataError, match="min_workers <= max_workers"):
        ProcessBackend(min_workers=3, max_workers=2)
    with pytest.raises(DataError, match="chunk_docs and prefetch_chunks"):
        ProcessBackend(chunk_docs=0)


def fetch_all_like_inline(proc, sources, positions, n):
    inline = InlineBackend(chunk_docs=proc.options.chunk_docs)
    inline.start(sources, ByteTokenizer(), seed=5, positions=positions)
    for _ in range(n):
        for s in sources:
            x, y = proc.fetch(s.name), inline.fetch(s.name)
            assert x.start == y.start and np.array_equal(x.records, y.records)
            assert np.array_equal(x.lengths, y.lengths) and np.array_equal(x.tokens, y.tokens)


def test_idle_worker_killed_is_replaced_and_its_tasks_redone():
    # An idle worker waits for a task: with a queue shared by the pool it would hold the queue's
    # read lock, and killing it would wedge the queue for its siblings. Here each has its own pipe.
    sources = [MemorySource("a", [f"doc {i} " * (i % 5 + 1) for i in range(60)])]
    proc = ProcessBackend(min_workers=2, max_workers=2, chunk_docs=4, prefetch_chunks=4)
    proc.start(sources, ByteTokenizer(), seed=5, positions={"a": 0})
    try:
        fetch_all_like_inline(proc, sources, {"a": 0}, 1)
        time.sleep(0.3)  # the prefetch is answered: both workers wait on their pipes
        victim = proc.pids()["a"][0]
        os.kill(victim, signal.SIGKILL)
        inline_from = proc._pools["a"].next_fetch
        fetch_all_like_inline(proc, sources, {"a": inline_from}, 20)
        assert proc.stats()["worker_failures"] == {"a": 1}
        assert victim not in proc.pids()["a"] and len(proc.pids()["a"]) == 2
    finally:
        proc.close()


def test_block_of_a_worker_killed_before_it_replied_is_unlinked(tmp_path, monkeypatch):
    from thruput.data.backends.process import worker as worker_process

    flag = tmp_path / "died"
    original = worker_process.write_block

    def create_then_die(name, tokens):  # in the forked workers: the first one to get here dies
        original(name, tokens)
        try:
            fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, name.encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(worker_process, "write_block", create_then_die)
    sources = [MemorySource("a", [f"doc {i} " * (i % 5 + 1) for i in range(60)])]
    proc = ProcessBackend(min_workers=2, max_workers=2, chunk_docs=4)
    proc.start(sources, ByteTokenizer(), seed=5, positions={"a": 0})
    try:
        fetch_all_like_inline(proc, sources, {"a": 0}, 20)
        block = flag.read_text()
        assert block.startswith(f"thr_{os.getpid()}_") and proc.stats()["worker_failures"] == {"a": 1}
        assert block not in shm_names()
        with proc._workers.cv:  # the pipe server is not taking a block meanwhile
            in_flight = {b for pool in proc._pools.values() for w in pool.workers for b in w.tasks.values()}
            assert {n for n in shm_names() if n.startswith(f"thr_{os.getpid()}_")} <= in_flight
    finally:
        proc.close()
    assert not {n for n in shm_names() if n.startswith(f"thr_{os.getpid()}_")}


def test_hung_source_raises_after_wait_s_and_close_kills_its_worker():
    proc = ProcessBackend(min_workers=1, max_workers=1, wait_s=0.5)
    proc.start([MemorySource("m", ["x"], transform=lambda r: time.sleep(3600))], ByteTokenizer(), seed=0, positions={"m": 0})
    with pytest.raises(DataError, match=r"source 'm': no chunk for 0.5 s from its 1 live worker processes"):
        proc.fetch("m")
    pid = proc.pids()["m"][0]
    proc.close()  # the worker never answers the stop: it is killed
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_fetch_notices_that_the_pipe_server_died(monkeypatch):
    from thruput.data.backends.process.pools import WorkerPools

    def broken(self, pool, worker, replied):
        raise RuntimeError("boom")

    monkeypatch.setattr(WorkerPools, "_on_event", broken)
    proc = ProcessBackend(min_workers=1, max_workers=1)
    proc.start([MemorySource("m", ["x"] * 8)], ByteTokenizer(), seed=0, positions={"m": 0})
    try:
        with pytest.raises(DataError, match=r"thread serving the worker pipes died: RuntimeError\('boom'\)"):
            proc.fetch("m")
    finally:
        proc.close()
