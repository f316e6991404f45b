"""The live one-line status of ``thruput run``: on a terminal's stderr, at most once a second."""
from __future__ import annotations

import statistics
import sys
import time
from typing import TextIO

from thruput.profile import StepProfiler, StepRecord

_SHOWN = ("data_wait", "h2d", "forward", "backward", "optimizer", "comm", "other")
_SHORT = {"data_wait": "data", "h2d": "h2d", "forward": "fwd", "backward": "bwd", "optimizer": "opt",
          "comm": "comm", "other": "other"}
WINDOW = 10  # steps the line summarises


def format_status(records: list[StepRecord]) -> str:
    """``step N | median step ms | tokens/s | phase shares`` over the last WINDOW steps."""
    recent = records[-WINDOW:]
    total = sum(r.time_s for r in recent)
    if not recent or total <= 0:
        return "thruput run: waiting for the first step"
    shares = {p: sum(r.phases.get(p, 0.0) for r in recent) / total for p in _SHOWN}
    parts = " ".join(f"{_SHORT[p]} {shares[p]:.0%}" for p in _SHOWN if shares[p] >= 0.005)
    tokens = sum(r.tokens for r in recent) / total
    median_ms = statistics.median(r.time_s for r in recent) * 1e3
    return (f"thruput run: step {recent[-1].step + 1} | {median_ms:.1f} ms/step | "
            f"{tokens:,.0f} tokens/s | {parts}")


class StatusLine:
    """Rewrites one line of ``stream`` after finished steps, rate-limited to ``interval``
    seconds. Does nothing unless ``enabled`` and the stream is a terminal."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, interval: float = 1.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and _isatty(self.stream)
        self.interval = interval
        self._last = float("-inf")
        self._shown = False

    def update(self, profiler: StepProfiler) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        # Erase the line, write the status, return to column 0 so the script's output overwrites it.
        self.stream.write("\r\x1b[2K" + format_status(profiler.records) + "\r")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._shown = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False
