"""The default corpus: the Python standard library's own source files, read from disk."""
from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

from thruput.data.sources import Source, TextFilesSource

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """Sorted ``.py`` files of the running interpreter's standard library, without its test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts))
    return files[:max_files] if max_files is not None else files


def docstrings(code: str) -> str:
    """The module, class and function docstrings of Python source, as prose separated by blank lines."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):  # a few stdlib files are templates or use other encodings
        return ""
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return "\n\n".join(doc for n in nodes if (doc := ast.get_docstring(n)))


def stdlib_corpus(
    *, max_files: int | None = None, code_weight: float = 0.7, prose_weight: float = 0.3, prose: bool = True
) -> list[Source]:
    """Sources over the standard library: ``"code"`` (whole files) and ``"prose"`` (their docstrings).

    Nothing is downloaded; files are read lazily by the workers. ``max_files`` keeps the first
    files in sorted order (for small tests).
    """
    files = stdlib_files(max_files)
    sources: list[Source] = [TextFilesSource("code", files, weight=code_weight)]
    if prose:
        sources.append(TextFilesSource("prose", files, weight=prose_weight, transform=docstrings))
    return sources
