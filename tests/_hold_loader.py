"""A process that holds a process-backend Loader and then waits to be killed, for test_data_faults.

Usage: python tests/_hold_loader.py pdeathsig|ppid-check

Prints ``{"pid": ...}`` once the first batch is out and the workers' prefetch is in flight,
then sleeps. ``ppid-check`` turns the kernel's parent-death signal off in the workers, so only
the portable parent-pid check can notice the kill.
"""
from __future__ import annotations

import json
import os
import sys
import time

from test_data_loader import make_plan

from thruput.data import Loader
from thruput.data import worker_process


def main() -> None:
    if sys.argv[1] == "ppid-check":
        worker_process.set_parent_death_signal = lambda: False  # inherited by the forked workers
    loader = Loader(make_plan(world_size=1), backend="process", workers={"min_workers": 2, "max_workers": 2, "chunk_docs": 3})
    next(loader)
    print(json.dumps({"pid": os.getpid()}), flush=True)
    time.sleep(120)


if __name__ == "__main__":
    main()
