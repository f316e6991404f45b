"""Statistics over a run's step records: padding share, quantiles, clock summaries."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from thruput.profile.clocks import ClockSampler
    from thruput.profile.steps import StepRecord


def clock_summary(records: list[StepRecord], clocks: ClockSampler) -> dict[str, Any]:
    """Per clock source over the steps: mean clock, throttled share and reasons, the steps whose
    mean clock dropped below 90% of the run's highest, and the Pearson correlation of step
    time with 1/clock (near +1: the clock explains the step-time variation)."""
    out: dict[str, Any] = {}
    for name, info in clocks.sources_info().items():
        if not info["available"]:
            out[name] = {"available": False, "detail": info["detail"]}
            continue
        key = f"mean_{info['clock_metric']}"
        pairs = [(r, r.clock[name][key]) for r in records if name in r.clock and key in r.clock[name]]
        if not pairs:
            out[name] = {"available": True, "detail": info["detail"], "samples": 0}
            continue
        clocks_mhz = [c for _, c in pairs]
        top = max(clocks_mhz)
        shares = [r.clock[name]["throttled_share"] for r, _ in pairs]
        out[name] = {
            "available": True,
            "detail": info["detail"],
            "samples": sum(r.clock[name]["samples"] for r, _ in pairs),
            "mean_mhz": sum(clocks_mhz) / len(clocks_mhz),
            "max_mhz": top,
            "throttled_share": sum(shares) / len(shares),
            "reasons": sorted({x for r, _ in pairs for x in r.clock[name]["reasons"]}),
            "dropped_steps": [r.step for r, c in pairs if c < 0.9 * top],
            "corr_step_time_inv_clock": pearson([r.time_s for r, _ in pairs], [1 / c for c in clocks_mhz]),
        }
    return out


def padding_ratio(records: list[StepRecord]) -> float:
    """Share of the positions fed to the model that are padding (exact for exact ratios: the
    difference is taken in integers)."""
    tokens = sum(r.tokens for r in records)
    return (tokens - sum(r.useful_tokens for r in records)) / max(1, tokens)


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values``, interpolated linearly between neighbours."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation of ``xs`` and ``ys``; None for fewer than 3 points or a constant series."""
    if len(xs) < 3 or max(xs) == min(xs) or max(ys) - min(ys) <= 1e-12 * abs(max(ys)):
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sxx * syy) ** 0.5
