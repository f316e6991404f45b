"""Tables printed to a file or pipe keep every column (rich would cut them at 80 columns)."""
from __future__ import annotations

import subprocess
import sys

from thruput.console import WIDE, make_console

NAMES = [f"a_rather_long_column_name_{i}" for i in range(8)]  # ~250 columns wide in all

TABLE = f"""
from rich.table import Table
from thruput.console import make_console
table = Table(title="wide")
for name in {NAMES!r}:
    table.add_column(name)
table.add_row(*("1.00x" for _ in {NAMES!r}))
make_console().print(table)
"""


def test_a_table_printed_to_a_pipe_keeps_every_column_name() -> None:
    proc = subprocess.run([sys.executable, "-c", TABLE], capture_output=True, text=True, check=True)
    for name in NAMES:
        assert name in proc.stdout
    assert "…" not in proc.stdout


def test_a_captured_stream_gets_a_wide_console(capsys) -> None:
    from thruput.demo.present import comparison_table

    rows = {"useful tokens/s": {name: "1,234" for name in NAMES}}
    make_console().print(comparison_table(rows, "bench e2e"))
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES) and "…" not in out
    assert make_console().width == WIDE


def test_a_terminal_keeps_its_width_at_least_min_width(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "90")  # the terminal's width, as rich reads it
    monkeypatch.setattr("rich.console.Console.is_terminal", property(lambda self: True))
    assert make_console().width == 90
    assert make_console(min_width=10).width == 90
    assert make_console(min_width=140).width == 140
