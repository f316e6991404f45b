"""Tokenizers: bytes by default, or a Hugging Face ``tokenizer.json``.

A tokenizer maps text to a 1-D ``int32`` numpy array of token ids. Both classes are picklable
so that source-loader worker processes can use them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from thruput.data.errors import DataError


class Tokenizer(Protocol):
    """What the data plane needs from a tokenizer."""

    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D int32 array."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary of 256, no special tokens, never fails."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer loaded from a ``tokenizer.json`` file.

    Raises ``DataError`` naming the file when it is missing or not a valid tokenizer file.
    Special tokens (BOS/EOS) are not added: document boundaries travel as position ids.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._tok: Any = self._load()
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def _load(self) -> Any:
        from tokenizers import Tokenizer as _Tok

        if not self.path.is_file():
            raise DataError(f"tokenizer file '{self.path}' does not exist")
        try:
            return _Tok.from_file(str(self.path))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            raise DataError(f"tokenizer file '{self.path}' could not be loaded: {exc}") from exc

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "vocab_size": self.vocab_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.vocab_size = state["vocab_size"]
        self._tok = self._load()
