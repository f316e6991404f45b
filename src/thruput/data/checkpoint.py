"""Differential checkpoints of loader state: a full snapshot, then small deltas against it.

    ckpt = DeltaCheckpointer("run/data", every=10, full_every=20)
    state = ckpt.restore()                   # None on a fresh run
    if state is not None:
        loader.load_state_dict(state)
    for batch in loader:
        ...
        ckpt.maybe_save(loader.state_dict())  # every 10 steps; a full snapshot every 20 deltas

A state is nested dicts of plain data (``Loader.state_dict()``, optionally with other entries).
A delta records, against the last full snapshot, how far each integer advanced (cursors, step,
skipped counts; the shuffle RNG is a function of seed and epoch, so a cursor is its position)
and any other leaf that changed, appeared or vanished. Files are JSON, written to a temporary
file, flushed and renamed, so a crash leaves either the old or the new file, never a torn one.
Restoring is the newest file: a snapshot, or its base snapshot plus that one delta.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from thruput.atomic import write_atomic
from thruput.data.errors import DataError

FORMAT = 1
_NAME = re.compile(r"^(full|delta)-(\d{10})\.json$")


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def flatten(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Leaves of nested dicts keyed by JSON-pointer paths (``/sources/web/position``)."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise DataError(f"checkpoint: state keys must be strings, got {key!r} under '{prefix or '/'}'")
        path = f"{prefix}/{_escape(key)}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path))
        else:
            out[path] = dict(value) if isinstance(value, Mapping) else value
    return out


def unflatten(leaves: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in leaves.items():
        node = out
        parts = [_unescape(p) for p in path.split("/")[1:]]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def make_delta(base: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """What turns ``base`` into ``state``, only where they differ, in the state's own nesting.

    ``add``: integer advances; ``set``: other changed or new leaves; ``del``: paths of vanished
    leaves. Empty parts are left out.
    """
    old, new = flatten(base), flatten(state)
    add, put = {}, {}
    for path, value in new.items():
        if path in old and old[path] == value and type(old[path]) is type(value):
            continue
        if path in old and _is_int(old[path]) and _is_int(value):
            add[path] = value - old[path]
        else:
            put[path] = value
    gone = sorted(set(old) - set(new))
    parts = {"add": unflatten(add), "set": unflatten(put), "del": gone}
    return {k: v for k, v in parts.items() if v}


def apply_delta(base: Mapping[str, Any], delta: Mapping[str, Any]) -> dict[str, Any]:
    leaves = flatten(base)
    for path in delta.get("del", []):
        leaves.pop(path, None)
    for path, advance in flatten(delta.get("add", {})).items():
        leaves[path] = leaves[path] + advance
    leaves.update(flatten(delta.get("set", {})))
    return unflatten(leaves)


class DeltaCheckpointer:
    """Saves a state every ``every`` steps into ``directory``: a delta, or a full snapshot every ``full_every`` deltas.

    ``keep`` snapshots (each with its deltas) are kept; older files are deleted after a new
    snapshot is written. Raises ``DataError`` for bad arguments, for states that are not nested
    dicts of JSON data, and when a delta's base snapshot is missing or a file is unreadable.
    """

    def __init__(self, directory: str | Path, every: int = 1, full_every: int = 16, keep: int = 2) -> None:
        if every < 1 or full_every < 0 or keep < 1:
            raise DataError(
                f"checkpoint: need every >= 1, full_every >= 0, keep >= 1; got {every}, {full_every}, {keep}"
            )
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.every, self.full_every, self.keep = every, full_every, keep
        self._base: dict[str, Any] | None = None
        self._base_step = -1
        self._deltas = 0

    # --- files ------------------------------------------------------------------------------------

    def files(self) -> list[tuple[int, str, Path]]:
        """(step, "full" | "delta", path) of every checkpoint file, oldest first."""
        out = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                out.append((int(m.group(2)), m.group(1), p))
        return sorted(out, key=lambda t: (t[0], t[1] == "full"))

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"checkpoint: cannot read '{path}': {exc}") from exc
        if doc.get("format") != FORMAT:
            raise DataError(f"checkpoint: '{path}' has format {doc.get('format')!r}, expected {FORMAT}")
        return doc

    # --- saving -----------------------------------------------------------------------------------

    def maybe_save(self, state: Mapping[str, Any], step: int | None = None) -> Path | None:
        """``save`` when ``step`` (default ``state["step"]``) is a multiple of ``every``."""
        step = int(state["step"]) if step is None else step
        return self.save(state, step) if step % self.every == 0 else None

    def save(self, state: Mapping[str, Any], step: int | None = None) -> Path:
        """Write ``state`` for ``step``: a delta against the last snapshot, or a new snapshot."""
        step = int(state["step"]) if step is None else step
        full = self._base is None or self._deltas >= self.full_every
        if full:
            doc = {"format": FORMAT, "step": step, "state": state}
        else:
            doc = {"format": FORMAT, "step": step, "base": self._base_step, **make_delta(self._base, state)}
        try:
            data = json.dumps(doc, separators=(",", ":")).encode()
        except TypeError as exc:
            raise DataError(f"checkpoint: state is not plain JSON data: {exc}") from exc
        path = self.directory / f"{'full' if full else 'delta'}-{step:010d}.json"
        write_atomic(path, lambda f: f.write(data))
        if full:
            self._base, self._base_step, self._deltas = json.loads(data)["state"], step, 0
            self._prune()
        else:
            self._deltas += 1
        return path

    def _prune(self) -> None:
        snapshots = [s for s, kind, _ in self.files() if kind == "full"]
        if len(snapshots) > self.keep:
            oldest_kept = snapshots[-self.keep]
            for step, _, path in self.files():
                if step < oldest_kept:
                    path.unlink(missing_ok=True)

    # --- restoring --------------------------------------------------------------------------------

    def restore(self) -> dict[str, Any] | None:
        """The newest saved state (snapshot plus delta), or None when nothing was saved.

        Later saves continue the restored snapshot's chain of deltas.
        """
        files = self.files()
        if not files:
            return None
        step, kind, path = files[-1]
        doc = self._read(path)
        if kind == "full":
            self._base, self._base_step, self._deltas = doc["state"], step, 0
            return json.loads(json.dumps(doc["state"]))
        base_path = self.directory / f"full-{doc['base']:010d}.json"
        if not base_path.exists():
            raise DataError(f"checkpoint: '{path}' is a delta of '{base_path}', which is missing")
        base = self._read(base_path)["state"]
        self._base, self._base_step = base, int(doc["base"])
        self._deltas = sum(1 for s, k, _ in files if k == "delta" and self._base_step < s <= step)
        return apply_delta(base, doc)
