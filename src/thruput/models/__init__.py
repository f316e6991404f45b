"""Models: the small GPT, per-document attention, and the registry of model kinds a run trains.

``GPT`` is imported on first use, so that the torch-free configs (``GPTConfig``) load without torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from thruput.models.gpt_config import GPTConfig

__all__ = ["GPT", "GPTConfig"]


def __getattr__(name: str) -> Any:
    if name == "GPT":
        return importlib.import_module("thruput.models.gpt").GPT
    raise AttributeError(f"module 'thruput.models' has no attribute {name!r}")
