"""Per-rank truth before the collective: compute up to a collective, and the wait inside it.

Data-parallel collectives make every rank wait for the slowest, so a rank's own phase times
cannot tell "slow" from "waiting for the slow one". Each collective that thruput issues
(``GradientBuckets``, ZeRO-2, the loss all-reduce of ``thruput train``) and each one that
``thruput run`` sees is wrapped in ``with collective():``; inside an open ``StepProfiler``
step (``StepProfiler(collectives=True)``, the default) that records, per step:

* ``comm_wait``: seconds inside collectives (waiting for the other ranks, plus the transfer);
* ``compute_before_comm``: seconds from the step's start to entering its *last* collective,
  less the time inside the earlier ones and less ``data_wait``: this rank's own work before
  the step's final synchronisation, which a slow rank has more of and a waiting rank does not.

A step with no collective records ``None`` for both (absent, not zero). Nested collectives
(a ``thruput run`` hook around a thruput collective) count once, at the outermost.

On CPU both are host wall time (``time.perf_counter``). On CUDA they come from CUDA events
recorded on the current stream before and after each collective (NCCL makes the current
stream wait for its work), read when the profiler resolves the step, one step late, never
with a synchronize. Outside an open step, or with ``collectives=False``, ``collective()``
returns a shared null context: one global read on the hot path. Only the thread that opened
the step records.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import torch

_open: "StepCollectives | None" = None  # the open step's accumulator (one training loop per process)


class StepCollectives:
    """The collectives of one step. ``t0``: the step's host start; ``phases``: the step's
    host phase times (its ``data_wait`` so far is read at each collective's entry)."""

    __slots__ = ("t0", "phases", "cuda", "thread", "depth", "wait", "count", "last_enter", "wait_before_last",
                 "data_before_last", "spans", "last_index")

    def __init__(self, t0: float, phases: dict[str, float], cuda: bool) -> None:
        self.t0, self.phases, self.cuda = t0, phases, cuda
        self.thread = threading.get_ident()
        self.depth = 0
        self.wait = 0.0
        self.count = 0
        self.last_enter = 0.0
        self.wait_before_last = 0.0
        self.data_before_last = 0.0
        self.spans: list[tuple[Any, Any]] = []  # CUDA: (enter event, exit event) per collective
        self.last_index = 0

    def resolve(self, start_event: Any = None) -> tuple[float | None, float | None]:
        """``(compute_before_comm, comm_wait)`` in seconds, or ``(None, None)`` without a
        collective. CUDA: ``start_event`` is the step's start event; every event has completed."""
        if not self.count:
            return None, None
        if not self.cuda:
            before = self.last_enter - self.t0 - self.wait_before_last - self.data_before_last
            return max(0.0, before), self.wait
        waits = [enter.elapsed_time(exit_) / 1e3 for enter, exit_ in self.spans]
        last_enter = self.spans[self.last_index][0]
        before = start_event.elapsed_time(last_enter) / 1e3 - sum(waits[:self.last_index]) - self.data_before_last
        return max(0.0, before), sum(waits)


class _Span:
    """Context manager around one collective call (or one wait on an async collective)."""

    __slots__ = ("acc", "t0", "event")

    def __init__(self, acc: StepCollectives) -> None:
        self.acc = acc

    def __enter__(self) -> "_Span":
        acc = self.acc
        acc.depth += 1
        if acc.depth == 1:
            acc.wait_before_last = acc.wait
            acc.data_before_last = acc.phases.get("data_wait", 0.0)
            if acc.cuda:
                self.event = torch.cuda.Event(enable_timing=True)
                self.event.record()
            self.t0 = acc.last_enter = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        acc = self.acc
        acc.depth -= 1
        if acc.depth:
            return
        if acc.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            acc.last_index = len(acc.spans)
            acc.spans.append((self.event, end))
        else:
            acc.wait += time.perf_counter() - self.t0
        acc.count += 1


_NULL = contextlib.nullcontext()  # reusable: a disabled step, phase or collective costs one call


def collective() -> "_Span | contextlib.nullcontext[None]":
    """Context manager around one blocking collective (or the ``wait()`` of an async one),
    recorded into the open profiled step; a no-op when no step is open, and on another thread
    than the one that opened it (a background optimizer update is not the step's critical path)."""
    acc = _open
    return _NULL if acc is None or acc.thread != threading.get_ident() else _Span(acc)


def open_step(acc: StepCollectives | None) -> None:
    """Make ``acc`` the step that collectives are recorded into (None: none). Called by
    ``StepProfiler``'s step context."""
    global _open
    _open = acc
