"""Self-contained HTML report: inline SVG plots, no scripts, no external files.

Plots: step time over steps, stacked phase breakdown per step, and step time against the
mean clock of each step. Every string that comes from user data (run name, meta, sources)
is HTML-escaped.
"""
from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

from thruput.profile.report import _fmt_bytes, _fmt_ms

COLORS = {"data_wait": "#e4572e", "h2d": "#f3a712", "forward": "#29335c", "backward": "#4b6ebd",
          "optimizer": "#a8c686", "comm": "#669bbc", "other": "#bbbbbb"}
W, H, PAD = 720, 260, 48


def _scale(lo: float, hi: float, a: float, b: float):
    span = (hi - lo) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _axes(title: str, xlabel: str, ylabel: str, ymax: float, xmin: float = 0.0, xmax: float = 1.0) -> list[str]:
    parts = [
        f'<text x="{W / 2}" y="16" text-anchor="middle" class="t">{escape(title)}</text>',
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 10}" y2="{H - PAD}" class="ax"/>',
        f'<line x1="{PAD}" y1="20" x2="{PAD}" y2="{H - PAD}" class="ax"/>',
        f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text x="12" y="{H / 2}" transform="rotate(-90 12 {H / 2})" text-anchor="middle">{escape(ylabel)}</text>',
        f'<text x="{PAD - 4}" y="{H - PAD}" text-anchor="end">0</text>',
        f'<text x="{PAD - 4}" y="28" text-anchor="end">{ymax:.3g}</text>',
        f'<text x="{PAD}" y="{H - PAD + 14}">{xmin:.4g}</text>',
        f'<text x="{W - 10}" y="{H - PAD + 14}" text-anchor="end">{xmax:.4g}</text>',
    ]
    return parts


def _svg(parts: list[str]) -> str:
    return f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}">' + "".join(parts) + "</svg>"


def plot_step_times(steps: list[dict]) -> str:
    if not steps:
        return ""
    xs = [s["step"] for s in steps]
    ys = [s["time_s"] * 1e3 for s in steps]
    ymax = max(ys) * 1.1 or 1.0
    sx, sy = _scale(min(xs), max(xs) or 1, PAD, W - 10), _scale(0, ymax, H - PAD, 20)
    points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
    parts = _axes("step time over steps", "step", "ms", ymax, min(xs), max(xs))
    parts.append(f'<polyline points="{points}" fill="none" stroke="#29335c" stroke-width="1.5"/>')
    return _svg(parts)


def plot_phase_stack(steps: list[dict], phases: list[str]) -> str:
    if not steps:
        return ""
    ymax = max(s["time_s"] for s in steps) * 1e3 * 1.1 or 1.0
    sy = _scale(0, ymax, 0, H - PAD - 20)
    bar = (W - 10 - PAD) / len(steps)
    parts = _axes("phase breakdown per step", "step", "ms", ymax, steps[0]["step"], steps[-1]["step"])
    for i, s in enumerate(steps):
        y = H - PAD
        for phase in phases:
            h = sy(s["phases"].get(phase, 0.0) * 1e3)
            if h > 0:
                y -= h
                parts.append(f'<rect x="{PAD + i * bar:.1f}" y="{y:.1f}" width="{max(bar - 0.5, 0.5):.1f}" '
                             f'height="{h:.1f}" fill="{COLORS.get(phase, "#888")}"/>')
    for j, phase in enumerate(phases):
        parts.append(f'<rect x="{PAD + 10 + j * 95}" y="26" width="10" height="10" fill="{COLORS.get(phase, "#888")}"/>'
                     f'<text x="{PAD + 24 + j * 95}" y="35">{escape(phase)}</text>')
    return _svg(parts)


def plot_clock_vs_time(steps: list[dict], source: str, metric: str) -> str:
    key = f"mean_{metric}"
    pairs = [(s["clock"][source][key], s["time_s"] * 1e3) for s in steps
             if source in s.get("clock", {}) and key in s["clock"][source]]
    if not pairs:
        return ""
    xs, ys = zip(*pairs)
    lo, hi = min(xs), max(xs)
    if hi == lo:
        lo, hi = lo - 1, hi + 1
    ymax = max(ys) * 1.1 or 1.0
    sx, sy = _scale(lo, hi, PAD + 6, W - 16), _scale(0, ymax, H - PAD, 20)
    parts = _axes(f"step time against {source} clock", f"mean {metric} in step", "ms", ymax, lo, hi)
    parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="#e4572e" fill-opacity="0.7"/>'
              for x, y in pairs]
    return _svg(parts)


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:800px}
table{border-collapse:collapse} th,td{padding:2px 10px;text-align:left;border-bottom:1px solid #eee}
td.n{text-align:right} svg{display:block;margin:1em 0;font-size:11px} .ax{stroke:#444}
.t{font-weight:bold;font-size:13px} .verdict{padding:.5em 1em;background:#f4f7f0;border-left:4px solid #a8c686}"""


def _page(title: str, body: str) -> str:
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{title}</title>\n'
            f"<style>\n{_STYLE}\n</style></head><body>\n{body}\n</body></html>\n")


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
            ("samples/s", f"{s['samples_per_s']:.1f}"),
            ("tokens/s (useful)", f"{s['tokens_per_s']:,.0f} ({s['useful_tokens_per_s']:,.0f})"),
            ("padding", f"{s['padding_ratio']:.1%}"),
            ("MFU", mfu),
            ("peak memory", f"{_fmt_bytes(s['peak_memory_bytes'])} ({s['memory_kind']})"),
        ]:
            rows.append(f"<tr><th>{escape(label)}</th><td>{escape(value)}</td></tr>")
        for phase in document["phases"]:
            rows.append(f"<tr><th>{escape(phase)}</th><td>{_fmt_ms(s['phase_median_s'][phase])} ms "
                        f"({s['phase_share'][phase]:.1%})</td></tr>")
    findings = "".join(
        f"<li><b>{escape(f['bottleneck'])}</b>: {escape(f['lever'])}<br><small>"
        + escape(", ".join(f"{k}={val}" for k, val in f["evidence"].items())) + "</small></li>"
        for f in v["findings"]
    )
    meta = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(str(val))}</td></tr>"
                   for k, val in document.get("meta", {}).items())
    steps = document["steps"]
    plots = [plot_step_times(steps), plot_phase_stack(steps, document["phases"])]
    clocks = document.get("clocks") or {}
    for source, info in (clocks.get("sources") or {}).items():
        if info.get("available"):
            plots.append(plot_clock_vs_time(steps, source, info["clock_metric"]))
        else:
            plots.append(f"<p>clock {escape(source)}: absent ({escape(str(info.get('detail')))})</p>")
    h, sub = f"h{level}", f"h{level + 1}"
    return (f"<{h}>thruput report: {name}</{h}>\n"
            f"<div class=\"verdict\"><{sub}>verdict: {escape(v['bottleneck'])}</{sub}><ul>{findings}</ul></div>\n"
            f"<{sub}>summary</{sub}><table>{''.join(rows)}</table>\n"
            f"<{sub}>plots</{sub}>{''.join(plots)}\n"
            f"<{sub}>run</{sub}><table>{meta}</table>")


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
