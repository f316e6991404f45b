"""The naive peer: the baseline a competent PyTorch user writes, for side-by-side comparisons.

torch ``DataLoader`` with worker processes over a map-style dataset of document chunks
(documents split into pieces of ``seq_len + 1`` tokens, so no text is lost), a
``WeightedRandomSampler`` for the source mixture, and a pad-to-longest collate. Batches have the
same keys as ``thruput.data.Loader`` batches, so the same training loop runs on either; there
are no ``position_ids``, so the model takes SDPA's plain causal path.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from thruput.labels import IGNORE_INDEX


class ChunkDataset(Dataset):
    """Every source document, tokenized and split into chunks of at most ``seq_len + 1`` tokens."""

    def __init__(self, sources: Sequence[Any], tokenizer: Any, seq_len: int) -> None:
        self.sources, self.tokenizer, self.seq_len = list(sources), tokenizer, seq_len
        self.names = [s.name for s in self.sources]
        chunks: list[tuple[int, int, int]] = []  # (source, record, start token)
        lengths: list[int] = []
        self.document_lengths: list[np.ndarray] = []  # tokens per record, per source
        for s, source in enumerate(self.sources):
            counts = [len(self.tokens(s, r)) for r in range(len(source))]
            self.document_lengths.append(np.asarray(counts, dtype=np.int64))
            for r, n in enumerate(counts):
                for start in range(0, max(n - 1, 0), seq_len):
                    chunks.append((s, r, start))
                    lengths.append(min(seq_len, n - 1 - start))
        self.chunks = np.asarray(chunks, dtype=np.int64).reshape(-1, 3)
        self.lengths = np.asarray(lengths, dtype=np.int64)  # labelled tokens per chunk

    def tokens(self, s: int, r: int) -> np.ndarray:
        """The tokens of record ``r`` of source ``s`` (none for a skipped record)."""
        text = self.sources[s].text(r)
        if text is None:
            return np.zeros(0, dtype=np.int32)
        return text if isinstance(text, np.ndarray) else self.tokenizer.encode(text)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        s, r, start = (int(v) for v in self.chunks[i])
        return s, self.tokens(s, r)[start:start + self.seq_len + 1]

    def sample_weights(self) -> torch.Tensor:
        """Per-chunk sampling weights so each source is drawn in proportion to its weight."""
        src = self.chunks[:, 0]
        counts = np.bincount(src, minlength=len(self.sources)).astype(np.float64)
        mix = np.array([float(s.weight) for s in self.sources])
        return torch.as_tensor(mix[src] / counts[src], dtype=torch.double)

    def token_shares(self) -> dict[str, float]:
        """Each source's expected share of labelled tokens under ``sample_weights``: the mixture
        a token-weighted plan needs to see the same data."""
        weights = self.sample_weights().numpy()
        tokens = np.bincount(self.chunks[:, 0], weights=weights * self.lengths, minlength=len(self.sources))
        return {s.name: float(t / tokens.sum()) for s, t in zip(self.sources, tokens)}


class PadCollate:
    """Pad to the longest chunk of the batch; ``shift_labels`` are -100 on padding."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)

    def __call__(self, items: list[tuple[int, np.ndarray]]) -> dict[str, Any]:
        longest = max(len(t) for _, t in items) - 1
        input_ids = torch.zeros(len(items), longest, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        per_source = dict.fromkeys(self.names, 0)
        bounds = [0]
        for b, (s, tokens) in enumerate(items):
            n = len(tokens) - 1
            t = torch.from_numpy(tokens.astype(np.int64))
            input_ids[b, :n] = t[:-1]
            labels[b, :n] = t[1:]
            per_source[self.names[s]] += n
            bounds += [b * longest + n] if n == longest else [b * longest + n, (b + 1) * longest]
        real = sum(per_source.values())
        return {"input_ids": input_ids, "shift_labels": labels,
                "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
                "tokens_per_source": per_source, "padding_ratio": 1 - real / input_ids.numel()}


def sampled_chunks(dataset: ChunkDataset, *, batch_size: int, steps: int, seed: int = 0) -> np.ndarray:
    """The chunk indices ``[steps, batch_size]`` that ``loader_for`` will yield, computed up front
    (``WeightedRandomSampler`` draws them all at once from its generator)."""
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.multinomial(dataset.sample_weights(), steps * batch_size, True, generator=generator)
    return drawn.numpy().reshape(steps, batch_size)


def baseline_loader(sources: Sequence[Any], tokenizer: Any, *, seq_len: int, batch_size: int, steps: int,
                    seed: int = 0, workers: int = 1) -> DataLoader:
    """A torch DataLoader yielding ``steps`` padded batches drawn by source weight."""
    return loader_for(ChunkDataset(sources, tokenizer, seq_len), batch_size=batch_size, steps=steps, seed=seed,
                      workers=workers)


def loader_for(dataset: ChunkDataset, *, batch_size: int, steps: int, seed: int = 0, workers: int = 1) -> DataLoader:
    """``baseline_loader`` over an already built dataset."""
    generator = torch.Generator().manual_seed(seed)
    sampler = WeightedRandomSampler(dataset.sample_weights(), steps * batch_size, replacement=True,
                                    generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=PadCollate(dataset.names), persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)
