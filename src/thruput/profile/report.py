"""Run documents (JSON), and the terminal report.

The JSON run document is the one format every other report is rendered from
(``thruput report RUN.json``). Schema ``thruput.run/1``::

    {
      "schema": "thruput.run/1",
      "name": str,                      # run name (user data: escaped wherever rendered)
      "origin_unix_s": float|null,      # wall-clock time (time.time()) of the first step's start
      "meta": {str: any},               # device, model, config, thruput version, ...;
                                        # "levers": [str], names of verdict.LEVERS that are on;
                                        # "rank", "world_size" under torch.distributed
      "phases": [str],                  # phase names in display order
      "steps": [{                       # one per profiled step, warm-up included
          "step": int, "start_s": float,  # start relative to the first step, seconds
          "time_s": float, "phases": {phase: seconds}, "tokens": int, "samples": int,
          "useful_tokens": int, "flops": float|null, "memory_bytes": int,
          "counters": {str: float},     # set during the step; "compiles" (cumulative, from
                                        # thruput.kernels.compile) marks the steps that compiled
          "scalars": {str: float},      # read after the step: "loss", "lr" (thruput train)
          "compute_before_comm": float|null,  # profile.collectives: own work before the last
          "comm_wait": float|null,            # collective, and time inside collectives
          "clock": {source: {"samples": int, "mean_<metric>": float, "throttled_share": float,
                             "reasons": [str]}}
      }],
      "summary": {...},                 # StepProfiler.summary(): step_time_s{median,p90,...},
                                        # samples_per_s, tokens_per_s, useful_tokens_per_s,
                                        # phase_share, mfu|null, peak_memory_bytes, clocks{...}
      "verdict": {"bottleneck": str, "conflicting": bool,
                  "findings": [{"bottleneck", "score", "evidence", "lever",
                                "levers": [str],       # recommended (names of verdict.LEVERS)
                                "already_on": [str]}]},  # would help, but on already
      "clocks": {"sources": {source: {"available", "detail", "clock_metric"}},
                 "series": {source: {"t": [s], metric: [values], "throttle_reasons": [[str]]}}}
                | null
    }

Absent measurements are ``null`` (or missing sources), never zeros.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch.distributed as dist
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from thruput.console import make_console
from thruput.errors import InputError
from thruput.profile.steps import PHASES, StepProfiler
from thruput.profile.verdict import verdict

SCHEMA = "thruput.run/1"


def run_document(profiler: StepProfiler, name: str = "run", meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the JSON run document of a finished (or running) profiler."""
    summary = profiler.summary()
    origin = profiler.records[0].start if profiler.records else 0.0
    steps = []
    for record in profiler.records:
        row = asdict(record)
        row["start_s"] = row.pop("start") - origin
        row.pop("host_end")
        steps.append(row)
    clocks = profiler.clocks.to_dict() if profiler.clocks is not None else None
    if clocks is not None:
        for series in clocks["series"].values():
            series["t"] = [t - origin for t in series["t"]]
    meta = {**profiler.meta, **(meta or {})}
    if meta.get("rank") is None and dist.is_available() and dist.is_initialized():
        meta["rank"], meta["world_size"] = dist.get_rank(), dist.get_world_size()
    return {
        "schema": SCHEMA,
        "name": name,
        # Wall-clock time of the first step's start: how ``thruput report DIR/`` lines up ranks.
        "origin_unix_s": time.time() - (time.perf_counter() - origin) if profiler.records else None,
        "meta": meta,
        "phases": list(PHASES),
        "steps": steps,
        "summary": summary,
        "verdict": verdict(summary, meta.get("levers") or ()).to_dict(),
        "clocks": clocks,
    }


def save_json(document: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a run document atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(document, f, indent=1, default=float)
    os.replace(tmp, path)
    return path


def load_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run document; a missing file, bad JSON or another schema is an InputError (a
    ValueError) naming it."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"run file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("schema") != SCHEMA:
        found = document.get("schema") if isinstance(document, dict) else type(document).__name__
        raise InputError(f"{path}: expected schema {SCHEMA!r}, found {found!r}")
    return document


def _fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def render_terminal(document: dict[str, Any], console: Console | None = None) -> None:
    """Print the run's phase table, headline numbers, clocks and verdict."""
    console = console or make_console()
    s = document["summary"]
    if not s.get("steps"):
        console.print(f"{document['name']}: no measured steps", markup=False)
        return
    table = Table(title=f"thruput profile: {escape(str(document['name']))}", title_justify="left")
    table.add_column("phase")
    table.add_column("median ms", justify="right")
    table.add_column("share", justify="right")
    for phase in document["phases"]:
        table.add_row(phase, _fmt_ms(s["phase_median_s"][phase]), f"{s['phase_share'][phase]:.1%}")
    t = s["step_time_s"]
    table.add_section()
    table.add_row("step (median / p90)", f"{_fmt_ms(t['median'])} / {_fmt_ms(t['p90'])}", "100%")
    console.print(table)
    mfu = "n/a (peak unknown)" if s.get("mfu") is None else f"{s['mfu']:.1%}"
    console.print(
        f"steps {s['steps']} (+{s['warmup_steps']} warm-up)  samples/s {s['samples_per_s']:.1f}  "
        f"tokens/s {s['tokens_per_s']:,.0f}  useful tokens/s {s['useful_tokens_per_s']:,.0f}  "
        f"padding {s['padding_ratio']:.1%}  MFU {mfu}  "
        f"peak memory {_fmt_bytes(s['peak_memory_bytes'])} ({s['memory_kind']})",
        markup=False,
    )
    for name, c in (s.get("clocks") or {}).items():
        if not c.get("available"):
            console.print(f"clock {name}: absent ({c['detail']})", markup=False)
        elif not c.get("samples"):
            console.print(f"clock {name}: no samples inside steps ({c['detail']})", markup=False)
        else:
            corr = c["corr_step_time_inv_clock"]
            console.print(
                f"clock {name}: mean {c['mean_mhz']:.0f} MHz (max {c['max_mhz']:.0f}), throttled "
                f"{c['throttled_share']:.1%}{' ' + ','.join(c['reasons']) if c['reasons'] else ''}, dropped steps {c['dropped_steps'] or 'none'}, "
                f"corr(step time, 1/clock) {'n/a' if corr is None else f'{corr:+.2f}'}  ({c['detail']})",
                markup=False,
            )
    v = document["verdict"]
    style = "yellow" if v["conflicting"] else "green"
    console.print(f"[bold {style}]verdict: {v['bottleneck']}[/]")
    for f in v["findings"]:
        evidence = ", ".join(f"{k}={format_evidence(k, val)}" for k, val in f["evidence"].items())
        on = f.get("already_on") or []
        on_note = f" (on already: {', '.join(on)})" if on and f.get("levers") else ""
        console.print(f"  - {f['bottleneck']} ({evidence}) -> {f['lever']}{on_note}", markup=False)


def format_evidence(key: str, value: Any) -> str:
    """A verdict evidence value for display: shares and ratios as percentages, bytes in binary
    units, other floats to 3 significant digits, long lists cut."""
    if isinstance(value, float) and (key.endswith(("_share", "_ratio")) or key == "mfu"):
        return f"{value:.1%}"
    if isinstance(value, (int, float)) and key.endswith("_bytes"):
        return _fmt_bytes(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list) and len(value) > 8:
        return f"[{', '.join(map(str, value[:8]))}, ... {len(value) - 8} more]"
    return str(value)
