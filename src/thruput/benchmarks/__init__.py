"""Benchmarks reachable as ``thruput bench NAME --json OUT``.

Each module here named ``NAME.py`` (no leading underscore) is one benchmark. It defines

* ``DESCRIPTION: str`` -- one line for ``thruput bench --help`` (a string literal: the help
  reads it from the source, without importing the benchmark and its peers);
* ``add_arguments(parser)`` -- optional extra flags (``--quick`` is always present);
* ``run(args) -> dict`` -- runs the benchmark and its peer side by side in the same process
  or run, prints a table (rich), and returns the figures; the CLI writes them as JSON.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType


def available() -> dict[str, ModuleType]:
    """Map benchmark name to its module, for every module in this package."""
    return {name: importlib.import_module(f"{__name__}.{name}") for name in names()}


def names() -> list[str]:
    """Benchmark names, without importing their modules."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def descriptions() -> dict[str, str]:
    """Benchmark name -> its ``DESCRIPTION``, read from the source without importing it.

    Raises ValueError naming the module if it has no ``DESCRIPTION`` string literal."""
    out = {}
    for name in names():
        path = Path(__path__[0]) / f"{name}.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found = [node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "DESCRIPTION" for t in node.targets)]
        if not found or not isinstance(found[0], ast.Constant) or not isinstance(found[0].value, str):
            raise ValueError(f"{path}: no DESCRIPTION string literal (thruput bench --help shows it)")
        out[name] = " ".join(found[0].value.split())
    return out
