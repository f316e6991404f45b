"""Training checkpoints: written atomically, loaded with ``weights_only=True``.

A checkpoint is one ``step_XXXXXXXX.pt`` file holding plain data and tensors only (model,
optimizer, scheduler, loader and profiler state, the step). It is written to a temporary file
in the same folder, flushed to disk, then renamed, so a crash never leaves a torn file under
the final name.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from thruput.atomic import write_atomic

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep: int = 2) -> Path:
    """Write ``state`` as ``directory/step_<step>.pt`` atomically; keep the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    write_atomic(path, lambda f: torch.save(state, f))
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (``weights_only=True``: tensors and plain data only).

    Raises FileNotFoundError naming the file, or ValueError if it is not a loadable checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError here
        raise ValueError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from None


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint in ``directory``, or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None
