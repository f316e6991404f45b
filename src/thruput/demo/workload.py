"""The demo workload: the same small GPT trained on the same labelled tokens, by any set of levers.

* **baseline**: what a competent PyTorch user writes: torch ``DataLoader`` with a worker, a
  ``WeightedRandomSampler`` mixing the sources by sample share, pad-to-longest, torch AdamW,
  the naive loss, no compile (``thruput.demo.padded_peer``).
* **packed peer** (``bench e2e`` only): the strongest peer, padding-free packed rows with position
  ids per document (transformers' ``DataCollatorWithFlattening``), as many rows and tokens per
  source as thruput's plan, the model attending through a dense document mask
  (``thruput.demo.packed_peer``); torch AdamW, the naive loss, no compile.
* **thruput**: the data plane (packing, balancing, per-source workers), OffloadAdamW, the fused
  cross-entropy and shape-bucketed compile, each switchable (``LEVERS``).

The corpus is made on the fly from the Python standard library: modules cut at line ends into
sections of one row (``seq_len`` + 1 bytes; the baseline would cut them into such chunks anyway,
and a short run then draws code from many modules rather than reading a few end to end), one
function or class per document (hundreds of bytes) and one docstring per document (tens to
hundreds of bytes). With byte tokens, ``seq_len`` 1024 is a 1 KiB context. All runs see the same
token mixture: the thruput plan (and the packed peer) weight sources by the baseline sampler's
expected token shares. The thruput batch holds as many rows as the baseline's mean labelled
tokens per step fill, and it runs as many steps as it takes to train on the same number of
labelled tokens, so the loss curves are comparable token for token. Every model is scored on
the same held-out documents (modules that no run trains on).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thruput.config import RunConfig, from_dict

LEVERS = ("data_plane", "offload", "fused_ce", "compile")
PEERS = ("baseline", "packed_peer")  # where a variant without the data plane gets its rows
SOURCES = ("code", "functions", "docstrings")


@dataclass
class DemoSetup:
    """Sizes of the demo workload; ``tiny`` is for tests."""

    seq_len: int = 1024
    # The baseline sampler's share of samples (chunks) per source.
    sample_mix: dict[str, float] = field(default_factory=lambda: {"code": 0.2, "functions": 0.4, "docstrings": 0.4})
    baseline_rows: int = 9  # its mean labelled tokens fill 3.9 packed rows: 4 rows, 59 steps against 60
    steps: int = 60  # baseline steps; the thruput run trains on the same labelled tokens
    model: dict[str, Any] = field(default_factory=lambda: {"d_model": 128, "n_layers": 4, "n_heads": 4})
    train_files: int = 600
    eval_files: int = 40
    eval_batches: int = 4
    lr: float = 2e-3
    warmup_steps: int = 6
    seed: int = 0

    @classmethod
    def tiny(cls) -> DemoSetup:
        return cls(seq_len=64, baseline_rows=4, steps=6, model={"d_model": 32, "n_layers": 1, "n_heads": 2},
                   train_files=30, eval_files=4, eval_batches=1, warmup_steps=2)


@dataclass
class RunOutcome:
    """One trained variant: its profile, losses and held-out score."""

    name: str
    levers: tuple[str, ...]
    document: dict[str, Any]
    losses: list[float]
    eval_loss: float
    useful_tokens: int
    wall_s: float

    @property
    def summary(self) -> dict[str, Any]:
        return self.document["summary"]


def _sources(setup: DemoSetup, token_shares: dict[str, float] | None) -> list[dict[str, Any]]:
    kinds = {"code": "stdlib_sections", "functions": "stdlib_functions", "docstrings": "stdlib_docstrings"}
    shares = token_shares or setup.sample_mix
    return [{"name": n, "kind": kinds[n], "weight": shares[n], "options": {"max_files": setup.train_files}}
            for n in SOURCES]


def variant_config(setup: DemoSetup, levers: tuple[str, ...], *, name: str, rows: int, steps: int,
                   token_shares: dict[str, float] | None, out_dir: Path, attention: str = "segments") -> RunConfig:
    """The run configuration of one variant (``levers`` switched on; ``attention``: the model's
    on packed rows, ``"dense_mask"`` for the packed peer)."""
    unknown = set(levers) - set(LEVERS)
    if unknown:
        raise ValueError(f"unknown levers {sorted(unknown)}; expected some of {LEVERS}")
    return from_dict({
        "name": name,
        "seed": setup.seed,
        "steps": steps,
        "model": {**setup.model, "attention": attention},
        # A peer's rows come from its own loader (``DemoWorkload.peer_loader``): its config says so.
        "data": {"seq_len": setup.seq_len, "batch_size": rows, "pack": "data_plane" in levers, "workers": 1,
                 "sources": _sources(setup, token_shares if "data_plane" in levers else None)},
        "optimizer": {"kind": "offload_adamw" if "offload" in levers else "adamw", "lr": setup.lr,
                      "warmup_steps": setup.warmup_steps},
        "kernels": {"fused_cross_entropy": "fused_ce" in levers, "compile": "compile" in levers},
        "profile": {"report_dir": str(out_dir)},
    })


class DemoWorkload:
    """Builds the baseline dataset once and runs any variant of the demo on it."""

    def __init__(self, setup: DemoSetup, out_dir: Path) -> None:
        from thruput.data import ByteTokenizer
        from thruput.data_config import build_sources
        from thruput.demo.padded_peer import ChunkDataset, sampled_chunks

        self.setup, self.out_dir = setup, out_dir
        probe = variant_config(setup, (), name="baseline", rows=setup.baseline_rows, steps=setup.steps,
                               token_shares=None, out_dir=out_dir)
        self.dataset = ChunkDataset(build_sources(probe), ByteTokenizer(), setup.seq_len)
        drawn = sampled_chunks(self.dataset, batch_size=setup.baseline_rows, steps=setup.steps, seed=setup.seed)
        self.baseline_tokens = int(self.dataset.lengths[drawn].sum())
        self.token_shares = self.dataset.token_shares()
        # Rows per packed step: the baseline's mean labelled tokens per step, in whole rows.
        self.packed_rows = max(1, round(self.baseline_tokens / setup.steps / setup.seq_len))
        self.packed_steps = max(1, math.ceil(self.baseline_tokens / (self.packed_rows * setup.seq_len)))
        self._eval: list[dict] | None = None

    def eval_batches(self) -> list[dict]:
        """Held-out batches: documents of the stdlib modules after the training files, packed."""
        if self._eval is None:
            from thruput.data import Loader, MemorySource, Plan
            from thruput.data.corpus import definitions, sections, stdlib_files

            s = self.setup
            files = stdlib_files(s.train_files + s.eval_files)[s.train_files:]
            modules = [p.read_text(encoding="utf-8", errors="replace") for p in files]
            code, functions, docs = [], [], []
            for text in modules:
                f, d = definitions(text)
                code += sections(text, s.seq_len + 1)
                functions += f
                docs += d
            sources = [MemorySource(n, texts, weight=self.token_shares[n])
                       for n, texts in (("code", code), ("functions", functions), ("docstrings", docs)) if texts]
            plan = Plan(sources, seq_len=s.seq_len, tokens_per_batch=s.seq_len * self.packed_rows, seed=s.seed + 1)
            with Loader(plan, backend="inline", steps=s.eval_batches) as loader:
                self._eval = list(loader)
        return self._eval

    def peer_loader(self, peer: str) -> Any:
        """The rows of a variant without the data plane: ``"baseline"``, the padded peer's
        ``setup.steps`` steps of ``baseline_rows`` rows; ``"packed_peer"``, ``packed_steps`` steps of
        ``packed_rows`` padding-free rows mixed by ``token_shares``, as many as thruput's."""
        s = self.setup
        if peer == "baseline":
            from thruput.demo.padded_peer import loader_for

            return loader_for(self.dataset, batch_size=s.baseline_rows, steps=s.steps, seed=s.seed, workers=1)
        if peer == "packed_peer":
            from thruput.demo.packed_peer import packed_rows_loader

            return packed_rows_loader(self.dataset, self.dataset.document_lengths,
                                      [self.token_shares[n] for n in self.dataset.names], rows=self.packed_rows,
                                      seq_len=s.seq_len, steps=self.packed_steps, seed=s.seed, workers=1)
        raise ValueError(f"unknown peer {peer!r}; expected one of {PEERS}")

    def run(self, levers: tuple[str, ...], name: str | None = None, show_progress: bool = True,
            peer: str = "baseline") -> RunOutcome:
        """Train one variant and score it on the held-out batches. Without the ``data_plane``
        lever the rows come from ``peer`` (``peer_loader``), the packed peer's model attending
        through a dense document mask."""
        from thruput.train import evaluate, train

        name = name or ("+".join(levers) if levers else peer)
        s = self.setup
        own_rows = "data_plane" in levers or peer == "packed_peer"
        cfg = variant_config(s, levers, name=name, rows=self.packed_rows if own_rows else s.baseline_rows,
                             steps=self.packed_steps if own_rows else s.steps, token_shares=self.token_shares,
                             out_dir=self.out_dir, attention="dense_mask" if peer == "packed_peer" else "segments")
        factory = None if "data_plane" in levers else lambda cfg, rank, world: self.peer_loader(peer)
        from thruput.cli import ProgressBar

        t0 = time.perf_counter()
        with ProgressBar(name) as bar:
            result = train(cfg, loader_factory=factory, on_step=bar if show_progress else None)
        wall = time.perf_counter() - t0
        assert result.model is not None and result.document is not None
        return RunOutcome(name, levers, result.document, result.losses, evaluate(result.model, self.eval_batches()),
                          result.useful_tokens, wall)


def compare(baseline: RunOutcome, candidate: RunOutcome) -> dict[str, Any]:
    """Speedup in useful tokens/s and relative difference of the held-out loss."""
    b, c = baseline.summary, candidate.summary
    return {
        "speedup": c["useful_tokens_per_s"] / b["useful_tokens_per_s"],
        "wall_speedup": (baseline.wall_s / baseline.useful_tokens) / (candidate.wall_s / candidate.useful_tokens),
        "loss_rel_diff": abs(candidate.eval_loss - baseline.eval_loss) / baseline.eval_loss,
        "train_loss_rel_diff": abs(candidate.losses[-1] - baseline.losses[-1]) / baseline.losses[-1],
    }


def outcome_figures(run: RunOutcome) -> dict[str, Any]:
    """The numbers of one run that the table, the JSON and docs/benchmarks.md show."""
    s = run.summary
    return {
        "levers": list(run.levers),
        "useful_tokens_per_s": s["useful_tokens_per_s"],
        "step_time_s": s["step_time_s"]["median"],
        "steps": len(run.losses),
        "useful_tokens": run.useful_tokens,
        "stall_fraction": s["phase_share"]["data_wait"],
        "padding_ratio": s["padding_ratio"],
        "peak_memory_bytes": s["peak_memory_bytes"],
        "final_train_loss": run.losses[-1],
        "eval_loss": run.eval_loss,
        "wall_s": run.wall_s,
        "verdict": run.document["verdict"]["bottleneck"],
    }


def setup_figures(workload: DemoWorkload) -> dict[str, Any]:
    """The workload's shape: sizes of both sides and the mixture the plan was given."""
    s = workload.setup
    return {"seq_len": s.seq_len, "baseline_rows": s.baseline_rows, "baseline_steps": s.steps,
            "packed_rows": workload.packed_rows, "packed_steps": workload.packed_steps,
            "labelled_tokens": workload.baseline_tokens, "sample_mix": s.sample_mix,
            "token_shares": workload.token_shares, **s.model}
