"""``thruput run -- CMD``: run an unmodified training script under the hooks and report it.

CMD is one of

* ``python script.py ARGS`` or ``script.py ARGS``: the script runs **in this process** after the
  hooks are installed (``runpy.run_path`` with ``__name__ == "__main__"``, ``sys.argv`` and
  ``sys.path[0]`` as ``python`` sets them). In-process because the report can then be written
  in a ``finally`` whatever way the script ends, its exception and exit code are seen
  directly, and nothing leaks into the processes the script starts (DataLoader workers,
  compile workers) as an environment-variable shim would.
* ``python -m module ARGS`` or ``-m module ARGS``: the same with ``runpy.run_module``.
* anything else, e.g. ``torchrun --nproc_per_node 2 train.py``: a launcher. It runs as a child
  process with a ``sitecustomize`` shim first on ``PYTHONPATH``; the shim profiles every
  process the launcher starts with ``RANK`` set (its ranks, not the launcher itself nor
  their own subprocesses), and each rank writes ``NAME-rankR.json`` when it exits. The parent
  then prints each rank's report. ``torchrun ... -m thruput.cli run -- train.py`` works too:
  each rank then runs the script in-process.

The exit code passes through: the script's ``SystemExit`` code, 1 for an uncaught exception
(its traceback printed without thruput's frames), 130 for KeyboardInterrupt, and a launcher's
own code (128 + N when a signal N ended it).
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from rich.console import Console

from thruput.console import make_console
from thruput.profile import load_json, render_terminal
from thruput.run.command import Command
from thruput.run.session import ExitInfo, RunOptions, Session, Written, rank_from_env

ENV_OPTIONS = "THRUPUT_RUN_OPTIONS"
SHIM_DIR = Path(__file__).with_name("_shim")
_OWN_FILES = frozenset({__file__, runpy.__file__, "<frozen runpy>"})


def run_command(command: Command, options: RunOptions) -> int:
    """Run ``command`` profiled, print the report, and return the exit code to pass on."""
    if command.kind == "launcher":
        return _run_launcher(command, options)
    if command.kind == "script" and not Path(command.target).is_file():
        print(f"thruput run: can't open file {command.target!r}: no such file", file=sys.stderr)
        return 2
    rank = rank_from_env()
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    # As python does: the script's folder, or for -m the working directory, comes first.
    sys.path.insert(0, str(Path(command.target).resolve().parent) if command.kind == "script" else os.getcwd())
    sys.argv = command.argv
    try:
        if command.kind == "module" and importlib.util.find_spec(command.target) is None:
            print(f"thruput run: no module named {command.target!r}", file=sys.stderr)
            return 1
        session = Session(options, command.argv, rank=rank)
        exit_info = _run_in_process(command, session)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    try:
        written = session.finish(exit_info)
    except OSError as exc:
        print(f"thruput run: could not write the report: {exc}", file=sys.stderr)
        return exit_info.code or 1
    console = make_console(stderr=True)
    if rank in (None, 0):
        _print_report(console, written, exit_info)
    else:
        console.print(f"thruput run rank {rank}: wrote {written.paths['json']}", markup=False, soft_wrap=True)
    return exit_info.code


def _run_in_process(command: Command, session: Session) -> ExitInfo:
    session.start()
    try:
        if command.kind == "script":
            runpy.run_path(command.target, run_name="__main__")
        else:
            runpy.run_module(command.target, run_name="__main__", alter_sys=True)
        return ExitInfo(0)
    except SystemExit as exc:
        return _system_exit(exc)
    except KeyboardInterrupt as exc:
        _print_traceback(exc)
        return ExitInfo(130, "KeyboardInterrupt")
    except BaseException as exc:  # the script's crash: report it as python would, then pass it on
        _print_traceback(exc)
        return ExitInfo(1, f"{type(exc).__name__}: {exc}")


def _system_exit(exc: SystemExit) -> ExitInfo:
    """SystemExit's code as python's exit status: None -> 0, an int as is, else printed -> 1."""
    if exc.code is None:
        return ExitInfo(0)
    if isinstance(exc.code, int):
        return ExitInfo(exc.code, None if exc.code == 0 else f"SystemExit: {exc.code}")
    print(exc.code, file=sys.stderr)
    return ExitInfo(1, f"SystemExit: {exc.code}")


def _print_traceback(exc: BaseException) -> None:
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in _OWN_FILES:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _print_report(console: Console, written: Written, exit_info: ExitInfo) -> None:
    document = written.document
    render_terminal(document, console=console)
    steps = len(document["steps"])
    if steps == 0 and exit_info.error is None:
        console.print("thruput run: no step finished; a step ends at optimizer.step(), and this "
                      "run called none", markup=False, soft_wrap=True)
    if steps and not document["summary"].get("tokens_per_s"):
        console.print("thruput run: no tokens counted: no loader batch and no forward with integer "
                      "token ids as its first argument was seen", markup=False, soft_wrap=True)
    if exit_info.error is not None:
        console.print(f"thruput run: the script ended with {exit_info.error} (exit code "
                      f"{exit_info.code}); the report covers the {steps} steps finished before",
                      markup=False, soft_wrap=True)
    for kind, path in written.paths.items():
        console.print(f"{kind}: {path}", markup=False, soft_wrap=True)


# --- launchers: torchrun and the like ---------------------------------------------------------


def _run_launcher(command: Command, options: RunOptions) -> int:
    env = dict(os.environ)
    env[ENV_OPTIONS] = options.to_json()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIM_DIR), env.get("PYTHONPATH")) if p)
    started = time.time()
    try:
        child = subprocess.Popen(command.argv, env=env)
    except OSError as exc:
        print(f"thruput run: cannot start {command.target!r}: {exc}", file=sys.stderr)
        return 127
    # Ctrl-C reaches the launcher through the terminal's process group; stay alive to report.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    code = code if code >= 0 else 128 - code
    reports = sorted(
        (p for p in Path(options.out).glob(f"{options.name}-rank*.json") if p.stat().st_mtime >= started - 1),
        key=lambda p: int(p.stem.rsplit("-rank", 1)[1]) if p.stem.rsplit("-rank", 1)[1].isdigit() else -1,
    )
    console = make_console(stderr=True)
    if not reports:
        console.print(f"thruput run: no rank wrote a report under {options.out}: the shim profiles "
                      "processes started with RANK set (torchrun, torch.distributed.run)", markup=False, soft_wrap=True)
    for path in reports:
        document = load_json(path)
        exit_record = document["meta"].get("exit") or {}
        written = Written(document, options.paths(document["name"]))
        _print_report(console, written, ExitInfo(code, exit_record.get("error")))
    return code


def activate_from_env() -> None:
    """Called by the shim's sitecustomize at interpreter start: profile this process when a
    launcher under ``thruput run`` started it as a rank. The options leave the environment,
    so the processes this rank starts are not profiled again."""
    raw = os.environ.get(ENV_OPTIONS)
    rank = rank_from_env()
    if raw is None or rank is None:
        return
    del os.environ[ENV_OPTIONS]
    options = RunOptions.from_json(raw)
    session = Session(options, list(sys.argv), rank=rank)
    exit_info = ExitInfo(code=None)
    previous_hook = sys.excepthook

    def excepthook(kind: type, value: BaseException, tb: object) -> None:
        exit_info.code = 130 if issubclass(kind, KeyboardInterrupt) else 1
        exit_info.error = f"{kind.__name__}: {value}"
        previous_hook(kind, value, tb)

    sys.excepthook = excepthook
    atexit.register(session.finish, exit_info)
    session.start()
