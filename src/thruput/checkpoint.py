"""Training checkpoints: written atomically, loaded with ``weights_only=True``.

:class:`Checkpointer` saves a run's stateful parts (anything with ``state_dict``) by name and
:func:`restore` loads them back; the rest of this module is the file format.

A checkpoint is one ``step_XXXXXXXX.pt`` file holding plain data and tensors only (model,
optimizer, scheduler, loader and profiler state, the step). It is written to a temporary file
in the same folder, flushed to disk, then renamed, so a crash never leaves a torn file under
the final name. A file can still be torn or emptied later (a full disk, a partial copy): resuming
takes the newest checkpoint that loads (:func:`load_newest`), and never deletes the others.
"""
from __future__ import annotations

import re
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from thruput.atomic import write_atomic
from thruput.errors import InputError

_NAME = re.compile(r"^step_(\d{8})\.pt$")
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(InputError):
    """A checkpoint does not load, or loads but does not fit the run; the message names the file
    and, for a misfit, the key."""


class CheckpointWarning(UserWarning):
    """A newer checkpoint was skipped on resume because it does not load."""


def checkpoint_path(directory: str | Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``directory``."""
    return Path(directory) / f"step_{step:08d}.pt"


def save_checkpoint(state: dict[str, Any], directory: str | Path, step: int, keep: int = 2) -> Path:
    """Write ``state`` as ``directory/step_<step>.pt`` atomically; keep the newest ``keep``.

    Rotation counts only checkpoints of ``step`` and before: files of later steps (left by a run
    that resumed from an older checkpoint, e.g. past one that does not load) are never deleted,
    so they cannot push out the checkpoint just written or the one the run resumed from.
    """
    path = checkpoint_path(directory, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(state, f))
    if keep > 0:
        for old in [p for p in list_checkpoints(directory) if _step(p) <= step][:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first (temporary files are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint in ``directory`` (whether or not it loads), or None."""
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (``weights_only=True``: tensors and plain data only).

    Raises FileNotFoundError naming the file, or CheckpointError saying why it does not load:
    empty, truncated, corrupt, or holding Python objects that thruput never writes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError here
        raise CheckpointError(f"{path}: {unloadable_reason(path, exc)}") from None


def unloadable_reason(path: Path, exc: BaseException) -> str:
    """Why ``torch.load`` failed on ``path``, from the file itself rather than torch's message
    (which suggests ``weights_only=False`` even for a torn file, where that cannot help)."""
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    with path.open("rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head == _ZIP_MAGIC:
            return f"truncated: a zip archive (torch.save's format) of {size:,} bytes whose end is missing"
        return f"corrupt or not a checkpoint: {size:,} bytes that are not a zip archive (torch.save's format)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as zip_exc:
        return f"corrupt zip archive ({zip_exc})"
    if bad is not None:
        return f"corrupt: archive member {bad!r} fails its checksum"
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 -- a pickle too broken to scan: described below
        unsafe = []
    if unsafe:
        return (f"holds Python objects that a weights_only load refuses ({', '.join(unsafe[:3])}); thruput "
                f"writes tensors and plain data only, so this file comes from elsewhere")
    detail = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()
    return f"corrupt: {type(exc).__name__}: {detail[0] if detail else 'unreadable'}"


def load_newest(directory: str | Path, set_aside: bool = False) -> tuple[Path, dict[str, Any], list[Path]]:
    """The newest checkpoint in ``directory`` that loads: ``(path, state, skipped)``, where
    ``skipped`` are the newer files that do not load; each gets a :class:`CheckpointWarning`
    naming it and why. Nothing is deleted. With ``set_aside`` each skipped file is renamed to
    ``NAME.unloadable`` (its bytes kept), so that neither rotation nor a later resume meets it
    and the run cannot overwrite it when it reaches that step again.

    Raises FileNotFoundError if the folder holds no checkpoint, CheckpointError listing every
    file tried and why if none loads.
    """
    found = list_checkpoints(directory)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {directory}")
    failures: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path)
        except (CheckpointError, OSError) as exc:  # OSError: unreadable, or set aside meanwhile
            failures.append((path, str(exc).removeprefix(f"{path}: ")))
            continue
        for bad, why in failures:
            kept = "left in place"
            if set_aside:
                aside = _free_name(bad.with_name(bad.name + ".unloadable"))
                bad.replace(aside)
                kept = f"kept as {aside.name}"
            warnings.warn(f"{bad} does not load ({why}); resuming from {path.name}, the newest that does "
                          f"(the file is {kept})", CheckpointWarning, stacklevel=2)
        return path, state, [bad for bad, _ in failures]
    tried = "; ".join(f"{p.name}: {why}" for p, why in failures)
    raise CheckpointError(f"no checkpoint in {directory} loads ({tried})")


def check_same_run(path: Path, state: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """A checkpoint resumes the run it came from: its saved ``config`` (``thruput.config.to_dict``
    of the run that wrote it) must have the same model table, ``data.seq_len``, seed and source
    names as ``config``; steps, learning rate, checkpoint and profile settings may change.
    Checkpoints without a config are left to :func:`restore`'s tensor checks.

    Raises CheckpointError naming the first key that differs and both values.
    """
    saved = state.get("config") if isinstance(state, Mapping) else None
    if not isinstance(saved, Mapping):
        return

    def identity(c: Mapping[str, Any]) -> dict[str, Any]:
        data = c.get("data", {})
        # Configs saved before model kinds: a GPT as long as its rows.
        model = {"kind": "gpt", "max_seq_len": data.get("seq_len"), **c.get("model", {})}
        return {**{f"model.{k}": v for k, v in model.items()}, "data.seq_len": data.get("seq_len"),
                "seed": c.get("seed"), "data.sources": [s.get("name") for s in data.get("sources", [])]}

    theirs, ours = identity(saved), identity(config)
    for key, value in ours.items():
        if theirs.get(key) != value:
            raise CheckpointError(f"{path} does not fit this run: {key} is {theirs.get(key)!r} in the checkpoint, "
                                  f"{value!r} in this run")


def restore(path: Path, state: Mapping[str, Any], parts: Mapping[str, Any], entries: Iterable[str] = (),
            optional: Iterable[str] = ()) -> None:
    """Load ``state[name]`` into each of ``parts`` (objects with ``load_state_dict``); a module's
    tensors are first checked against its own by name and shape. ``entries``: other keys
    ``state`` must hold; ``optional``: parts that checkpoints written before them lack (left as
    they are).

    Raises CheckpointError naming ``path`` and the first entry or key that does not fit.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a training checkpoint")
    parts = {name: part for name, part in parts.items() if name in state or name not in set(optional)}
    missing = [name for name in [*parts, *entries] if name not in state]
    if missing:
        raise CheckpointError(f"{path}: no {missing[0]!r} entry: not a training checkpoint of this kind "
                              f"(entries: {', '.join(sorted(map(str, state))) or 'none'})")
    for name, part in parts.items():
        if isinstance(part, torch.nn.Module):
            _check_tensors(path, name, state[name], part.state_dict())
        try:
            part.load_state_dict(state[name])
        except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as exc:
            detail = " ".join(str(exc).split()) or type(exc).__name__
            where = "" if detail.startswith(name) else f"{name} state: "
            raise CheckpointError(f"{path} does not fit this run: {where}{detail}") from None


def _check_tensors(path: Path, name: str, saved: Any, current: Mapping[str, torch.Tensor]) -> None:
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{path}: {name}: expected a state dict, found {type(saved).__name__}")
    absent = [k for k in current if k not in saved]
    if absent:
        raise CheckpointError(f"{path} does not fit this run: {name}.{absent[0]} is not in the checkpoint")
    extra = [k for k in saved if k not in current]
    if extra:
        raise CheckpointError(f"{path} does not fit this run: {name}.{extra[0]} is in the checkpoint, "
                              f"not in this run's {name}")
    for key, tensor in current.items():
        theirs = saved[key]
        if tuple(getattr(theirs, "shape", ())) != tuple(tensor.shape):
            raise CheckpointError(f"{path} does not fit this run: {name}.{key} has shape "
                                  f"{tuple(getattr(theirs, 'shape', ()))} in the checkpoint, "
                                  f"{tuple(tensor.shape)} in this run")


def _free_name(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2``, ... whichever does not exist yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))  # type: ignore[union-attr]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TorchRNG:
    """torch's random generators as a stateful part (CPU, and every CUDA device's once CUDA is
    initialised), so that dropout draws the same masks after a resume as without one."""

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state:
            torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Periodic checkpoints of a run: every ``every`` steps, ``state_dict()`` of each of ``parts``
    by name, plus plain entries, written to ``directory`` by the one rank that ``writes``.

    ``collective``: some part's ``state_dict()`` is a collective (a sharded optimizer gathers its
    shards), so every rank calls :meth:`save` and takes every state; otherwise only the writer
    does. ``export``: also write the model in its own format to ``step_XXXXXXXX.model/`` beside
    each checkpoint (removed with it by rotation).
    """

    def __init__(self, directory: str | Path | None, every: int, keep: int, parts: Mapping[str, Stateful], *,
                 writes: bool, collective: bool, export: Callable[[Path], None] | None = None) -> None:
        self.directory = None if directory is None else Path(directory)
        self.every, self.keep, self.parts = every, keep, dict(parts)
        self.writes, self.collective, self.export = writes, collective, export

    def due(self, step: int) -> bool:
        """Whether ``step`` is one of the periodic checkpoints."""
        return bool(self.every) and step % self.every == 0

    def save(self, step: int, entries: Mapping[str, Any]) -> Path | None:
        """Write the checkpoint of ``step`` (call on every rank); the path on the writer, else None."""
        if self.directory is None or not (self.writes or self.collective):
            return None
        state = {name: part.state_dict() for name, part in self.parts.items()}
        if not self.writes:
            return None
        if self.export is not None:
            self.export(model_export_path(self.directory, step))
        path = save_checkpoint({**state, **entries, "step": step}, self.directory, step, keep=self.keep)
        kept = {p.name.removesuffix(".pt") for p in list_checkpoints(self.directory)}
        for folder in self.directory.glob("step_*.model"):
            if folder.name.removesuffix(".model") not in kept and _step_of_export(folder) <= step:
                shutil.rmtree(folder, ignore_errors=True)
        return path


def model_export_path(directory: str | Path, step: int) -> Path:
    """Where :class:`Checkpointer` exports the model of ``step`` (``checkpoint.save_model``)."""
    return Path(directory) / f"step_{step:08d}.model"


def _step_of_export(folder: Path) -> int:
    digits = folder.name.removeprefix("step_").removesuffix(".model")
    return int(digits) if digits.isdigit() else -1
