"""thruput: faster PyTorch training, measured.

Public names are re-exported lazily so that ``import thruput`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "StepProfiler": "thruput.profile",
    "ClockSampler": "thruput.profile",
    "GPT": "thruput.models",
    "GPTConfig": "thruput.models",
    "Plan": "thruput.data",
    "Loader": "thruput.data",
    "OffloadAdamW": "thruput.memory",
    "linear_cross_entropy": "thruput.kernels",
    "RunConfig": "thruput.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'thruput' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
