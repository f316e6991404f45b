"""Self-contained HTML report: inline SVG plots, no scripts, no external files.

Plots: step time over steps, the phases of each step stacked, the loss and the learning rate
per step (when the run recorded them), and step time against the mean clock of each step.
Warm-up steps and steps that compiled are shaded, named, and left out of the time axes' scale
(a value above the scale is marked at the top with its value); a clock that did not move is a
note, not a plot. Every string that comes from user data (run name, meta, sources) is
HTML-escaped.
"""
from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from thruput.profile.report import _fmt_bytes, _fmt_ms, format_evidence
from thruput.profile.svg import Chart

COLORS = {"data_wait": "#e4572e", "h2d": "#f3a712", "forward": "#29335c", "backward": "#4b6ebd",
          "optimizer": "#a8c686", "comm": "#669bbc", "other": "#bbbbbb"}
HEADROOM = 1.15  # the y scale's top over the largest value kept in scale


def excluded_steps(document: dict[str, Any]) -> dict[int, str]:
    """Index in ``document["steps"]`` -> why the step is left out of the time scale: the
    summary's warm-up steps (the first ones), and steps that compiled (the ``compiles`` counter
    rose, or a new process's first call compiled again: ``calls`` restarted at 1)."""
    steps = document["steps"]
    warmup = min(len(steps), document["summary"].get("warmup_steps", 0))
    out: dict[int, list[str]] = {i: ["warm-up"] for i in range(warmup)}
    previous: dict[str, float] = {}
    for i, step in enumerate(steps):
        counters = step.get("counters", {})
        compiles = counters.get("compiles")
        if compiles and (compiles > previous.get("compiles", 0) or counters.get("calls") == 1):
            out.setdefault(i, []).append("compile")
        previous = counters
    return {i: " + ".join(reasons) for i, reasons in out.items()}


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def _time_scale(steps: list[dict], excluded: dict[int, str]) -> tuple[float, float, str]:
    """(top of the scale in seconds, factor to display units, unit) over the kept steps."""
    kept = [s["time_s"] for i, s in enumerate(steps) if i not in excluded] or [s["time_s"] for s in steps]
    top = max(kept) * HEADROOM or 1e-3
    return (top, 1e3, "ms") if top < 2 else (top, 1.0, "s")


def _mark_excluded(chart: Chart, steps: list[dict], excluded: dict[int, str], top: float) -> None:
    """Shade each run of consecutive excluded steps with one label; mark values above the scale."""
    runs: list[list[int]] = []
    for i in sorted(excluded):
        if runs and runs[-1][-1] == i - 1 and excluded[runs[-1][-1]] == excluded[i]:
            runs[-1].append(i)
        else:
            runs.append([i])
    for run in runs:
        chart.band(steps[run[0]]["step"] - 0.5, steps[run[-1]]["step"] + 0.5, excluded[run[0]])
    for s in steps:
        if s["time_s"] > top:
            chart.over_top(s["step"], _fmt_seconds(s["time_s"]))


def _x_range(steps: list[dict]) -> tuple[float, float]:
    return steps[0]["step"] - 0.5, steps[-1]["step"] + 0.5


def plot_step_times(steps: list[dict], excluded: dict[int, str] | None = None) -> str:
    if not steps:
        return ""
    excluded = excluded or {}
    top, factor, unit = _time_scale(steps, excluded)
    chart = Chart("step time over steps", "step", unit, _x_range(steps), (0, top * factor), x_integer=True)
    _mark_excluded(chart, steps, excluded, top)
    segment: list[dict] = []
    for i, s in enumerate([*steps, None]):  # the line joins kept steps only; excluded ones are dots
        if s is not None and i not in excluded:
            segment.append(s)
            continue
        if segment:
            chart.line([k["step"] for k in segment], [k["time_s"] * factor for k in segment], "#29335c")
            if len(segment) == 1:
                chart.dots([segment[0]["step"]], [segment[0]["time_s"] * factor], "#29335c")
        segment = []
        if s is not None and s["time_s"] <= top:
            chart.dots([s["step"]], [s["time_s"] * factor], "#29335c", hollow=True)
    return chart.svg()


def plot_phase_stack(steps: list[dict], phases: list[str], excluded: dict[int, str] | None = None) -> str:
    if not steps:
        return ""
    excluded = excluded or {}
    top, factor, unit = _time_scale(steps, excluded)
    chart = Chart("phases of each step", "step", unit, _x_range(steps), (0, top * factor), x_integer=True)
    _mark_excluded(chart, steps, excluded, top)
    for i, s in enumerate(steps):
        y = 0.0
        for phase in phases:
            h = s["phases"].get(phase, 0.0) * factor
            if h > 0:
                chart.bar(s["step"] - 0.5, s["step"] + 0.5, y, y + h, COLORS.get(phase, "#888"), faded=i in excluded)
                y += h
    chart.legend([(p, COLORS.get(p, "#888")) for p in phases])
    return chart.svg()


def plot_scalar(steps: list[dict], name: str, title: str) -> str:
    """``steps[i]["scalars"][name]`` over the steps (e.g. the loss), or "" if never recorded."""
    pairs = [(s["step"], s["scalars"][name]) for s in steps if name in s.get("scalars", {})]
    if not pairs:
        return ""
    xs, ys = zip(*pairs)
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
    chart = Chart(title, "step", name, (xs[0] - 0.5, xs[-1] + 0.5), (lo - pad, hi + pad), x_integer=True)
    chart.line(list(xs), list(ys), "#29335c")
    if len(xs) == 1:
        chart.dots(list(xs), list(ys), "#29335c")
    return chart.svg()


def plot_clock_vs_time(steps: list[dict], source: str, metric: str) -> str:
    key = f"mean_{metric}"
    pairs = [(s["clock"][source][key], s["time_s"] * 1e3) for s in steps
             if source in s.get("clock", {}) and key in s["clock"][source]]
    if not pairs:
        return f"<p class=note>clock {escape(source)}: no samples inside steps</p>"
    xs, ys = zip(*pairs)
    lo, hi = min(xs), max(xs)
    if hi - lo <= 1e-6 * max(abs(hi), 1.0):
        return (f"<p class=note>clock {escape(source)}: {lo:,.0f} ({escape(metric)}) in every step: a flat clock "
                f"explains none of the step-time variation, so there is nothing to plot</p>")
    pad = (hi - lo) * 0.05
    chart = Chart(f"step time against {source} clock", f"mean {metric} in step", "ms", (lo - pad, hi + pad),
                  (0, max(ys) * HEADROOM))
    chart.dots(list(xs), list(ys), "#e4572e")
    return chart.svg()


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:800px}
table{border-collapse:collapse} th,td{padding:2px 10px;text-align:left;border-bottom:1px solid #eee;vertical-align:top}
td.n{text-align:right} svg{display:block;margin:1em 0;font-size:11px} .ax{stroke:#444} .grid{stroke:#e6e6e6}
.band{fill:#f1f1f1} .note{fill:#777;color:#555;font-size:11px} .over{fill:#b8401f} .t{font-weight:bold;font-size:13px}
.verdict{padding:.5em 1em;background:#f4f7f0;border-left:4px solid #a8c686} code{font-size:11px}"""


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title>\n'
            f"<style>\n{_STYLE}\n</style></head><body>\n{body}\n</body></html>\n")


def _rounded(value: Any) -> Any:
    """Floats to 4 significant digits, through dicts and lists (for display only)."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts and lists of dicts as (dotted key, value) pairs."""
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in _flat(v, f"{prefix}{k}.")]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [pair for i, v in enumerate(value) for pair in _flat(v, f"{prefix.rstrip('.')}[{i}].")]
    return [(prefix.rstrip("."), value)]


def _meta_rows(meta: dict[str, Any]) -> str:
    rows = []
    for key, value in meta.items():
        value = _rounded(value)
        if isinstance(value, dict):
            lines = "<br>".join(f"<code>{escape(k)} = {escape(repr(v))}</code>" for k, v in _flat(value))
            cell = f"<details><summary>{len(_flat(value))} values</summary>{lines}</details>"
        else:
            cell = escape(str(value))
        rows.append(f"<tr><th>{escape(str(key))}</th><td>{cell}</td></tr>")
    return "".join(rows)


def _finding(f: dict[str, Any]) -> str:
    evidence = ", ".join(f"{k}={format_evidence(k, v)}" for k, v in f["evidence"].items())
    on = f.get("already_on") or []
    on_note = f" (on already: {escape(', '.join(on))})" if on and f.get("levers") else ""
    return (f"<li><b>{escape(f['bottleneck'])}</b>: {escape(f['lever'])}{on_note}<br>"
            f"<small>{escape(evidence)}</small></li>")


def run_section(document: dict[str, Any], level: int = 1) -> str:
    """One run's verdict, summary table, plots and metadata as an HTML fragment."""
    s, v = document["summary"], document["verdict"]
    name = escape(str(document["name"]))
    rows = []
    if s.get("steps"):
        t = s["step_time_s"]
        mfu = "n/a" if s.get("mfu") is None else f"{s['mfu']:.1%}"
        for label, value in [
            ("measured steps", f"{s['steps']} (+{s['warmup_steps']} warm-up)"),
            ("step time median / p90", f"{_fmt_ms(t['median'])} / {_fmt_ms(t['p90'])} ms"),
            ("samples/s", f"{s['samples_per_s']:,.1f}"),
            ("tokens/s (useful)", f"{s['tokens_per_s']:,.0f} ({s['useful_tokens_per_s']:,.0f})"),
            ("padding", f"{s['padding_ratio']:.1%}"),
            ("MFU", mfu),
            ("peak memory", f"{_fmt_bytes(s['peak_memory_bytes'])} ({s['memory_kind']})"),
        ]:
            rows.append(f"<tr><th>{escape(label)}</th><td>{escape(value)}</td></tr>")
        for phase in document["phases"]:
            rows.append(f"<tr><th>{escape(phase)}</th><td>{_fmt_ms(s['phase_median_s'][phase])} ms "
                        f"({s['phase_share'][phase]:.1%})</td></tr>")
    findings = "".join(_finding(f) for f in v["findings"])
    steps = document["steps"]
    excluded = excluded_steps(document) if steps else {}
    plots = [plot_step_times(steps, excluded), plot_phase_stack(steps, document["phases"], excluded),
             plot_scalar(steps, "loss", "training loss"), plot_scalar(steps, "lr", "learning rate")]
    if excluded:
        plots.insert(0, "<p class=note>Shaded steps (warm-up, compilation) are left out of the time axes' scale; "
                        "a step above the scale is marked at the top with its time.</p>")
    clocks = document.get("clocks") or {}
    for source, info in (clocks.get("sources") or {}).items():
        if info.get("available"):
            plots.append(plot_clock_vs_time(steps, source, info["clock_metric"]))
        else:
            plots.append(f"<p class=note>clock {escape(source)}: absent ({escape(str(info.get('detail')))})</p>")
    h, sub = f"h{level}", f"h{level + 1}"
    return (f"<{h}>thruput report: {name}</{h}>\n"
            f"<div class=\"verdict\"><{sub}>verdict: {escape(v['bottleneck'])}</{sub}><ul>{findings}</ul></div>\n"
            f"<{sub}>summary</{sub}><table>{''.join(rows)}</table>\n"
            f"<{sub}>plots</{sub}>{''.join(plots)}\n"
            f"<{sub}>run</{sub}><table>{_meta_rows(document.get('meta', {}))}</table>")


def render_html(document: dict[str, Any]) -> str:
    """The whole report of one run as one HTML string."""
    return _page(f"thruput report: {escape(str(document['name']))}", run_section(document))


def render_comparison_html(documents: list[dict[str, Any]], figures: dict[str, dict[str, Any]],
                           headline: str) -> str:
    """Runs side by side: a table of ``figures`` (row label -> run name -> display string), a
    ``headline`` sentence, then each run's full section."""
    names = [str(d["name"]) for d in documents]
    head = "".join(f"<th>{escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><th>{escape(label)}</th>" + "".join(f"<td class=n>{escape(str(row.get(n, '')))}</td>" for n in names)
        + "</tr>"
        for label, row in figures.items()
    )
    sections = "".join(f"<hr>{run_section(d, level=2)}" for d in documents)
    return _page("thruput: side by side", f"<h1>thruput: side by side</h1>\n<p>{escape(headline)}</p>\n"
                 f"<table><tr><th></th>{head}</tr>{body}</table>\n{sections}")


def save_html(document: dict[str, Any], path: str | Path) -> Path:
    """Write ``render_html(document)`` to ``path`` (parents created); returns the path."""
    return _write(render_html(document), path)


def save_comparison_html(documents: list[dict[str, Any]], figures: dict[str, dict[str, Any]], headline: str,
                         path: str | Path) -> Path:
    """Write ``render_comparison_html`` to ``path``; returns the path."""
    return _write(render_comparison_html(documents, figures, headline), path)


def _write(text: str, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
