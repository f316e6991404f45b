"""Attention-cost balancing across simulated data-parallel ranks (no processes, pure planning).

Each step draws long-tailed documents until the global batch (``ranks x rows x seq_len``
tokens) is full, splits documents longer than a row into row-long pieces (as the loader does)
and hands the same pieces to every planner. A rank's cost is the cost model
``a * sum(L) + b * sum(L^2)`` of the transformer the bench states (``--d-model``:
``CostModel.for_transformer``), so max/mean cost is the step time over the mean step time.

Planners:

* ``thruput``: ``assign_pieces`` (LPT with exactly ``rows x seq_len`` tokens per rank, splitting a
  piece only when no rank has room for it) then ``pack_best_fit`` into the rank's rows;
* ``karmarkar_karp``: the largest differencing method (Karmarkar and Karp 1982, multi-way), the
  well-known peer for multi-way number partitioning, on the same piece costs. It does not know
  rows: a rank may get more tokens than its rows hold (``kk_max_tokens_over_capacity``), which
  only a loader without fixed row shapes (padding-free, variable tokens per rank) can use;
* ``length_grouped``: transformers' ``DistributedLengthGroupedSampler`` (what
  ``Trainer(group_by_length=True)`` uses on several ranks) over the step's pieces, an equal
  number per rank (it repeats pieces to make the count divide, as it does in training);
* ``naive``: the equal-count split of the documents in sampled order.
"""
from __future__ import annotations

import argparse
import heapq
import itertools
import time

import numpy as np
from rich.table import Table

from thruput.console import make_console
from thruput.data import CostModel
from thruput.data.balance import assign_pieces
from thruput.data.pack import pack_best_fit

DESCRIPTION = ("max/mean rank cost at 8/64/512 ranks: thruput vs Karmarkar-Karp, transformers' length-grouped "
               "sampler and an equal-count split (goal <= 1.05)")
PEERS = ("karmarkar_karp", "length_grouped", "naive")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per row")
    parser.add_argument("--rows-per-rank", type=int, default=4, help="rows per rank per step")
    parser.add_argument("--steps", type=int, default=5, help="global batches simulated per size")
    parser.add_argument("--d-model", type=int, default=1024,
                        help="model width of the cost model (CostModel.for_transformer: a = 24 d^2, b = 2 d)")


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


def piece_costs(pieces: np.ndarray, cost: CostModel) -> np.ndarray:
    lengths = pieces.astype(np.float64)
    return cost.a * lengths + cost.b * lengths * lengths


def naive_costs(lengths: np.ndarray, ranks: int, seq_len: int, cost: CostModel) -> np.ndarray:
    """Equal-count split: rank r gets documents r*n/ranks .. (r+1)*n/ranks, in sampled order."""
    return np.array([cost.cost(split_pieces(part, seq_len)) for part in np.array_split(lengths, ranks)])


def thruput_costs(pieces: np.ndarray, ranks: int, rows: int, seq_len: int, cost: CostModel) -> np.ndarray:
    per_rank = assign_pieces(pieces, ranks, rows * seq_len, cost)
    out = []
    for segments in per_rank:
        packed = pack_best_fit(segments, rows, seq_len)
        out.append(cost.cost([s[2] for row in packed for s in row]))
    return np.array(out)


def karmarkar_karp(costs: np.ndarray, k: int) -> list[list[int]]:
    """Largest differencing method for ``k`` parts: item indices per part.

    Every item starts as a partial partition with its cost in one part. Repeatedly the two
    partial partitions whose largest and smallest part differ most are merged, the largest part
    of one with the smallest of the other, and so on, until one partition is left.
    """
    # heap entries: (-difference, tiebreak, sums in decreasing order or None for a single item, parts or item)
    heap: list[tuple[float, int, np.ndarray | None, object]] = [(-float(c), i, None, i) for i, c in enumerate(costs)]
    heapq.heapify(heap)
    tiebreak = itertools.count(len(heap))

    def expand(entry: tuple) -> tuple[np.ndarray, list[list[int]]]:
        neg_diff, _, sums, parts = entry
        if sums is not None:
            return sums, parts
        single = np.zeros(k)
        single[0] = -neg_diff
        return single, [[parts]] + [[] for _ in range(k - 1)]

    while len(heap) > 1:
        a_sums, a_parts = expand(heapq.heappop(heap))
        b_sums, b_parts = expand(heapq.heappop(heap))
        sums = a_sums + b_sums[::-1]
        for j in range(k):
            a_parts[j].extend(b_parts[k - 1 - j])
        order = np.argsort(-sums, kind="stable")
        sums = sums[order] - sums[order[-1]]
        heapq.heappush(heap, (-float(sums[0]), next(tiebreak), sums, [a_parts[j] for j in order]))
    sums, parts = expand(heap[0])
    return parts


def length_grouped_ranks(pieces: np.ndarray, ranks: int, seed: int) -> list[list[int]]:
    """Piece indices per rank from transformers' ``DistributedLengthGroupedSampler``."""
    from transformers.trainer_pt_utils import DistributedLengthGroupedSampler

    per_rank = -(-len(pieces) // ranks)
    lengths = pieces.tolist()
    return [list(DistributedLengthGroupedSampler(per_rank, num_replicas=ranks, rank=r, seed=seed, lengths=lengths))
            for r in range(ranks)]


def run(args: argparse.Namespace) -> dict:
    sizes = [8, 64] if args.quick else [8, 64, 512]
    steps = 2 if args.quick else args.steps
    cost = CostModel.for_transformer(args.d_model)
    capacity = args.rows_per_rank * args.seq_len
    rng = np.random.default_rng(0)
    result: dict = {"ranks": {}, "seq_len": args.seq_len, "rows_per_rank": args.rows_per_rank, "steps": steps,
                    "cost_model": {"d_model": args.d_model, "a": cost.a, "b": cost.b}}
    planners = ("thruput", *PEERS)
    for ranks in sizes:
        ratios: dict[str, list[float]] = {p: [] for p in planners}
        plan_s: dict[str, list[float]] = {"thruput": [], "karmarkar_karp": []}
        kk_over: list[float] = []
        for step in range(steps):
            lengths = long_tailed_lengths(rng, ranks * capacity)
            pieces = split_pieces(lengths, args.seq_len)
            costs = piece_costs(pieces, cost)
            t0 = time.perf_counter()
            per_rank = {"thruput": thruput_costs(pieces, ranks, args.rows_per_rank, args.seq_len, cost)}
            plan_s["thruput"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            kk = karmarkar_karp(costs, ranks)
            plan_s["karmarkar_karp"].append(time.perf_counter() - t0)
            per_rank["karmarkar_karp"] = np.array([costs[p].sum() for p in kk])
            kk_over.append(max(int(pieces[p].sum()) for p in kk) / capacity)
            per_rank["length_grouped"] = np.array([costs[p].sum() for p in length_grouped_ranks(pieces, ranks, step)])
            per_rank["naive"] = naive_costs(lengths, ranks, args.seq_len, cost)
            for p, c in per_rank.items():
                ratios[p].append(float(c.max() / c.mean()))
        entry = {f"{p}_max_over_mean": float(np.mean(r)) for p, r in ratios.items()}
        entry.update({f"{p}_worst_step": float(np.max(r)) for p, r in ratios.items()})
        entry.update({f"{p}_plan_seconds_per_step": float(np.mean(s)) for p, s in plan_s.items()})
        entry["plan_seconds_per_step"] = entry["thruput_plan_seconds_per_step"]
        entry["kk_max_tokens_over_capacity"] = float(np.max(kk_over))
        entry["best_peer"] = min(PEERS, key=lambda p: entry[f"{p}_max_over_mean"])
        entry["thruput_ahead_of_every_peer"] = all(
            entry["thruput_max_over_mean"] <= entry[f"{p}_max_over_mean"] for p in PEERS)
        result["ranks"][str(ranks)] = entry
    _print(result, planners)
    return result


def _print(result: dict, planners: tuple[str, ...]) -> None:
    cm = result["cost_model"]
    table = Table(title=(f"rank cost max/mean over {result['steps']} steps (seq_len {result['seq_len']}, "
                         f"{result['rows_per_rank']} rows/rank, cost model d_model {cm['d_model']})"))
    table.add_column("ranks", justify="right")
    table.add_column("planner")
    for col in ("max/mean", "worst step", "/ thruput", "plan ms/step", "max tokens / rows"):
        table.add_column(col, justify="right")
    for ranks, entry in result["ranks"].items():
        order = [entry["best_peer"], "thruput", *[p for p in planners if p not in (entry["best_peer"], "thruput")]]
        for p in order:
            plan = entry.get(f"{p}_plan_seconds_per_step")
            table.add_row(ranks, p, f"{entry[f'{p}_max_over_mean']:.4f}", f"{entry[f'{p}_worst_step']:.4f}",
                          f"{entry[f'{p}_max_over_mean'] / entry['thruput_max_over_mean']:.3f}",
                          "-" if plan is None else f"{1e3 * plan:.0f}",
                          f"{entry['kk_max_tokens_over_capacity']:.2f}" if p == "karmarkar_karp" else
                          ("1.00" if p == "thruput" else "-"))
    make_console().print(table)
