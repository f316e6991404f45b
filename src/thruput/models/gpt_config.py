"""The GPT's shape: the ``[model]`` table of a ``kind = "gpt"`` run, and ``GPT``'s argument.

Torch-free, so that a run config is read and checked before torch is imported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class GPTConfig:
    """Shape of the model. ``max_seq_len`` bounds the rows it is trained on (not rotary positions);
    in a run config it defaults to ``data.seq_len``. ``kind`` names the model kind in a run config.

    ``attention`` on packed rows: ``"segments"`` confines it to each document at a cost that follows
    the documents (``segment_attention``); ``"dense_mask"`` runs SDPA with the dense block-diagonal
    causal mask (``document_mask``), the same result at the cost of every row's T^2 scores: what
    a padding-free peer gets from transformers on CPU, kept for ``bench e2e``'s packed peer.

    Raises ``ValueError`` (its message starts with the field's name) for a non-positive size or
    a head dimension that is odd or does not divide ``d_model``."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_seq_len: int = 256
    mlp_ratio: float = 4.0
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    attention: Literal["segments", "dense_mask"] = "segments"
    kind: Literal["gpt"] = "gpt"

    def __post_init__(self) -> None:
        if self.attention not in ("segments", "dense_mask"):
            raise ValueError(f"attention must be 'segments' or 'dense_mask', got {self.attention!r}")
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model / n_heads ({self.d_model // self.n_heads}, the head dimension) "
                             "must be even for rotary")

    def check(self, run: Any) -> None:
        """Cross-table checks against the ``RunConfig`` ``run``: rows fit ``max_seq_len``."""
        from thruput.config import ConfigError

        if self.max_seq_len < run.data.seq_len:
            raise ConfigError(f"model.max_seq_len: {self.max_seq_len} is shorter than data.seq_len "
                              f"({run.data.seq_len}); leave it out to use data.seq_len")
