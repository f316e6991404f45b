"""Chrome / Perfetto trace of a run document: phases as slices, clocks as counter tracks.

Open the file in https://ui.perfetto.dev or chrome://tracing. A merged job (``job_trace``) has
one process track per rank. Phase slices are laid end to end
inside each step in the order of ``PHASES`` (the profiler records durations, not the order in
which phases interleave), so the picture shows shares, not exact start times within a step.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def chrome_trace(document: dict[str, Any]) -> dict[str, Any]:
    """Trace-event JSON (``{"traceEvents": [...]}``), times in microseconds."""
    return {"traceEvents": run_events(document), "displayTimeUnit": "ms"}


def run_events(document: dict[str, Any], pid: int = 1, offset_s: float = 0.0,
               label: str | None = None) -> list[dict[str, Any]]:
    """The trace events of one run as process ``pid``, shifted by ``offset_s`` seconds. A step
    with a per-rank record (``compute_before_comm``) also gets a ``rank`` track: its own work
    before the last collective, then the wait inside collectives."""
    name = label or f"thruput: {document['name']}"
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}},
        {"ph": "M", "pid": pid, "tid": 1, "name": "thread_name", "args": {"name": "steps"}},
        {"ph": "M", "pid": pid, "tid": 2, "name": "thread_name", "args": {"name": "phases"}},
    ]
    if any(s.get("compute_before_comm") is not None for s in document["steps"]):
        events.append({"ph": "M", "pid": pid, "tid": 3, "name": "thread_name",
                       "args": {"name": "work / wait at collectives"}})
    for step in document["steps"]:
        start = (step["start_s"] + offset_s) * 1e6
        events.append({"ph": "X", "pid": pid, "tid": 1, "name": f"step {step['step']}", "ts": start,
                       "dur": step["time_s"] * 1e6, "args": {"tokens": step["tokens"]}})
        t = start
        for phase in document["phases"]:
            dur = step["phases"].get(phase, 0.0) * 1e6
            if dur > 0:
                events.append({"ph": "X", "pid": pid, "tid": 2, "name": phase, "ts": t, "dur": dur})
                t += dur
        if step.get("compute_before_comm") is not None:
            work = (step["compute_before_comm"] + step["phases"].get("data_wait", 0.0)) * 1e6
            events.append({"ph": "X", "pid": pid, "tid": 3, "name": "work before collectives", "ts": start,
                           "dur": work})
            events.append({"ph": "X", "pid": pid, "tid": 3, "name": "comm wait", "ts": start + work,
                           "dur": step["comm_wait"] * 1e6})
    clocks = document.get("clocks") or {}
    for source, series in (clocks.get("series") or {}).items():
        metrics = [k for k in series if k not in ("t", "throttle_reasons")]
        for i, t in enumerate(series["t"]):
            ts = (t + offset_s) * 1e6
            events.append({"ph": "C", "pid": pid, "name": f"{source} clocks", "ts": ts,
                           "args": {m: series[m][i] for m in metrics if "mhz" in m}})
            others = {m: series[m][i] for m in metrics if "mhz" not in m}
            if others:
                events.append({"ph": "C", "pid": pid, "name": f"{source} power/thermal", "ts": ts, "args": others})
    return events


def job_trace(job: dict[str, Any]) -> dict[str, Any]:
    """Trace-event JSON of a merged job (``thruput.profile.job``): one process per rank, lined
    up by each rank's wall-clock ``origin_unix_s``."""
    offsets = rank_offsets(job)
    events = [e for rank, doc in job["documents"].items()
              for e in run_events(doc, pid=rank + 1, offset_s=offsets[rank], label=f"rank {rank}")]
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def rank_offsets(job: dict[str, Any]) -> dict[int, float]:
    """Rank -> seconds from the earliest rank's first step to its own (0 for every rank when a
    document has no ``origin_unix_s``: then first steps are lined up)."""
    origins = {r: d.get("origin_unix_s") for r, d in job["documents"].items()}
    if any(o is None for o in origins.values()):
        return {r: 0.0 for r in origins}
    first = min(origins.values())
    return {r: o - first for r, o in origins.items()}


def save_trace(document: dict[str, Any], path: str | Path) -> Path:
    """Write ``chrome_trace(document)`` to ``path``; returns the path."""
    return _write(chrome_trace(document), path)


def save_job_trace(job: dict[str, Any], path: str | Path) -> Path:
    """Write ``job_trace(job)`` to ``path``; returns the path."""
    return _write(job_trace(job), path)


def _write(trace: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace))
    return path
