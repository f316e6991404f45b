"""Build a one-file C++ torch extension once per machine, whatever the virtual environment.

``torch.utils.cpp_extension.load`` caches by extension name, and its ninja file names the
source and the torch headers by absolute path, so every virtual environment (or worktree) on a
machine rebuilds the same name in the same folder, each build undoing the last. Here the
folder is content-addressed instead: ``<name>_<key>`` under torch's extensions directory
(``TORCH_EXTENSIONS_DIR`` or its default), where ``key`` hashes what the binary depends on: the
source bytes, the torch build (version, git revision, CUDA version, C++11 ABI), the Python
ABI, the compiler (``CXX``), the flags, and the CPU (the flags may say ``-march=native``). A
finished build leaves a ``done`` marker; later loads import the library directly, without
ninja. One process builds while the others wait on an ``fcntl`` lock on ``<folder>.lock``:
the kernel releases it when its holder dies, so a crashed build never blocks, and the wait is
bounded (``TimeoutError`` naming the holder's pid). A torch baton file (``lock``) left by a
build killed mid-way is removed before building (safe: the ``fcntl`` lock is held).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

BUILD_TIMEOUT_S = 1800.0  # a 2-core machine under load needs minutes for the real kernel


def _cpu_identity() -> str:
    """The CPU model and feature flags (what ``-march=native`` compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep))) or platform.processor()


def build_key(source: bytes, cflags: list[str], ldflags: list[str]) -> str:
    """16 hex digits of a hash of everything the built library depends on (see the module doc)."""
    parts = [source, torch.__version__, str(torch.version.git_version), str(torch.version.cuda),
             str(torch._C._GLIBCXX_USE_CXX11_ABI), sys.implementation.cache_tag, platform.machine(),
             os.environ.get("CXX", "c++"), repr(cflags), repr(ldflags), _cpu_identity()]
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def build_folder(name: str, source: bytes, cflags: list[str], ldflags: list[str],
                 root: Path | None = None) -> Path:
    """The content-addressed build folder (not created)."""
    if root is None:
        from torch.utils import cpp_extension

        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    return Path(root) / f"{name}_{build_key(source, cflags, ldflags)}"


class _Lock:
    """An exclusive ``fcntl`` lock on ``path``, waited for at most ``timeout_s``."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self.path, self.timeout_s = path, timeout_s
        self.fd: int | None = None

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
                    os.close(self.fd)
                    raise TimeoutError(f"waited {self.timeout_s:.0f} s for the build lock {self.path}, "
                                       f"held by pid {holder}") from None
                time.sleep(0.2)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.fd is not None
        os.close(self.fd)  # releases the lock


def _import(name: str, folder: Path) -> ModuleType:
    from torch.utils.cpp_extension import LIB_EXT

    spec = importlib.util.spec_from_file_location(name, folder / f"{name}{LIB_EXT}")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the extension library in {folder}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_extension(name: str, source: Path, cflags: list[str], ldflags: list[str], *,
                   root: Path | None = None, timeout_s: float = BUILD_TIMEOUT_S) -> ModuleType:
    """The compiled module of the one-file extension ``source``, built at most once per key.

    ``root``: the folder under which build folders live (default: torch's extensions folder).
    Raises what the compiler raises when the build fails, ``TimeoutError`` when another
    process holds the build lock for longer than ``timeout_s``.
    """
    code = source.read_bytes()
    folder = build_folder(name, code, cflags, ldflags, root)
    module_name = folder.name
    done = folder / "done"
    if done.exists():
        try:
            return _import(module_name, folder)
        except (ImportError, OSError):  # the library was removed or damaged since: build again
            pass
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(folder.parent / f"{folder.name}.lock", timeout_s):
        if done.exists():  # built by the process that held the lock before us
            try:
                return _import(module_name, folder)
            except (ImportError, OSError):
                done.unlink()
        folder.mkdir(exist_ok=True)
        (folder / "lock").unlink(missing_ok=True)  # torch's baton, left by a build killed mid-way
        local = folder / source.name  # one path for every checkout: ninja sees the same command
        shutil.copyfile(source, local)
        from torch.utils import cpp_extension

        module = cpp_extension.load(name=module_name, sources=[str(local)], build_directory=str(folder),
                                    extra_cflags=list(cflags), extra_ldflags=list(ldflags), verbose=False)
        tmp = folder / f"done.{os.getpid()}"
        tmp.write_text(f"torch {torch.__version__}\nflags {cflags} {ldflags}\n")
        tmp.replace(done)
        return module
