"""Local process backend: shared-memory transport, ordering, backpressure, autoscaling, failures."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from thruput.data import ByteTokenizer, DataError, MemorySource
from thruput.data.backend import InlineBackend
from thruput.data.workers import ProcessBackend


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
