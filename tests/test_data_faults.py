"""The local data plane under faults: workers killed at random moments, a killed trainer, a dead producer.

Every wait here is bounded by the harness (a subprocess timeout, a polling deadline or a
watchdog thread), so a regression shows up as a failure, not as a hung test session.
"""
from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import psutil
import pytest
from test_data_loader import make_plan

from thruput.data import DataError, Loader

TESTS = Path(__file__).parent
SHM = Path("/dev/shm")
needs_shm = pytest.mark.skipif(not SHM.is_dir(), reason="needs /dev/shm to see shared-memory blocks")


def blocks_of(pid: int) -> set[str]:
    """Shared-memory blocks made for the Loader in process ``pid`` (other tests run in parallel)."""
    return {p.name for p in SHM.glob(f"thr_{pid}_*")}


def until(condition, timeout_s: float, poll_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def running(procs: list[psutil.Process]) -> list[psutil.Process]:
    def alive(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [p for p in procs if alive(p)]


def bounded(fn, timeout_s: float = 60.0):
    """``fn()``'s result or exception, or a test failure if it has not returned within ``timeout_s``."""
    out: dict[str, object] = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"still blocked after {timeout_s} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


@needs_shm
def test_workers_killed_at_random_moments_lose_and_repeat_nothing():
    # 20 trials in one subprocess (one torch import); its timeout is the bound on a hang.
    cmd = [sys.executable, str(TESTS / "_fault_trials.py"), "20", "12", "7"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=TESTS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(trials) == 20
    for t in trials:
        assert t["outcome"] in ("same", "DataError"), t  # bitwise the uninterrupted batches, or an error
        assert t["leaked"] == [], t
        if t["outcome"] == "DataError":
            assert t["max_failures"] == 1, t
            assert re.match(r"source '\w+': worker process \d+ died with exit code -9 \(SIGKILL\), death 2 ", t["error"]), t
    survived = [t for t in trials if t["outcome"] == "same" and t["kills"]]
    assert sum(t["kills"] for t in survived) >= 10  # the kills did land on runs that then delivered
    assert any(t["outcome"] == "DataError" for t in trials)


@needs_shm
@pytest.mark.parametrize("notice", ["pdeathsig", "ppid-check"])
def test_killed_trainer_leaves_no_worker_tracker_or_block(notice):
    proc = subprocess.Popen([sys.executable, str(TESTS / "_hold_loader.py"), notice],
                            stdout=subprocess.PIPE, text=True, cwd=TESTS)
    try:
        line = bounded(proc.stdout.readline, 120)
        pid = json.loads(line)["pid"]
        assert until(lambda: blocks_of(pid), 20), "the workers' prefetch never reached shared memory"
        children = psutil.Process(pid).children(recursive=True)
        names = [" ".join(c.cmdline()) for c in children]
        assert sum("resource_tracker" in n for n in names) == 1 and len(children) == 3 * 2 + 1, names
    finally:
        proc.kill()
        proc.wait(30)
    assert until(lambda: not running(children), 20), [c.pid for c in running(children)]
    assert until(lambda: not blocks_of(pid), 10), blocks_of(pid)  # the tracker unlinked what no one took


def test_consumer_notices_the_prefetch_thread_died(monkeypatch):
    import thruput.data.loader as loader_module

    monkeypatch.setattr(loader_module, "_produce", lambda *args: None)  # a thread that ends without a word
    with Loader(make_plan(world_size=1), backend="inline") as loader:
        with pytest.raises(DataError, match="prefetch thread ended without a batch or an error"):
            bounded(lambda: next(loader), 30)


def test_prefetch_thread_and_workers_stop_when_the_loader_is_dropped():
    loader = Loader(make_plan(world_size=1), backend="process", workers={"min_workers": 1, "max_workers": 1})
    next(loader)  # the thread now blocks putting prefetched batches nobody takes
    thread = loader._thread
    workers = [psutil.Process(pid) for pids in loader.backend.pids().values() for pid in pids]
    gone = weakref.ref(loader)
    del loader
    gc.collect()
    assert gone() is None  # nothing (the prefetch thread included) keeps a dropped Loader alive
    thread.join(30)
    assert not thread.is_alive()
    assert until(lambda: not running(workers), 10)
