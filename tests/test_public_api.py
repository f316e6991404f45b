"""``thruput.data`` and ``thruput.profile`` export what users call; internals stay in their modules."""
from __future__ import annotations

import importlib

import pytest

INTERNALS = {
    "thruput.data": {"Backend": "thruput.data.backend", "InlineBackend": "thruput.data.backend",
                     "Chunk": "thruput.data.stream", "assign_pieces": "thruput.data.balance",
                     "lpt_equal_count": "thruput.data.balance", "DocumentTokenizer": "thruput.data.tokenize"},
    "thruput.profile": {"ClockSource": "thruput.profile.clocks", "CpuFreqSource": "thruput.profile.clocks",
                        "NvmlSource": "thruput.profile.clocks", "Finding": "thruput.profile.verdict",
                        "render_comparison_html": "thruput.profile.html",
                        "save_comparison_html": "thruput.profile.html"},
}
USED = {"thruput.data": {"Plan", "Loader", "JsonlSource", "ParquetSource", "TextFilesSource", "MemorySource",
                         "ByteTokenizer", "HFTokenizer", "CostModel", "DataError", "linear", "cosine"},
        "thruput.profile": {"StepProfiler", "ClockSampler", "run_document", "render_terminal", "save_html",
                            "save_json", "load_json", "verdict"}}


@pytest.mark.parametrize("package", sorted(INTERNALS))
def test_all_holds_what_users_call_and_no_internals(package) -> None:
    module = importlib.import_module(package)
    assert USED[package] <= set(module.__all__)
    assert not set(INTERNALS[package]) & set(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None
    for name, home in INTERNALS[package].items():
        assert getattr(importlib.import_module(home), name) is not None  # still importable from its module
