"""The autoscaling rule of the process and Ray backends: loaders per source within a CPU budget."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pool_sizes(cost_per_token: Sequence[float], demand: Sequence[float], budget: int, lo: int, hi: int) -> list[int]:
    """Loaders per source: shares of ``budget`` proportional to cost per token x tokens consumed.

    ``cost_per_token``: measured preprocessing CPU seconds per token of each source (0 while
    unmeasured); ``demand``: tokens consumed from it. Each count is clamped to ``[lo, hi]``;
    raising cheap sources to ``lo`` can overdraw the budget, which is taken back from the
    largest pools; leftover CPUs go to the largest fractional shares. The total stays within
    ``budget`` unless ``lo`` per source alone exceeds it. Without measurements every source
    gets ``lo``.
    """
    work = np.asarray(cost_per_token, dtype=float) * np.maximum(np.asarray(demand, dtype=float), 1.0)
    if work.size == 0 or work.sum() <= 0:
        return [lo] * len(work)
    share = work / work.sum() * budget
    counts = np.clip(np.floor(share), lo, hi).astype(int)
    while counts.sum() > budget and (counts > lo).any():
        counts[int(np.argmax(np.where(counts > lo, counts, -1)))] -= 1
    spare = budget - int(counts.sum())
    for i in np.argsort(-(share - np.floor(share)), kind="stable"):
        if spare <= 0:
            break
        if counts[i] < hi and share[i] > counts[i]:
            counts[i] += 1
            spare -= 1
    return counts.tolist()


def in_flight(prefetch_chunks: int, loaders: int) -> int:
    """Tasks kept in flight for one source: ``prefetch_chunks``, and at least two per loader."""
    return max(prefetch_chunks, 2 * loaders)
