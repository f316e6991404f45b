"""The default corpus: the Python standard library's own source files, read from disk."""
from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
from pathlib import Path

from thruput.atomic import write_atomic
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


def definitions(code: str) -> tuple[list[str], list[str]]:
    """(source of each function/class of at most 4 KiB, each docstring) of one module."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return [], []
    lines = code.splitlines(keepends=True)
    functions, docs = [], []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            # Slicing by line numbers: ast.get_source_segment re-splits the file on every call.
            segment = "".join(lines[node.lineno - 1:node.end_lineno])
            if len(segment) <= 4096:
                functions.append(segment)
            if doc := ast.get_docstring(node):
                docs.append(doc)
    return functions, docs


def sections(code: str, max_bytes: int) -> list[str]:
    """``code`` cut at line ends into consecutive sections of at most ``max_bytes`` UTF-8 bytes.

    A line longer than ``max_bytes`` is cut between characters. Joining the sections gives
    ``code`` back.
    """
    if max_bytes < 4:  # room for any one UTF-8 character
        raise ValueError(f"max_bytes must be at least 4, got {max_bytes}")
    out: list[str] = []
    current: list[str] = []
    size = 0
    for line in code.splitlines(keepends=True):
        n = len(line.encode("utf-8", errors="replace"))
        if size + n > max_bytes and current:
            out.append("".join(current))
            current, size = [], 0
        while n > max_bytes:  # a single over-long line: cut it between characters
            cut, used = 0, 0
            while cut < len(line) and used + (w := len(line[cut].encode("utf-8", errors="replace"))) <= max_bytes:
                cut, used = cut + 1, used + w
            out.append(line[:cut])
            line, n = line[cut:], n - used
        current.append(line)
        size += n
    if current:
        out.append("".join(current))
    return out


def default_corpus_dir(cache_dir: str | Path | None = None) -> Path:
    """Where generated corpora are cached: ``CACHE_DIR/corpus``, by default ``~/.cache/thruput/corpus``
    (a run config's ``cache_dir``)."""
    return Path(cache_dir if cache_dir is not None else Path.home() / ".cache" / "thruput") / "corpus"


def stdlib_definitions(max_files: int | None = None, directory: Path | None = None) -> dict[str, Path]:
    """JSONL files ``{"text": ...}`` of the standard library's definitions, written once and cached.

    ``functions``: one function or class per record (up to 4 KiB, hundreds of bytes typically);
    ``docstrings``: one docstring per record (tens to hundreds of bytes, like instruction data).
    The cache key is the interpreter version and ``max_files``; files are replaced atomically.
    """
    key = f"stdlib-{sys.version_info.major}.{sys.version_info.minor}-{max_files or 'all'}"
    folder = (directory or default_corpus_dir()) / key
    paths = {"functions": folder / "functions.jsonl", "docstrings": folder / "docstrings.jsonl"}
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    tmp = {k: p.with_name(f"{p.name}.{os.getpid()}.tmp") for k, p in paths.items()}
    with tmp["functions"].open("w") as fn, tmp["docstrings"].open("w") as ds:
        for path in stdlib_files(max_files):
            functions, docs = definitions(path.read_text(encoding="utf-8", errors="replace"))
            fn.writelines(json.dumps({"text": t}) + "\n" for t in functions)
            ds.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    for k, p in paths.items():
        tmp[k].replace(p)
    return paths


def stdlib_sections(max_bytes: int, max_files: int | None = None, directory: Path | None = None) -> Path:
    """A JSONL file ``{"text": ...}`` of the standard library's modules cut into ``sections``.

    Each record is a run of whole lines of one module, at most ``max_bytes`` UTF-8 bytes: with
    ``max_bytes = seq_len + 1`` and byte tokens a section is one training row, so a short run
    draws code from many modules instead of reading a few long ones end to end. Cached like
    ``stdlib_definitions``.
    """
    key = f"stdlib-{sys.version_info.major}.{sys.version_info.minor}-{max_files or 'all'}"
    path = (directory or default_corpus_dir()) / key / f"sections-{max_bytes}.jsonl"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    records = (json.dumps({"text": t}) + "\n" for f in stdlib_files(max_files)
               for t in sections(f.read_text(encoding="utf-8", errors="replace"), max_bytes))
    write_atomic(path, lambda out: out.writelines(r.encode() for r in records))
    return path


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
