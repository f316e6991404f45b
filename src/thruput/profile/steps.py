"""StepProfiler: each training step split into named phases, plus throughput, MFU and memory.

Usage::

    prof = StepProfiler(flops_per_token=model.flops_per_token(), clocks=ClockSampler())
    batches = prof.wrap_loader(loader)          # time blocked in next() -> data_wait
    for step in range(n):
        with prof.step(tokens=batch_tokens, samples=batch_size):
            batch = next(batches)
            with prof.phase("forward"): loss = ...
            with prof.phase("backward"): loss.backward()
            with prof.phase("optimizer"): opt.step()
    prof.summary()

On CPU phases are timed with ``time.perf_counter``. On CUDA, device phases are timed with CUDA
events that are read one step late (``query()`` only, never a synchronize) so profiling does
not stall the pipeline; ``data_wait`` is always host time because it is the host that waits.
Time inside a step that no phase covers is reported as ``other``.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from thruput.profile import collectives as _collectives
from thruput.profile.clocks import ClockSampler
from thruput.profile.memory import memory_capacity, peak_rss_bytes, reset_peak_rss, rss_bytes
from thruput.profile.step_stats import clock_summary, padding_ratio, quantile

PHASES = ("data_wait", "h2d", "forward", "backward", "optimizer", "comm", "other")
HOST_PHASES = frozenset({"data_wait"})


@dataclass
class StepRecord:
    """One finished step. Times in seconds; ``start`` is host perf_counter time."""

    step: int
    start: float
    time_s: float
    phases: dict[str, float]
    tokens: int
    samples: int
    useful_tokens: int
    flops: float | None
    memory_bytes: int
    counters: dict[str, float] = field(default_factory=dict)
    clock: dict[str, dict] = field(default_factory=dict)
    host_end: float = 0.0
    scalars: dict[str, float] = field(default_factory=dict)  # values known after the step: loss, lr
    # Distributed steps (profile.collectives): own work before the last collective, time inside them.
    compute_before_comm: float | None = None
    comm_wait: float | None = None


class _Phase:
    """Context manager timing one phase; a class rather than a generator for lower overhead."""

    __slots__ = ("prof", "name", "t0", "events")

    def __init__(self, prof: "StepProfiler", name: str) -> None:
        self.prof, self.name = prof, name

    def __enter__(self) -> "_Phase":
        if self.prof._cuda and self.name not in HOST_PHASES:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.events = start
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        open_step = self.prof._open
        if open_step is None:
            return
        if self.prof._cuda and self.name not in HOST_PHASES:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            open_step.events.append((self.name, self.events, end))
        else:
            dt = time.perf_counter() - self.t0
            open_step.phases[self.name] = open_step.phases.get(self.name, 0.0) + dt


class _Step:
    """Context manager for one step; collects phase times until the step is resolved."""

    __slots__ = ("prof", "index", "tokens", "samples", "useful_tokens", "flops", "phases",
                 "events", "counters", "scalars", "t0", "t1", "start_event", "end_event", "memory_bytes",
                 "collectives")

    def __init__(self, prof: "StepProfiler", index: int, tokens: int, samples: int,
                 useful_tokens: int | None, flops: float | None) -> None:
        self.prof, self.index = prof, index
        self.tokens, self.samples = tokens, samples
        self.useful_tokens = tokens if useful_tokens is None else useful_tokens
        self.flops = flops
        self.phases: dict[str, float] = {}
        self.events: list[tuple[str, Any, Any]] = []
        self.counters: dict[str, float] = {}
        self.scalars: dict[str, float] = {}
        self.start_event = self.end_event = None
        self.collectives: _collectives.StepCollectives | None = None

    def __enter__(self) -> "_Step":
        self.prof._open = self
        if self.prof._cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()
        self.t0 = time.perf_counter()
        if self.prof.collectives:
            self.collectives = _collectives.StepCollectives(self.t0, self.phases, self.prof._cuda)
            _collectives.open_step(self.collectives)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.t1 = time.perf_counter()
        prof = self.prof
        prof._open = None
        if self.collectives is not None:
            _collectives.open_step(None)
        if exc_type is not None:
            return
        if prof._cuda:
            self.end_event = torch.cuda.Event(enable_timing=True)
            self.end_event.record()
            self.memory_bytes = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.memory_bytes = rss_bytes()
        prof._pending.append(self)
        prof._last_scalars = self.scalars
        prof._resolve(block=False)


class StepProfiler:
    """Splits steps into phases and summarises throughput, MFU, memory and clocks.

    Args:
        device: where the model runs; "cuda" enables event timing.
        flops_per_token: model training FLOPs per token (e.g. ``GPT.flops_per_token()``), for
            MFU; a step may pass ``flops=`` instead.
        peak_flops: peak FLOP/s of one device for MFU; None means MFU is not reported.
        clocks: a ClockSampler; the profiler starts and stops it.
        warmup_steps: steps left out of the summary (compilation, allocator warm-up).
        enabled: when False every call is a cheap no-op (for A/B overhead measurement).
        collectives: record each step's ``compute_before_comm`` and ``comm_wait`` from the
            collectives wrapped in ``thruput.profile.collectives.collective()`` (see there).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        clocks: ClockSampler | None = None,
        warmup_steps: int = 1,
        enabled: bool = True,
        collectives: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self._cuda = enabled and self.device.type == "cuda"
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.clocks = clocks
        self.warmup_steps = warmup_steps
        self.enabled = enabled
        self.collectives = enabled and collectives
        self.records: list[StepRecord] = []
        self.meta: dict[str, Any] = {}
        self._pending: list[_Step] = []
        self._open: _Step | None = None
        self._last_scalars: dict[str, float] | None = None
        self._next_index = 0
        self._rss_window = enabled and not self._cuda and reset_peak_rss()
        if clocks is not None and enabled:
            clocks.start()

    # --- recording -------------------------------------------------------------------------

    def step(self, *, tokens: int, samples: int, useful_tokens: int | None = None,
             flops: float | None = None) -> "_Step | contextlib.nullcontext[None]":
        """Context manager around one training step. ``tokens`` counts every position fed to
        the model, ``useful_tokens`` the non-padding ones (defaults to ``tokens``)."""
        if not self.enabled:
            return _NULL
        index = self._next_index
        self._next_index += 1
        return _Step(self, index, tokens, samples, useful_tokens, flops)

    def phase(self, name: str) -> "_Phase | contextlib.nullcontext[None]":
        """Context manager timing ``name`` (one of PHASES but ``other``) inside the open step."""
        if not self.enabled:
            return _NULL
        if name not in PHASES or name == "other":
            raise ValueError(f"unknown phase {name!r}; expected one of {PHASES[:-1]}")
        return _Phase(self, name)

    def add_time(self, name: str, seconds: float) -> None:
        """Add externally measured host seconds to a phase of the open step (e.g. exposed
        communication time reported by a comm helper)."""
        if self._open is not None:
            if name not in PHASES or name == "other":
                raise ValueError(f"unknown phase {name!r}; expected one of {PHASES[:-1]}")
            self._open.phases[name] = self._open.phases.get(name, 0.0) + seconds

    def add_batch(self, tokens: int, samples: int, useful_tokens: int | None = None) -> None:
        """Add one batch's counts to the open step, for callers that learn them during the step
        (``thruput run`` counts the batches a loader yields); ``useful_tokens`` defaults to
        ``tokens``. Without an open step it does nothing."""
        if self._open is not None:
            self._open.tokens += tokens
            self._open.samples += samples
            self._open.useful_tokens += tokens if useful_tokens is None else useful_tokens

    def counter(self, name: str, value: float) -> None:
        """Attach a number to the open step (recompiles, padding ratio, ...)."""
        if self._open is not None:
            self._open.counters[name] = float(value)

    def record_scalar(self, name: str, value: float) -> None:
        """Attach a number to the newest finished step, for values read after it ends (the
        loss once ``.item()`` is called, the learning rate); the reports plot ``loss`` and
        ``lr``. A no-op before the first step."""
        if self._last_scalars is not None:
            self._last_scalars[name] = float(value)

    def wrap_loader(self, iterable: Iterable) -> Iterator:
        """Yield from ``iterable``, timing each blocking ``next()`` as ``data_wait``."""
        iterator = iter(iterable)
        while True:
            with self.phase("data_wait"):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item

    # --- resolution ------------------------------------------------------------------------

    def _resolve(self, block: bool) -> None:
        """Turn finished steps into records; CUDA steps only once their events completed."""
        while self._pending:
            pending = self._pending[0]
            if self._cuda:
                # Read one step late: the newest step stays pending unless blocking.
                if not block and (len(self._pending) < 2 or not pending.end_event.query()):
                    return
                if block:
                    pending.end_event.synchronize()
                time_s = pending.start_event.elapsed_time(pending.end_event) / 1e3
                phases = dict(pending.phases)
                for name, start, end in pending.events:
                    phases[name] = phases.get(name, 0.0) + start.elapsed_time(end) / 1e3
            else:
                time_s = pending.t1 - pending.t0
                phases = dict(pending.phases)
            self._pending.pop(0)
            before, wait = (pending.collectives.resolve(pending.start_event) if pending.collectives is not None
                            else (None, None))
            phases["other"] = max(0.0, time_s - sum(phases.values()))
            clock = self.clocks.window(pending.t0, pending.t1) if self.clocks is not None else {}
            flops = pending.flops
            if flops is None and self.flops_per_token is not None:
                flops = self.flops_per_token * pending.tokens
            self.records.append(StepRecord(
                step=pending.index, start=pending.t0, time_s=time_s,
                phases={p: phases.get(p, 0.0) for p in PHASES}, tokens=pending.tokens,
                samples=pending.samples, useful_tokens=pending.useful_tokens, flops=flops,
                memory_bytes=pending.memory_bytes, counters=pending.counters, clock=clock,
                host_end=pending.t1, scalars=pending.scalars, compute_before_comm=before, comm_wait=wait,
            ))

    def finish(self) -> None:
        """Resolve every pending step (one synchronize on CUDA) and stop the clock sampler."""
        if not self.enabled:
            return
        self._resolve(block=True)
        if self.clocks is not None:
            self.clocks.stop()
            # Late samples fall into the last steps' windows; re-read them now.
            for record in self.records[-2:]:
                record.clock = self.clocks.window(record.start, record.host_end)

    # --- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The finished steps as plain data, so a resumed run reports the whole run (one
        synchronize on CUDA to resolve pending steps)."""
        if self.enabled:
            self._resolve(block=True)
        return {"records": [asdict(r) for r in self.records], "next_index": self._next_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore earlier steps. Their host times come from another process, so they are
        shifted to end now: the timeline stays ordered, gaps between runs are not shown."""
        records = [StepRecord(**r) for r in state["records"]]
        if records:
            shift = time.perf_counter() - records[-1].host_end
            for r in records:
                r.start += shift
                r.host_end += shift
        self.records = records
        self._next_index = int(state["next_index"])

    # --- summary ---------------------------------------------------------------------------

    def measured(self) -> list[StepRecord]:
        """Records after warm-up (all of them if there are no more than the warm-up)."""
        self._resolve(block=False)
        return self.records[self.warmup_steps:] or self.records

    def summary(self) -> dict[str, Any]:
        """Summary over measured steps: step time (median, p90), throughput, MFU, memory,
        phase shares and clock statistics. Units: seconds, bytes, per second."""
        self.finish()
        records = self.measured()
        if not records:
            return {"steps": 0}
        times = [r.time_s for r in records]
        total = sum(times)
        phase_totals = {p: sum(r.phases[p] for r in records) for p in PHASES}
        flops = [r.flops for r in records]
        achieved = sum(flops) / total if all(f is not None for f in flops) and total > 0 else None
        peak_mem = max(r.memory_bytes for r in records)
        if not self._cuda:
            peak_mem = max(peak_mem, peak_rss_bytes())
        out: dict[str, Any] = {
            "steps": len(records),
            "warmup_steps": len(self.records) - len(records),
            "step_time_s": {"median": statistics.median(times), "p90": quantile(times, 0.9),
                            "mean": total / len(times), "min": min(times), "max": max(times)},
            "samples_per_s": sum(r.samples for r in records) / total,
            "tokens_per_s": sum(r.tokens for r in records) / total,
            "useful_tokens_per_s": sum(r.useful_tokens for r in records) / total,
            "padding_ratio": padding_ratio(records),
            "phase_share": {p: phase_totals[p] / total for p in PHASES},
            "phase_median_s": {p: statistics.median(r.phases[p] for r in records) for p in PHASES},
            "achieved_flops": achieved,
            "peak_flops": self.peak_flops,
            "mfu": achieved / self.peak_flops if achieved and self.peak_flops else None,
            "peak_memory_bytes": peak_mem,
            "memory_kind": "cuda_max_allocated" if self._cuda else
                           "process_rss" if self._rss_window else "process_rss_lifetime",
            "memory_capacity_bytes": memory_capacity(self.device if self._cuda else None),
        }
        waits = [r.comm_wait for r in records if r.comm_wait is not None]
        if waits:
            out["collectives"] = {
                "steps": len(waits),
                "compute_before_comm_median_s": statistics.median(
                    r.compute_before_comm for r in records if r.compute_before_comm is not None),
                "comm_wait_median_s": statistics.median(waits)}
        if self.clocks is not None:
            out["clocks"] = clock_summary(records, self.clocks)
        return out


_NULL = contextlib.nullcontext()  # reusable: a disabled step, phase or collective costs one call
