"""Backends by name, and what ``"auto"`` means (decided here only)."""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from thruput.data.backends.base import Backend
from thruput.data.backends.options import BackendOptions
from thruput.data.errors import DataError

# Imported when chosen: the process backend pulls in multiprocessing machinery, Ray's needs ray.
BACKENDS = {
    "inline": "thruput.data.backends.inline:InlineBackend",
    "process": "thruput.data.backends.process.backend:ProcessBackend",
    "ray": "thruput.data.backends.ray.backend:RayBackend",
}
NAMES = ("auto", *BACKENDS)
_RAY_RUN = ("address", "run_id")  # options that only choose and name a Ray run


def resolve_backend(backend: str, world_size: int, *, address: str | None = None, cpu_budget: int | None = None) -> str:
    """The backend ``backend`` names: ``"inline"``, ``"process"`` or ``"ray"``.

    ``"auto"`` is ``"ray"`` when more than one rank trains (``world_size > 1``) or ``address``
    names a Ray cluster; otherwise ``"inline"`` when ``cpu_budget`` is 0 (no CPUs for source
    loaders: read in the training process), else ``"process"`` (``cpu_budget`` None: all CPUs).
    It never changes which tokens a step gets. ``DataError`` for an unknown name.
    """
    if backend not in NAMES:
        raise DataError(f"loader: backend must be one of {', '.join(map(repr, NAMES))} or a Backend object, got {backend!r}")
    if backend != "auto":
        return backend
    if world_size > 1 or address:
        return "ray"
    return "inline" if cpu_budget == 0 else "process"


def make_backend(backend: str | Backend, world_size: int, options: BackendOptions | Mapping[str, Any] | None = None) -> Backend:
    """The backend object for ``backend`` (a name, or a ``Backend`` returned as it is) with ``options``.

    ``DataError`` for an unknown name or option, or an option the chosen backend does not read
    (``address`` and ``run_id`` are dropped when ``"auto"`` picks a local backend).
    """
    if not isinstance(backend, str):
        if not isinstance(backend, Backend):
            raise DataError(f"loader: {type(backend).__name__} is not a Backend (open, batch, stats, close)")
        if options:
            raise DataError("loader: workers= options go to a backend chosen by name; configure a Backend object yourself")
        return backend
    opts = BackendOptions.of(options)
    name = resolve_backend(backend, world_size, address=opts.address, cpu_budget=opts.cpu_budget)
    if backend == "auto" and name != "ray":
        opts = opts.without(*_RAY_RUN)
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(opts)
