"""The rich console every command prints through: tables keep their columns in a file or pipe.

To a terminal, rich fits output to the terminal's width. To anything else (``> log``, ``| tee``,
a captured stream) it would assume 80 columns and cut every table column name to fit; there the
console is ``WIDE`` instead, so a table is as wide as its content.
"""
from __future__ import annotations

from rich.console import Console

WIDE = 10_000  # columns of a console that is not a terminal: wider than any table we print


def make_console(*, min_width: int = 0, stderr: bool = False) -> Console:
    """A console on stdout (or stderr): a terminal's own width, at least ``min_width`` columns;
    a file or pipe ``WIDE`` columns."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        return Console(stderr=stderr, width=WIDE)
    return Console(stderr=stderr, width=max(console.width, min_width)) if min_width > console.width else console
