"""thruput.data: a multi-source data plane with packing, attention-cost balancing and exact resumption.

    from thruput.data import Plan, Loader, JsonlSource, linear
    plan = Plan([JsonlSource("web", "web/*.jsonl", weight=linear(1.0, 0.5, 1000)),
                 JsonlSource("code", "code.jsonl", weight=0.5)],
                seq_len=1024, tokens_per_batch=64 * 1024, world_size=8)
    with Loader(plan, rank=rank) as loader:
        for batch in loader: ...
"""
from thruput.data.backend import Backend, InlineBackend
from thruput.data.balance import CostModel, assign_pieces, calibrate, lpt_equal_count
from thruput.data.corpus import stdlib_corpus
from thruput.data.errors import DataError
from thruput.data.jsonl import JsonlSource
from thruput.data.mixture import constant, cosine, linear, piecewise
from thruput.data.parquet import ParquetSource
from thruput.data.plan import Plan
from thruput.data.sources import FieldError, MalformedRecord, MemorySource, Source, TextFilesSource
from thruput.data.stream import Chunk
from thruput.data.tokenize import ByteTokenizer, DocumentTokenizer, HFTokenizer, Tokenizer

# Loader imports torch; loading it lazily keeps source-loader processes (Ray actors, spawned
# workers) that only unpickle a Source free of torch's memory.
_LAZY = {"Loader": "thruput.data.loader", "DeltaCheckpointer": "thruput.data.checkpoint"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'thruput.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


# What users call. Internals (backends, chunks, the balancing and packing functions, the
# document tokenizer) stay importable from their modules: thruput.data.backend, .stream, .balance, .tokenize.
__all__ = [
    "ByteTokenizer",
    "CostModel",
    "DataError",
    "DeltaCheckpointer",
    "FieldError",
    "HFTokenizer",
    "JsonlSource",
    "Loader",
    "MalformedRecord",
    "MemorySource",
    "ParquetSource",
    "Plan",
    "Source",
    "TextFilesSource",
    "Tokenizer",
    "calibrate",
    "constant",
    "cosine",
    "linear",
    "piecewise",
    "stdlib_corpus",
]
