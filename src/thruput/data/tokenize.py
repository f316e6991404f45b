"""Tokenizers: bytes by default, or a Hugging Face ``tokenizer.json``; and the per-document encoder.

A tokenizer maps text to a 1-D ``int32`` numpy array of token ids and says which id, if any,
ends a document (``eos_id``). ``DocumentTokenizer`` is what source loaders run on each record:
the tokenizer's ids, then the EOS when the plan asks for it. All are picklable so that
source-loader worker processes can use them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from thruput.data.errors import DataError

# EOS names recognised among a tokenizer's special tokens when nothing names its EOS
# (GPT-2 / NeoX / Qwen, Llama 3, Llama 2 / Mistral / T5, Gemma).
KNOWN_EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class Tokenizer(Protocol):
    """What the data plane needs from a tokenizer.

    ``eos_id`` (the end-of-document token, or ``None``) may be left out: it then counts as None.
    """

    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D int32 array."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary of 256, never fails.

    It has no EOS token (``eos_id`` is None): all 256 ids are bytes, and an EOS would make the
    vocabulary 257. Documents end by segment ids and labels alone (see ``Loader``).
    """

    vocab_size = 256
    eos_id: int | None = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer from a ``tokenizer.json`` file or a folder holding one.

    ``vocab_size`` counts the added and special tokens. ``eos_id`` is the id of ``eos_token``;
    without it, of the ``eos_token`` named by ``tokenizer_config.json`` beside the file, else of
    the one special token named like an EOS (``KNOWN_EOS_TOKENS``); else None. ``encode`` adds
    no special tokens (the plan appends the EOS, see ``Plan.eos``).

    Raises ``DataError`` (one line, naming the file) when the file is missing or not a valid
    tokenizer, or ``eos_token`` is not in its vocabulary.
    """

    def __init__(self, path: str | Path, eos_token: str | None = None) -> None:
        path = Path(path)
        self.path = path / "tokenizer.json" if path.is_dir() else path
        self._tok: Any = self._load()
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_token = eos_token if eos_token is not None else self._find_eos()
        self.eos_id: int | None = None
        if self.eos_token is not None:
            eos_id = self._tok.token_to_id(self.eos_token)
            if eos_id is None:
                raise DataError(f"tokenizer file '{self.path}': eos token {self.eos_token!r} is not in its vocabulary")
            self.eos_id = int(eos_id)

    def _load(self) -> Any:
        from tokenizers import Tokenizer as _Tok

        if not self.path.is_file():
            raise DataError(f"tokenizer file '{self.path}' does not exist")
        try:
            return _Tok.from_file(str(self.path))
        except Exception as exc:  # the tokenizers library raises a bare Exception
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"tokenizer file '{self.path}' could not be loaded: {reason}") from exc

    def _find_eos(self) -> str | None:
        config = self.path.parent / "tokenizer_config.json"
        if config.is_file():
            try:
                named = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
            except (OSError, ValueError, AttributeError) as exc:
                raise DataError(f"tokenizer config '{config}' is not a readable JSON object: {exc}") from exc
            if isinstance(named, dict):  # {"content": "</s>", ...}, as transformers writes it
                named = named.get("content")
            if isinstance(named, str):
                return named
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        found = [name for name in KNOWN_EOS_TOKENS if name in special]
        return found[0] if len(found) == 1 else None

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "vocab_size": self.vocab_size, "eos_token": self.eos_token, "eos_id": self.eos_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tok = self._load()


class DocumentTokenizer:
    """A tokenizer whose documents end in ``eos_id`` (when it is not None).

    Calling it on one record's text (or token ids, used as they are) gives the document's
    tokens: ``tokenizer``'s ids, then the EOS; an empty document stays empty (it is skipped like
    a filtered-out record, not trained on as a lone EOS). ``encode`` does the same for text, so
    it is a ``Tokenizer`` itself.
    """

    def __init__(self, tokenizer: Tokenizer, eos_id: int | None) -> None:
        self.tokenizer = tokenizer
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def encode(self, text: str) -> np.ndarray:
        return self(text)

    def __call__(self, text: str | np.ndarray) -> np.ndarray:
        ids = self.tokenizer.encode(text) if isinstance(text, str) else np.asarray(text, dtype=np.int32)
        if self.eos_id is None or ids.size == 0:
            return ids
        return np.append(ids, np.int32(self.eos_id)).astype(np.int32, copy=False)
