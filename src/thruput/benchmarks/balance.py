"""Attention-cost balancing across simulated data-parallel ranks (no processes, pure planning)."""
from __future__ import annotations

import argparse
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from thruput.data import CostModel, assign_pieces
from thruput.data.pack import pack_best_fit

DESCRIPTION = "max/mean rank cost for 8, 64, 512 ranks: thruput LPT vs equal-count split (goal <= 1.05)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per row")
    parser.add_argument("--rows-per-rank", type=int, default=4, help="rows per rank per step")
    parser.add_argument("--steps", type=int, default=5, help="global batches simulated per size")
    parser.add_argument("--d-model", type=int, default=1024, help="model width for the cost model a*L + b*L^2")


def long_tailed_lengths(rng: np.random.Generator, tokens: int) -> np.ndarray:
    """Document lengths (lognormal body, Pareto tail, 16..64K tokens) until ``tokens`` are drawn."""
    out, total = [], 0
    while total < tokens:
        body = rng.lognormal(mean=5.5, sigma=1.0, size=4096)
        tail = (rng.pareto(1.1, size=4096) + 1) * 2000
        draw = np.where(rng.random(4096) < 0.05, tail, body).clip(16, 65536).astype(np.int64)
        out.append(draw)
        total += int(draw.sum())
    lengths = np.concatenate(out)
    keep = int(np.searchsorted(np.cumsum(lengths), tokens))
    lengths = lengths[: keep + 1].copy()
    lengths[-1] -= int(lengths.sum()) - tokens  # cut the last document so the batch is exact
    return lengths[lengths > 0]


def split_pieces(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Documents longer than a row become row-long pieces plus a remainder (as the loader does)."""
    full, rest = np.divmod(lengths, seq_len)
    return np.concatenate([np.repeat(seq_len, int(full.sum())), rest[rest > 0]]).astype(np.int64)


def naive_costs(lengths: np.ndarray, ranks: int, seq_len: int, cost: CostModel) -> np.ndarray:
    """Equal-count split: rank r gets documents r*n/ranks .. (r+1)*n/ranks, in sampled order."""
    return np.array([cost.cost(split_pieces(part, seq_len)) for part in np.array_split(lengths, ranks)])


def thruput_costs(lengths: np.ndarray, ranks: int, rows: int, seq_len: int, cost: CostModel) -> np.ndarray:
    pieces = split_pieces(lengths, seq_len)
    per_rank = assign_pieces(pieces, ranks, rows * seq_len, cost)
    out = []
    for segments in per_rank:
        packed = pack_best_fit(segments, rows, seq_len)
        out.append(cost.cost([s[2] for row in packed for s in row]))
    return np.array(out)


def run(args: argparse.Namespace) -> dict:
    sizes = [8, 64] if args.quick else [8, 64, 512]
    steps = 2 if args.quick else args.steps
    cost = CostModel.for_transformer(args.d_model)
    rng = np.random.default_rng(0)
    result: dict = {"ranks": {}, "seq_len": args.seq_len, "rows_per_rank": args.rows_per_rank, "steps": steps}
    table = Table(title=f"rank cost max/mean over {steps} steps (seq_len {args.seq_len}, {args.rows_per_rank} rows/rank)")
    for col in ("ranks", "thruput max/mean", "naive max/mean", "naive / thruput", "plan ms/step"):
        table.add_column(col, justify="right")
    for ranks in sizes:
        ours, naive, plan_s = [], [], []
        for _ in range(steps):
            lengths = long_tailed_lengths(rng, ranks * args.rows_per_rank * args.seq_len)
            t0 = time.perf_counter()
            c = thruput_costs(lengths, ranks, args.rows_per_rank, args.seq_len, cost)
            plan_s.append(time.perf_counter() - t0)
            ours.append(c.max() / c.mean())
            n = naive_costs(lengths, ranks, args.seq_len, cost)
            naive.append(n.max() / n.mean())
        entry = {
            "thruput_max_over_mean": float(np.mean(ours)),
            "naive_max_over_mean": float(np.mean(naive)),
            "thruput_worst_step": float(np.max(ours)),
            "plan_seconds_per_step": float(np.mean(plan_s)),
        }
        result["ranks"][str(ranks)] = entry
        table.add_row(
            str(ranks),
            f"{entry['thruput_max_over_mean']:.4f}",
            f"{entry['naive_max_over_mean']:.3f}",
            f"{entry['naive_max_over_mean'] / entry['thruput_max_over_mean']:.2f}x",
            f"{1e3 * entry['plan_seconds_per_step']:.0f}",
        )
    Console().print(table)
    return result
