"""Shared pieces of the framework-integration tests: a small plan, a Loader that records what
it yields, a tiny random Llama (no downloads)."""
from __future__ import annotations

import torch

from thruput.data import Loader, MemorySource, Plan

SEQ = 32
ROWS = 4
DOCS = [f"document {i} says " + "word " * (i % 7 + 1) for i in range(400)]


def plan() -> Plan:
    return Plan([MemorySource("a", DOCS[:250], weight=2.0), MemorySource("b", DOCS[250:], weight=1.0)],
                seq_len=SEQ, tokens_per_batch=SEQ * ROWS, seed=3)


class RecordingLoader(Loader):
    """A Loader that keeps the ``documents`` of every batch it yields (the sample ids); inline
    unless told otherwise."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("backend", "inline")
        super().__init__(*args, **kwargs)
        self.seen: list[tuple] = []

    def __next__(self):
        batch = super().__next__()
        self.seen.append(tuple(batch["documents"]))
        return batch


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=2, vocab_size=256, attention_dropout=0.0)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(config)


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x.detach().cpu() - y.detach().cpu()).abs().max().item()
               for x, y in zip(a.parameters(), b.parameters()))
