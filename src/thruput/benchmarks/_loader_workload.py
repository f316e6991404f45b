"""The workload of ``thruput bench loader``: corpus, preprocessing, peers and the simulated consumer.

Run as ``python -m thruput.benchmarks._loader_workload CONFIG.json RESULT.json`` to measure one
peer in a fresh process, so that no peer inherits another's memory, threads or workers.

The corpus is four JSONL sources whose documents have lognormal (long-tailed) lengths of random
ASCII text, so one character is one byte token. Each source's transform case-folds its text
``factor * unit_rounds`` times: real CPU work proportional to text length, 1x, 3x, 7x and 20x.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from thruput.data import ByteTokenizer, JsonlSource, Loader, Plan
from thruput.demo.packed_peer import FlattenCollate, QuotaPieces
from thruput.demo.padded_peer import PadCollate

SOURCES: tuple[tuple[str, int], ...] = (("light", 1), ("medium", 3), ("heavy", 7), ("heaviest", 20))
_ALPHABET = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz      ABCDEFGHIJ.,;-0123456789\n", dtype=np.uint8)


@dataclass(frozen=True)
class Clean:
    """A source transform: case-fold the record's ``text`` ``rounds`` times (length-preserving)."""

    rounds: int

    def __call__(self, record: dict[str, Any]) -> str:
        return self.text(record["text"])

    def text(self, text: str) -> str:
        for _ in range(self.rounds):
            text = text.swapcase()
        return text


def document_lengths(rng: np.random.Generator, n_docs: int, max_len: int) -> np.ndarray:
    """Lognormal lengths in characters (median ~400, mean ~830), clipped to [16, max_len]."""
    return rng.lognormal(mean=6.0, sigma=1.2, size=n_docs).clip(16, max_len).astype(np.int64)


def write_corpus(folder: Path, n_docs: int, max_len: int, seed: int) -> dict[str, np.ndarray]:
    """Write ``NAME.jsonl`` and ``NAME.lengths.npy`` per source; returns the lengths per source."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, _ in SOURCES:
        lengths = document_lengths(rng, n_docs, max_len)
        chars = _ALPHABET[rng.integers(0, _ALPHABET.size, int(lengths.sum()))].tobytes().decode("ascii")
        ends = np.cumsum(lengths)
        with (folder / f"{name}.jsonl").open("w") as f:
            for end, n in zip(ends, lengths):
                f.write(json.dumps({"text": chars[end - n : end]}) + "\n")
        np.save(folder / f"{name}.lengths.npy", lengths)
        out[name] = lengths
    return out


def make_sources(folder: Path, unit_rounds: int, weights: Sequence[float]) -> list[JsonlSource]:
    return [
        JsonlSource(name, folder / f"{name}.jsonl", weight=w, transform=Clean(factor * unit_rounds),
                    cache_dir=folder / "index")
        for (name, factor), w in zip(SOURCES, weights)
    ]


def seconds_per_token(source: JsonlSource, budget_tokens: int) -> float:
    """CPU seconds per token to read, clean and tokenize ``source``'s first documents."""
    tok = ByteTokenizer()
    tokens, t0 = 0, time.process_time()
    for i in range(len(source)):
        tokens += tok.encode(source.text(i)).size
        if tokens >= budget_tokens:
            break
    return (time.process_time() - t0) / max(tokens, 1)


def _probe(args: tuple[str, int, list[float], int, float]) -> tuple[int, float]:
    folder, unit_rounds, weights, seed, seconds = args
    sources = make_sources(Path(folder), unit_rounds, weights)
    rng, tok = np.random.default_rng(seed), ByteTokenizer()
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        source = sources[int(rng.choice(len(sources), p=weights))]
        tokens += tok.encode(source.text(int(rng.integers(len(source))))).size
    return tokens, time.perf_counter() - t0


def preprocessing_capacity(folder: Path, unit_rounds: int, weights: Sequence[float], processes: int,
                           seconds: float) -> float:
    """Mixture tokens/s that ``processes`` always-busy processes preprocess on this machine now.

    Wall-clock, so it sees what other load leaves over; documents are drawn by source weight
    (every source has the same length distribution, so documents and tokens mix alike).
    """
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    jobs = [(str(folder), unit_rounds, list(weights), seed, seconds) for seed in range(processes)]
    with ctx.Pool(processes) as pool:
        return sum(tokens / elapsed for tokens, elapsed in pool.map(_probe, jobs))


class PeerChunks(Dataset):
    """``baseline.ChunkDataset`` for this corpus: chunks of at most ``seq_len + 1`` tokens.

    The chunk index comes from the known document lengths, and only the chunk's own slice of text
    is cleaned and tokenized (the transform is per character), so the peers pay the same
    preprocessing per token as thruput instead of re-cleaning a whole document per chunk.
    """

    def __init__(self, sources: Sequence[JsonlSource], lengths: Sequence[np.ndarray], seq_len: int) -> None:
        self.sources, self.seq_len, self.tokenizer = list(sources), seq_len, ByteTokenizer()
        rows = [
            (s, r, start)
            for s, lens in enumerate(lengths)
            for r, n in enumerate(lens.tolist())
            for start in range(0, max(n - 1, 0), seq_len)
        ]
        self.chunks = np.asarray(rows, dtype=np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        s, r, start = (int(v) for v in self.chunks[i])
        source = self.sources[s]
        text = source.read(r)["text"][start : start + self.seq_len + 1]
        return s, self.tokenizer.encode(source.transform.text(text))

    def sample_weights(self) -> torch.Tensor:
        """Per-chunk weights so that each source is drawn in proportion to its weight."""
        src = self.chunks[:, 0]
        counts = np.bincount(src, minlength=len(self.sources)).astype(np.float64)
        mix = np.array([float(s.weight) for s in self.sources])
        return torch.as_tensor(mix[src] / counts[src], dtype=torch.double)


def peer_loader(kind: str, dataset: PeerChunks, batch_size: int, workers: int, seed: int) -> DataLoader:
    """torch ``DataLoader`` (``kind="torch_dataloader"``) or torchdata ``StatefulDataLoader``.

    An epoch draws as many chunks as the dataset holds, as a user of the weighted sampler would.
    """
    if kind == "torchdata":
        from torchdata.stateful_dataloader import StatefulDataLoader as cls
    else:
        cls = DataLoader
    sampler = WeightedRandomSampler(dataset.sample_weights(), len(dataset), replacement=True,
                                    generator=torch.Generator().manual_seed(seed))
    return cls(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
               collate_fn=PadCollate([s.name for s in dataset.sources]), persistent_workers=True,
               prefetch_factor=4)


class PackedPieces(Dataset):
    """The packed peer's dataset: one cleaned, tokenized piece of a document per index."""

    def __init__(self, sources: Sequence[JsonlSource]) -> None:
        self.sources, self.tokenizer = list(sources), ByteTokenizer()

    def __getitem__(self, piece: tuple[int, int, int, int]) -> dict[str, Any]:
        s, record, start, n = piece
        source = self.sources[s]
        text = source.read(record)["text"][start : start + n]  # one byte token per character
        return {"input_ids": self.tokenizer.encode(source.transform.text(text)).tolist(), "source": s}


def packed_peer_loader(sources: Sequence[JsonlSource], lengths: Sequence[np.ndarray], tokens: int, seq_len: int,
                       workers: int, seed: int) -> DataLoader:
    """torch ``DataLoader`` + ``DataCollatorWithFlattening``: padding-free, mixed by tokens like thruput."""
    sampler = QuotaPieces(lengths, [float(s.weight) for s in sources], tokens, seq_len, seed)
    return DataLoader(PackedPieces(sources), batch_sampler=sampler, num_workers=workers,
                      collate_fn=FlattenCollate([s.name for s in sources]), persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None)


def epochs(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Iterate ``loader`` epoch after epoch, as a training loop does."""
    while True:
        yield from loader


def consume(batches: Iterable[dict[str, Any]], s_per_token: float, warmup: int, seconds: float,
            on_batch: Callable[[], None] | None = None) -> dict[str, Any]:
    """Simulate training: each batch occupies the accelerator ``s_per_token`` per token, pad included.

    The host sleeps through the compute (an accelerator would run it while the host waits), so
    loader workers keep the CPUs. Only the window after ``warmup`` (>= 1) batches is measured.
    """
    it = iter(batches)
    first_batch_at = 0.0
    for _ in range(warmup):
        batch = next(it)
        first_batch_at = first_batch_at or time.perf_counter()
        time.sleep(batch["input_ids"].numel() * s_per_token)
    useful = total = n = 0
    wait = 0.0
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < seconds:
        t0 = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t0
        if on_batch is not None:
            on_batch()
        useful += sum(batch["tokens_per_source"].values())
        total += batch["input_ids"].numel()
        n += 1
        time.sleep(batch["input_ids"].numel() * s_per_token)
    elapsed = time.perf_counter() - t_start
    return {"useful_tokens": useful, "total_tokens": total, "batches": n, "seconds": elapsed,
            "wait_s": wait, "first_batch_at": first_batch_at}


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run one peer on the corpus in ``cfg["dir"]`` and return its raw figures."""
    folder = Path(cfg["dir"])
    t0 = time.perf_counter()
    sources = make_sources(folder, cfg["unit_rounds"], cfg["weights"])
    rows, seq_len, workers = cfg["rows"], cfg["seq_len"], cfg["workers"]
    common = (cfg["s_per_token"], cfg["warmup"], cfg["seconds"])
    if cfg["peer"] == "thruput":
        plan = Plan(sources, seq_len=seq_len, tokens_per_batch=rows * seq_len, packing=True, seed=cfg["seed"])
        options = {"min_workers": 1, "max_workers": workers - (len(sources) - 1), "cpu_budget": workers}
        peak_workers = [0]

        def count_workers() -> None:
            peak_workers[0] = max(peak_workers[0], sum(loader.stats()["workers"].values()))

        with Loader(plan, backend="process", workers=options) as loader:
            out = consume(loader, *common, on_batch=count_workers)
            stats = loader.stats()
        out["worker_processes"] = peak_workers[0]
        out["workers_per_source"] = stats["workers"]
        out["cpu_s_per_token"] = stats["cpu_s_per_token"]
    elif cfg["peer"] == "packed_peer":
        lengths = [np.load(folder / f"{name}.lengths.npy") for name, _ in SOURCES]
        loader = packed_peer_loader(sources, lengths, rows * seq_len, seq_len, workers, seed=cfg["seed"])
        out = consume(loader, *common)
        out["worker_processes"] = workers
    else:
        lengths = [np.load(folder / f"{name}.lengths.npy") for name, _ in SOURCES]
        dataset = PeerChunks(sources, lengths, seq_len)
        loader = peer_loader(cfg["peer"], dataset, rows, workers, seed=cfg["seed"])
        out = consume(epochs(loader), *common)
        out["worker_processes"] = workers
    out["startup_s"] = out.pop("first_batch_at") - t0  # indexing, worker start and the first batch
    return out


def main(argv: list[str]) -> int:
    cfg = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(measure(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
