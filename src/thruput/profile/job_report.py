"""The merged job (``thruput.profile.job``) as a terminal report and a self-contained HTML page:
the per-rank table, the spread across ranks per step, a timeline with one track per rank, and
the straggler verdict. Every string from user data is escaped."""
from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape as rich_escape
from rich.table import Table

from thruput.console import make_console
from thruput.profile.job import step_work
from thruput.profile.html import COLORS, _page, _write, run_section
from thruput.profile.report import _fmt_ms, format_evidence
from thruput.profile.svg import Chart
from thruput.profile.trace import rank_offsets

COLUMNS = [  # (per-rank row key, header, format)
    ("steps", "steps", str),
    ("step_time_s", "step ms", _fmt_ms),
    ("compute_before_comm_s", "compute ms", _fmt_ms),  # before the step's last collective
    ("comm_wait_s", "wait ms", _fmt_ms),               # inside collectives
    ("data_wait_s", "data ms", _fmt_ms),
    ("clock_mhz", "clock MHz", lambda v: "-" if v is None else f"{v:,.0f}"),
    ("throttled_share", "throttled", lambda v: "-" if v is None else f"{v:.0%}"),
]


def spread_summary(job: dict[str, Any]) -> str:
    """One line: median and largest spread of own work across ranks, and who was slowest."""
    spread = job["spread"]
    values = sorted(s["spread_s"] for s in spread)
    worst = max(spread, key=lambda s: s["spread_s"])
    slowest: dict[int, int] = {}
    for s in spread:
        slowest[s["slowest_rank"]] = slowest.get(s["slowest_rank"], 0) + 1
    counts = ", ".join(f"rank {r}: {n}" for r, n in sorted(slowest.items()))
    return (f"spread of own work across ranks per step: median {_fmt_ms(values[len(values) // 2])} ms, "
            f"largest {_fmt_ms(worst['spread_s'])} ms (step {worst['step']}); slowest rank per step: {counts}")


def finding_line(f: dict[str, Any]) -> str:
    """A straggler finding as one sentence, the evidence after it."""
    e = f["evidence"]
    if "ratio" not in e:
        return f"{f['bottleneck']} ({', '.join(f'{k}={format_evidence(k, v)}' for k, v in e.items())})"
    return (f"{f['bottleneck']}: {e['ratio']:.2f}x the median of the other ranks' work before collectives "
            f"(+{_fmt_ms(e['excess_s'])} ms) in {len(e['slow_steps'])} of "
            f"{round(len(e['slow_steps']) / e['slow_steps_share'])} steps, in {e['phase']} (+{_fmt_ms(e['phase_excess_s'])} ms); "
            f"cause: {e['cause']} -> {f['lever']}")


def render_job_terminal(job: dict[str, Any], console: Console | None = None) -> None:
    """Print the per-rank table, the spread line, notes and the straggler verdict."""
    console = console or make_console()
    table = Table(title=f"thruput job: {rich_escape(str(job['name']))} ({len(job['ranks'])} of "
                        f"{job['world_size']} ranks)", title_justify="left")
    table.add_column("rank")
    for _, header, _ in COLUMNS:
        table.add_column(header, justify="right")
    for row in job["per_rank"]:
        table.add_row(str(row["rank"]), *(fmt(row[key]) for key, _, fmt in COLUMNS))
    console.print(table)
    console.print("compute: own work before the step's last collective; wait: inside collectives", markup=False)
    console.print(spread_summary(job), markup=False)
    for note in job["notes"]:
        console.print(f"note: {note}", markup=False)
    v = job["verdict"]
    style = "yellow" if v["conflicting"] else "green"
    console.print(f"[bold {style}]verdict: {rich_escape(v['bottleneck'])}[/]")
    for f in v["findings"]:
        console.print(f"  - {finding_line(f)}", markup=False)


def plot_timeline(job: dict[str, Any]) -> str:
    """One track per rank over wall-clock time: each step's own work, then its wait."""
    offsets = rank_offsets(job)
    ranks = job["ranks"]
    docs = job["documents"]
    end = max(offsets[r] + s["start_s"] + s["time_s"] for r in ranks for s in docs[r]["steps"]) if any(
        docs[r]["steps"] for r in ranks) else 1.0
    chart = Chart("timeline: own work (dark) and wait at collectives (light) per rank", "seconds since the first step",
                  "rank", (0.0, end), (min(ranks) - 0.5, max(ranks) + 0.5), y_integer=True)
    for rank in ranks:
        for s in docs[rank]["steps"]:
            t0 = offsets[rank] + s["start_s"]
            if s.get("compute_before_comm") is None:
                chart.bar(t0, t0 + s["time_s"], rank - 0.35, rank + 0.35, COLORS["other"])
                continue
            work = s["compute_before_comm"] + s["phases"].get("data_wait", 0.0)
            chart.bar(t0, t0 + work, rank - 0.35, rank + 0.35, COLORS["forward"])
            chart.bar(t0 + work, t0 + work + s["comm_wait"], rank - 0.35, rank + 0.35, COLORS["comm"])
    chart.legend([("own work", COLORS["forward"]), ("comm wait", COLORS["comm"]),
                  ("no per-rank record", COLORS["other"])])
    return chart.svg()


def plot_spread(job: dict[str, Any]) -> str:
    """Per step: each rank's own work before collectives (one line per rank)."""
    steps = job["steps"]
    docs = {r: {s["step"]: s for s in job["documents"][r]["steps"]} for r in job["ranks"]}
    top = max(step_work(docs[r][s]) for r in job["ranks"] for s in steps) * 1.15 * 1e3 or 1.0
    chart = Chart("own work before collectives per rank", "step", "ms", (steps[0] - 0.5, steps[-1] + 0.5), (0, top),
                  x_integer=True)
    palette = ["#29335c", "#e4572e", "#a8c686", "#f3a712", "#669bbc", "#7a306c", "#444444", "#b8401f"]
    items = []
    for i, rank in enumerate(job["ranks"]):
        color = palette[i % len(palette)]
        ys = [step_work(docs[rank][s]) * 1e3 for s in steps]
        chart.line(steps, ys, color)
        chart.dots(steps, ys, color)
        items.append((f"rank {rank}", color))
    chart.legend(items[:8])
    return chart.svg()


def render_job_html(job: dict[str, Any]) -> str:
    """The whole job report as one HTML string; each rank's own report follows, folded."""
    name = escape(str(job["name"]))
    head = "".join(f"<th>{escape(h)}</th>" for _, h, _ in COLUMNS)
    rows = "".join(f"<tr><th>rank {row['rank']}</th>" + "".join(
        f"<td class=n>{escape(fmt(row[key]))}</td>" for key, _, fmt in COLUMNS) + "</tr>" for row in job["per_rank"])
    v = job["verdict"]
    findings = "".join(f"<li>{escape(finding_line(f))}</li>" for f in v["findings"])
    notes = "".join(f"<p class=note>{escape(n)}</p>" for n in job["notes"])
    ranks = "".join(f"<details><summary>rank {r}: {escape(str(job['files'][r]))}</summary>"
                    f"{run_section(doc, level=3)}</details>" for r, doc in job["documents"].items())
    body = (f"<h1>thruput job: {name}</h1>\n{notes}"
            f"<div class=\"verdict\"><h2>verdict: {escape(v['bottleneck'])}</h2><ul>{findings}</ul></div>\n"
            f"<h2>ranks ({len(job['ranks'])} of {job['world_size']})</h2>"
            f"<table><tr><th></th>{head}</tr>{rows}</table>\n<p>{escape(spread_summary(job))}</p>\n"
            f"<h2>plots</h2>{plot_timeline(job)}{plot_spread(job)}\n<h2>each rank</h2>{ranks}")
    return _page(f"thruput job: {name}", body)


def save_job_html(job: dict[str, Any], path: str | Path) -> Path:
    """Write ``render_job_html(job)`` to ``path``; returns the path."""
    return _write(render_job_html(job), path)
