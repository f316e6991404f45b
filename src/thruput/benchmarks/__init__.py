"""Benchmarks reachable as ``thruput bench NAME --json OUT``.

Each module here named ``NAME.py`` (no leading underscore) is one benchmark. It defines

* ``DESCRIPTION: str`` -- one line for ``thruput bench --help``;
* ``add_arguments(parser)`` -- optional extra flags (``--quick`` is always present);
* ``run(args) -> dict`` -- runs the benchmark and its peer side by side in the same process
  or run, prints a table (rich), and returns the figures; the CLI writes them as JSON.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def available() -> dict[str, ModuleType]:
    """Map benchmark name to its module, for every module in this package."""
    names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return {name: importlib.import_module(f"{__name__}.{name}") for name in sorted(names)}


def names() -> list[str]:
    """Benchmark names, without importing their modules."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
