"""Weight schedules and the per-step token quotas they imply.

A weight is a number or a ``step -> float`` callable. The helpers here build the usual ones;
any callable works. All are pure functions of the step, so a resumed run sees the same weights.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from thruput.data.errors import DataError

Weight = float | Callable[[int], float]


@dataclass(frozen=True)
class Constant:
    """The same weight at every step."""

    value: float

    def __call__(self, step: int) -> float:
        return self.value


@dataclass(frozen=True)
class Linear:
    """``start`` until step ``begin``, then linear to ``end`` at step ``begin + steps``, then ``end``."""

    start: float
    end: float
    steps: int
    begin: int = 0

    def __call__(self, step: int) -> float:
        t = min(max((step - self.begin) / max(self.steps, 1), 0.0), 1.0)
        return self.start + (self.end - self.start) * t


@dataclass(frozen=True)
class Cosine:
    """Half-cosine from ``start`` at step ``begin`` to ``end`` at ``begin + steps``, then ``end``."""

    start: float
    end: float
    steps: int
    begin: int = 0

    def __call__(self, step: int) -> float:
        t = min(max((step - self.begin) / max(self.steps, 1), 0.0), 1.0)
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Piecewise:
    """Piecewise constant: ``points`` are ``(first_step, weight)``; before the first point, the first weight."""

    points: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise DataError("piecewise schedule needs at least one (step, weight) point")
        steps = [p[0] for p in self.points]
        if steps != sorted(steps) or len(set(steps)) != len(steps):
            raise DataError(f"piecewise schedule steps must be strictly increasing, got {steps}")

    def __call__(self, step: int) -> float:
        steps = [p[0] for p in self.points]
        i = max(int(np.searchsorted(steps, step, side="right")) - 1, 0)
        return self.points[i][1]


def constant(value: float) -> Constant:
    return Constant(float(value))


def linear(start: float, end: float, steps: int, begin: int = 0) -> Linear:
    return Linear(float(start), float(end), int(steps), int(begin))


def cosine(start: float, end: float, steps: int, begin: int = 0) -> Cosine:
    return Cosine(float(start), float(end), int(steps), int(begin))


def piecewise(points: Mapping[int, float] | Sequence[tuple[int, float]]) -> Piecewise:
    items = sorted(points.items()) if isinstance(points, Mapping) else list(points)
    return Piecewise(tuple((int(s), float(w)) for s, w in items))


def weight_at(weight: Weight, step: int) -> float:
    return float(weight(step)) if callable(weight) else float(weight)


def normalized_weights(names: Sequence[str], raw: Sequence[float], step: int) -> np.ndarray:
    """Weights as probabilities; ``DataError`` on a negative or non-finite weight or a zero sum."""
    w = np.asarray(raw, dtype=np.float64)
    for name, value in zip(names, w):
        if not math.isfinite(value) or value < 0:
            raise DataError(f"source '{name}': weight at step {step} is {value}; weights must be finite and >= 0")
    total = w.sum()
    if total <= 0:
        raise DataError(f"weights at step {step} sum to zero (sources: {', '.join(names)})")
    return w / total


def quotas(weights: np.ndarray, total: int, seed: int, step: int) -> np.ndarray:
    """Split ``total`` units among sources in proportion to ``weights`` (which sum to 1).

    Each source gets ``floor(w * total)`` plus 0 or 1 more; the leftover units go by systematic
    sampling seeded by (seed, step), so each source's expected share is exactly ``w * total``.
    """
    exact = weights * total
    base = np.floor(exact).astype(np.int64)
    leftover = int(total - base.sum())
    if leftover:
        u = np.random.Generator(np.random.PCG64([seed, step, 0x51F7])).random()
        cum = np.cumsum(exact - base)
        hits = np.ceil(cum - u) - np.ceil(np.concatenate([[0.0], cum[:-1]]) - u)
        base += hits.astype(np.int64)
        # Float rounding can leave the cumulative sum a hair off an integer; fix the count.
        diff = int(total - base.sum())
        if diff:
            base[int(np.argmax(exact - np.floor(exact)))] += diff
    return base
