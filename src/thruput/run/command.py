"""The command after ``thruput run --``: which of the three shapes it is, and its report name.

* ``python script.py ARGS`` / ``script.py ARGS``: a script, run in thruput's process;
* ``python -m module ARGS`` / ``-m module ARGS``: a module, likewise;
* anything else (``torchrun ...``, ``python -m torch.distributed.run ...``): a launcher, run as
  a child process whose ranks profile themselves.

``python`` must be this environment's interpreter, since the script runs in this process.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

LAUNCHER_MODULES = frozenset({"torch.distributed.run", "torch.distributed.launch"})


class CommandError(ValueError):
    """The command after ``--`` cannot be run (the message says why and what to write)."""


@dataclass(frozen=True)
class Command:
    """``kind`` "script" (target = path), "module" (target = module name) or "launcher"
    (target = executable); ``args`` are what follows the target."""

    kind: Literal["script", "module", "launcher"]
    target: str
    args: tuple[str, ...]

    @property
    def argv(self) -> list[str]:
        return [self.target, *self.args]

    def default_name(self) -> str:
        """The report's file stem: the script's or module's name (for a launcher, the first
        ``*.py`` argument or ``-m`` module), else the executable's name."""
        if self.kind == "script":
            return Path(self.target).stem
        if self.kind == "module":
            return self.target.rsplit(".", 1)[-1]
        words = self.args
        for i, word in enumerate(words):
            if word.endswith(".py"):
                return Path(word).stem
            if word == "-m" and i + 1 < len(words) and words[i + 1] not in LAUNCHER_MODULES:
                return words[i + 1].rsplit(".", 1)[-1]
        return Path(self.target).name


def parse_command(argv: list[str]) -> Command:
    """Classify the words after ``--``; a CommandError names what is wrong."""
    words = list(argv[1:] if argv[:1] == ["--"] else argv)
    if not words:
        raise CommandError("no command after '--' (e.g. thruput run -- python train.py --lr 1e-3)")
    python = _is_python(words[0])
    if python:
        _check_same_interpreter(words[0])
        words = words[1:]
        if not words:
            raise CommandError(f"{argv[-1]!r} without a script or -m module")
        if words[0].startswith("-") and words[0] != "-m":
            raise CommandError(f"python option {words[0]!r} is not supported: the script runs in "
                               "thruput's interpreter; set interpreter options with PYTHON* variables")
    if words[0] == "-m":
        if len(words) < 2:
            raise CommandError("-m without a module name")
        if words[1] in LAUNCHER_MODULES:
            return Command("launcher", sys.executable, tuple(words))
        return Command("module", words[1], tuple(words[2:]))
    if python or words[0].endswith(".py"):
        return Command("script", words[0], tuple(words[1:]))
    return Command("launcher", words[0], tuple(words[1:]))


def _is_python(word: str) -> bool:
    name = Path(word).name
    return name == "python" or (name.startswith("python") and name[6:].replace(".", "").isdigit())


def _check_same_interpreter(word: str) -> None:
    """The script runs in this interpreter, so ``python`` must name this environment: the same
    bin folder, or (shims such as pyenv's) an interpreter reporting the same ``sys.prefix``."""
    found = shutil.which(word)
    if found is None:
        raise CommandError(f"{word!r} not found on PATH")
    if os.path.dirname(os.path.abspath(found)) == os.path.dirname(os.path.abspath(sys.executable)):
        return
    try:
        prefix = subprocess.run([found, "-c", "import sys; print(sys.prefix)"], capture_output=True,
                                text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        prefix = None
    if prefix != sys.prefix:
        raise CommandError(f"{word!r} is {found}, another environment than thruput's "
                           f"({sys.executable}); write `{sys.executable} -m thruput.cli run -- "
                           "script.py ...` or install thruput in that environment")
