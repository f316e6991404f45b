"""Chrome / Perfetto trace of a run document: phases as slices, clocks as counter tracks.

Open the file in https://ui.perfetto.dev or chrome://tracing. Phase slices are laid end to end
inside each step in the order of ``PHASES`` (the profiler records durations, not the order in
which phases interleave), so the picture shows shares, not exact start times within a step.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def chrome_trace(document: dict[str, Any]) -> dict[str, Any]:
    """Trace-event JSON (``{"traceEvents": [...]}``), times in microseconds."""
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": f"thruput: {document['name']}"}},
        {"ph": "M", "pid": 1, "tid": 1, "name": "thread_name", "args": {"name": "steps"}},
        {"ph": "M", "pid": 1, "tid": 2, "name": "thread_name", "args": {"name": "phases"}},
    ]
    for step in document["steps"]:
        start = step["start_s"] * 1e6
        events.append({"ph": "X", "pid": 1, "tid": 1, "name": f"step {step['step']}", "ts": start,
                       "dur": step["time_s"] * 1e6, "args": {"tokens": step["tokens"]}})
        t = start
        for phase in document["phases"]:
            dur = step["phases"].get(phase, 0.0) * 1e6
            if dur > 0:
                events.append({"ph": "X", "pid": 1, "tid": 2, "name": phase, "ts": t, "dur": dur})
                t += dur
    clocks = document.get("clocks") or {}
    for source, series in (clocks.get("series") or {}).items():
        metrics = [k for k in series if k not in ("t", "throttle_reasons")]
        for i, t in enumerate(series["t"]):
            events.append({"ph": "C", "pid": 1, "name": f"{source} clocks", "ts": t * 1e6,
                           "args": {m: series[m][i] for m in metrics if "mhz" in m}})
            others = {m: series[m][i] for m in metrics if "mhz" not in m}
            if others:
                events.append({"ph": "C", "pid": 1, "name": f"{source} power/thermal", "ts": t * 1e6,
                               "args": others})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def save_trace(document: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(document)))
    return path
