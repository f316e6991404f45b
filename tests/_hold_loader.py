"""A process that holds a process-backend Loader and then waits to be killed, for test_data_faults.

Usage: python tests/_hold_loader.py pdeathsig|ppid-check

After the first batch it stops the thread that takes the workers' replies (holding its lock)
while the workers are busy, so their finished chunks stay in shared memory: blocks nobody took.
Then it prints ``{"pid": ...}`` and sleeps. ``ppid-check`` turns the kernel's parent-death
signal off in the workers, so only the portable parent-pid check can notice the kill.
"""
from __future__ import annotations

import json
import os
import sys
import time

from test_data_loader import docs, make_plan

from thruput.data import Loader, MemorySource
from thruput.data.backends.process import worker as worker_process


def slow(record):
    time.sleep(0.02)  # the workers are still busy when the replies stop being taken
    return record


def main() -> None:
    if sys.argv[1] == "ppid-check":
        worker_process.set_parent_death_signal = lambda: False  # inherited by the forked workers
    sources = [MemorySource(n, docs(n, 40, i), transform=slow) for i, n in enumerate("abc")]
    plan = make_plan(sources=sources, world_size=1)
    loader = Loader(plan, backend="process", workers={"min_workers": 2, "max_workers": 2, "chunk_docs": 3})
    next(loader)
    loader.backend._workers.cv.acquire()
    print(json.dumps({"pid": os.getpid()}), flush=True)
    time.sleep(120)


if __name__ == "__main__":
    main()
