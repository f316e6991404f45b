"""Inline SVG charts for the HTML report: linear axes with readable ticks, nothing else.

A chart maps data to a fixed plot area; values above the y range are drawn at its top edge
with a marker and their value, so one slow step (a compile) does not flatten the others.
Every string that reaches the SVG is HTML-escaped.
"""
from __future__ import annotations

import math
from html import escape

W, H = 720, 250
LEFT, RIGHT, TOP, BOTTOM = 70, 18, 48, 42  # TOP: the title, a legend row, then band labels


def nice_ticks(lo: float, hi: float, count: int = 5, integer: bool = False) -> tuple[list[float], float]:
    """About ``count`` round tick values covering ``[lo, hi]`` (steps of 1, 2, 2.5 or 5 times a
    power of ten; at least 1 when ``integer``), and the step."""
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    if integer:
        step = max(1.0, float(round(step)))
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)], step


def format_tick(value: float, step: float) -> str:
    """``value`` with as many decimals as ``step`` needs, thousands separated, no trailing zeros."""
    decimals = max(0, math.ceil(-math.log10(step)) + 1) if step < 1 else 0
    text = f"{value:,.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


class Chart:
    """One plot: ``x_range`` and ``y_range`` in data units, ticks and grid lines, a title and
    axis labels. Add marks with the methods, then ``svg()``."""

    def __init__(self, title: str, xlabel: str, ylabel: str, x_range: tuple[float, float],
                 y_range: tuple[float, float], *, x_integer: bool = False, y_integer: bool = False) -> None:
        self.x_lo, self.x_hi = x_range if x_range[1] > x_range[0] else (x_range[0] - 0.5, x_range[0] + 0.5)
        self.y_lo, self.y_hi = y_range if y_range[1] > y_range[0] else (y_range[0], y_range[0] + 1.0)
        self.marks: list[str] = []
        self.frame = [f'<text x="{W / 2}" y="14" text-anchor="middle" class="t">{escape(title)}</text>',
                      f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 6}" text-anchor="middle">{escape(xlabel)}</text>',
                      f'<text x="14" y="{(TOP + H - BOTTOM) / 2}" transform="rotate(-90 14 {(TOP + H - BOTTOM) / 2})" '
                      f'text-anchor="middle">{escape(ylabel)}</text>']
        y_ticks, y_step = nice_ticks(self.y_lo, self.y_hi, integer=y_integer)
        for v in y_ticks:
            y = self.y(v)
            self.frame.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - RIGHT}" y2="{y:.1f}" class="grid"/>'
                              f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{format_tick(v, y_step)}</text>')
        x_ticks, x_step = nice_ticks(self.x_lo, self.x_hi, count=8, integer=x_integer)
        for v in x_ticks:
            x = self.x(v)
            self.frame.append(f'<line x1="{x:.1f}" y1="{H - BOTTOM}" x2="{x:.1f}" y2="{H - BOTTOM + 4}" class="ax"/>'
                              f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">'
                              f'{format_tick(v, x_step)}</text>')
        self.frame.append(f'<polyline points="{LEFT},{TOP} {LEFT},{H - BOTTOM} {W - RIGHT},{H - BOTTOM}" '
                          f'fill="none" class="ax"/>')

    def x(self, value: float) -> float:
        return LEFT + (value - self.x_lo) / (self.x_hi - self.x_lo) * (W - RIGHT - LEFT)

    def y(self, value: float) -> float:
        """Pixel row of ``value``, clamped to the plot area."""
        clamped = min(max(value, self.y_lo), self.y_hi)
        return H - BOTTOM - (clamped - self.y_lo) / (self.y_hi - self.y_lo) * (H - BOTTOM - TOP)

    def line(self, xs: list[float], ys: list[float], color: str) -> None:
        points = " ".join(f"{self.x(x):.1f},{self.y(y):.1f}" for x, y in zip(xs, ys))
        self.marks.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="1.5"/>')

    def dots(self, xs: list[float], ys: list[float], color: str, hollow: bool = False) -> None:
        fill = f'fill="white" stroke="{color}" stroke-width="1.5"' if hollow else f'fill="{color}" fill-opacity="0.7"'
        self.marks += [f'<circle cx="{self.x(x):.1f}" cy="{self.y(y):.1f}" r="3" {fill}/>' for x, y in zip(xs, ys)]

    def bar(self, x0: float, x1: float, y0: float, y1: float, color: str, faded: bool = False) -> None:
        """A rectangle from ``(x0, y0)`` to ``(x1, y1)`` in data units (clamped to the plot)."""
        left, right = self.x(x0), self.x(x1)
        top, bottom = self.y(y1), self.y(y0)
        opacity = ' fill-opacity="0.3"' if faded else ""
        if bottom - top > 0:
            self.marks.append(f'<rect x="{left:.1f}" y="{top:.1f}" width="{max(right - left - 0.5, 0.5):.1f}" '
                              f'height="{bottom - top:.1f}" fill="{color}"{opacity}/>')

    def band(self, x0: float, x1: float, label: str) -> None:
        """Shade ``[x0, x1]`` (steps left out of the scale) and name it at the top."""
        left, right = self.x(x0), self.x(x1)
        self.marks.insert(0, f'<rect x="{left:.1f}" y="{TOP}" width="{right - left:.1f}" height="{H - BOTTOM - TOP}" '
                             f'class="band"/>')
        self.marks.append(f'<text x="{max(left, LEFT):.1f}" y="{TOP - 4}" class="note">{escape(label)}</text>')

    def over_top(self, x: float, text: str) -> None:
        """Mark a value above the y range at ``x``: a triangle at the top edge and its value."""
        cx = self.x(x)
        self.marks.append(f'<path d="M{cx - 4:.1f},{TOP + 7} L{cx + 4:.1f},{TOP + 7} L{cx:.1f},{TOP} Z" '
                          f'fill="#e4572e"/>'
                          f'<text x="{cx + 6:.1f}" y="{TOP + 10}" class="over">{escape(text)}</text>')

    def legend(self, items: list[tuple[str, str]]) -> None:
        """Colour swatches with names, in one row under the title."""
        x = LEFT + 8
        for name, color in items:
            self.marks.append(f'<rect x="{x}" y="20" width="10" height="10" fill="{color}"/>'
                              f'<text x="{x + 14}" y="29">{escape(name)}</text>')
            x += 30 + 6.5 * len(name)

    def svg(self) -> str:
        return (f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}">' + "".join(self.frame)
                + "".join(self.marks) + "</svg>")
