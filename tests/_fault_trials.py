"""Process-backend Loaders whose workers are SIGKILLed, for test_data_faults (run in a subprocess).

Usage: python tests/_fault_trials.py TRIALS STEPS SEED

Prints one JSON line per trial: ``{"trial", "outcome": "same" | "differs" | "DataError", "kills",
"error", "leaked"}`` where ``leaked`` lists this process's shared-memory blocks left after close.
Trials kill workers at random moments from a second thread; some also have a worker kill itself
right after it created a block, before it replied (a half-delivered chunk). The harness bounds
the wall time: a trial that hangs stops the output.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

from test_data_loader import make_plan, same, take

from thruput.data import DataError, Loader
from thruput.data.backends.process import worker as worker_process

SHM = Path("/dev/shm")


def own_blocks() -> list[str]:
    return sorted(p.name for p in SHM.glob(f"thr_{os.getpid()}_*")) if SHM.is_dir() else []


def die_after_some_blocks(every: int):
    """A write_block that SIGKILLs its process after creating every ``every``-th block (inherited by fork)."""
    original = worker_process.write_block
    count = [0]

    def write_block(name, tokens):
        original(name, tokens)
        count[0] += 1
        if count[0] % every == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    return original, write_block


def killer(backend, rng: random.Random, stop: threading.Event, kills: list[int], rate_s: float) -> None:
    """SIGKILL a random worker of a random source every U(0, 2 * rate_s) seconds."""
    while not stop.wait(rng.uniform(0, 2 * rate_s)):
        pids = [pid for pool in backend.pids().values() for pid in pool] if not stop.is_set() else []
        if pids:
            try:
                os.kill(rng.choice(pids), signal.SIGKILL)
                kills.append(1)
            except (ProcessLookupError, RuntimeError):
                pass  # already gone, or the pools changed while we looked


def main() -> None:
    trials, steps, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    plan = make_plan(world_size=1)
    with Loader(plan, backend="inline") as loader:
        reference = take(loader, steps)
    rng = random.Random(seed)
    for trial in range(trials):
        # Every fourth trial tolerates at most one death per source: those must end in DataError.
        max_failures = 1 if trial % 4 == 3 else 1000
        workers = {"min_workers": 2, "max_workers": 2, "chunk_docs": 3, "prefetch_chunks": 3,
                   "max_failures": max_failures, "wait_s": 30.0}
        original = None
        if trial % 3 == 1:
            original, worker_process.write_block = die_after_some_blocks(every=rng.randint(2, 5))
        stop, kills = threading.Event(), []
        outcome, error = "same", ""
        loader = Loader(plan, backend="process", workers=workers)
        try:
            got = [next(loader)]  # workers exist from here on
            thread = threading.Thread(target=killer, args=(loader.backend, rng, stop, kills, 0.05), daemon=True)
            thread.start()
            got += take(loader, steps - 1)
            if not all(same(a, b) for a, b in zip(got, reference, strict=True)):
                outcome = "differs"
        except DataError as exc:
            outcome, error = "DataError", str(exc)
        finally:
            stop.set()
            loader.close()
            if original is not None:
                worker_process.write_block = original
        time.sleep(0.05)  # let the killer thread notice the stop
        print(json.dumps({"trial": trial, "outcome": outcome, "kills": len(kills), "error": error,
                          "max_failures": max_failures, "leaked": own_blocks()}), flush=True)


if __name__ == "__main__":
    main()
