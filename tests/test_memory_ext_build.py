"""thruput.memory.ext_build: one build per key across processes, a folder per source and torch
build, a crashed builder never blocks, a live one is waited for with a bound.

The extension here is a tiny C-API module (no torch headers), so a build takes a second."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from thruput.memory import ext_build

TINY = textwrap.dedent("""
    #include <Python.h>
    #define CAT(a, b) a##b
    #define INIT(n) CAT(PyInit_, n)
    #define STR2(n) #n
    #define STR(n) STR2(n)
    static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
    static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, ""}, {nullptr, nullptr, 0, nullptr}};
    static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};
    PyMODINIT_FUNC INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
""")

# Each child counts its calls of torch's builder, slowed down so that the other child surely
# arrives while the build runs, and starts only when both are ready (a barrier of files).
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from torch.utils import cpp_extension
    from thruput.memory import ext_build
    source, root, count, me = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    real_load = cpp_extension.load
    def counted(*args, **kwargs):
        with open(count, "a") as f:
            f.write(me + "\\n")
        time.sleep(2.0)
        return real_load(*args, **kwargs)
    cpp_extension.load = counted
    (root / f"ready.{me}").touch()
    deadline = time.monotonic() + 60
    while len(list(root.glob("ready.*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    module = ext_build.load_extension("tiny", source, ["-O1"], [], root=root, timeout_s=120)
    print(module.answer())
""")


def test_two_processes_build_once_and_both_load(tmp_path: Path) -> None:
    source, root, count = tmp_path / "tiny.cpp", tmp_path / "root", tmp_path / "count"
    source.write_text(TINY)
    root.mkdir()
    folder = ext_build.build_folder("tiny", source.read_bytes(), ["-O1"], [], root)
    folder.mkdir()
    (folder / "lock").touch()  # torch's baton, as a build killed mid-way leaves it: must not hang
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(root), str(count), str(i)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [c.communicate(timeout=240) for c in children]
    for child, (out, err) in zip(children, outs):
        assert child.returncode == 0, err
        assert out.strip() == "42"
    assert len(count.read_text().split()) == 1  # one build, the other process waited and imported it
    assert [p.name for p in root.iterdir() if p.is_dir()] == [folder.name]
    assert (folder / "done").exists()
    # a later load imports the library without building; a removed library is built again
    from torch.utils.cpp_extension import LIB_EXT

    assert ext_build.load_extension("tiny", source, ["-O1"], [], root=root).answer() == 42
    (folder / f"{folder.name}{LIB_EXT}").unlink()
    assert ext_build.load_extension("tiny", source, ["-O1"], [], root=root).answer() == 42


def test_a_changed_source_torch_build_or_flags_get_another_folder(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    base = ext_build.build_folder("tiny", b"int a;", ["-O1"], [], tmp_path)
    assert base.parent == tmp_path and base.name.startswith("tiny_")
    assert ext_build.build_folder("tiny", b"int a;", ["-O1"], [], tmp_path) == base
    assert ext_build.build_folder("tiny", b"int b;", ["-O1"], [], tmp_path) != base
    assert ext_build.build_folder("tiny", b"int a;", ["-O2"], [], tmp_path) != base
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert ext_build.build_folder("tiny", b"int a;", ["-O1"], [], tmp_path) != base
    monkeypatch.undo()
    monkeypatch.setattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", not torch._C._GLIBCXX_USE_CXX11_ABI)
    assert ext_build.build_folder("tiny", b"int a;", ["-O1"], [], tmp_path) != base


HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    print("held", flush=True)
    time.sleep(120)
""")


def test_a_live_builder_is_waited_for_with_a_bound_and_a_dead_one_not_at_all(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match=f"held by pid {holder.pid}"):
            with ext_build._Lock(lock, timeout_s=0.5):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with ext_build._Lock(lock, timeout_s=30):  # the kernel released the dead holder's lock
        assert lock.read_text() == str(os.getpid())


def test_a_failed_build_raises_and_leaves_no_done_marker(tmp_path: Path) -> None:
    source = tmp_path / "broken.cpp"
    source.write_text("this is not C++\n")
    with pytest.raises(Exception, match="(?i)error"):
        ext_build.load_extension("broken", source, [], [], root=tmp_path / "root")
    folder = ext_build.build_folder("broken", source.read_bytes(), [], [], tmp_path / "root")
    assert not (folder / "done").exists()
