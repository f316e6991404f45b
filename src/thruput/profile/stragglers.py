"""The straggler verdict of a job: which rank is slow, by how much, in which phase, and why.

A rank's *work* in a step is its time before the step's last collective less the waits inside
earlier ones (``job.step_work``): what a slow rank has more of, and a rank that waits for it
does not (its extra time is in ``comm_wait``). In each step every rank's work is divided by the
median work of the *other* ranks (with two ranks, the other one: a median that includes the
slow rank would halve the signal). A rank is slow in a step when that ratio is at least
``STRAGGLER_RATIO`` and the excess at least ``STRAGGLER_SHARE`` of the step time; it is a
straggler when it is slow in at least ``STRAGGLER_STEPS`` of the compared steps, and in at least
``STRAGGLER_MIN_STEPS``.

For each straggler the finding names the ratio and the excess (medians over its slow steps),
the phase with the largest excess over the other ranks, and the cause from the evidence:

* its clock: throttled share ``THROTTLED_SHARE`` above the others', or a mean clock below
  ``CLOCK_DROP`` of theirs (DVFS, power or thermal) -> lever ``cooling``;
* its data wait (the phase is ``data_wait``: its loader) -> ``data_workers``;
* its work: ``WORK_RATIO`` more tokens than the others (imbalanced work) -> ``balance``;
* none of them (the same work at the same clock, computed slower) -> ``slow_device``.

Two or more of the first three at once are reported as conflicting, each named.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable

from thruput.profile.job import clock_of, step_work
from thruput.profile.steps import PHASES
from thruput.profile.verdict import Finding, Verdict, _finding

STRAGGLER_RATIO = 1.2    # a rank's work over the median of the others' in one step
STRAGGLER_SHARE = 0.10   # the excess as a share of the step time, so microsecond noise is no straggler
STRAGGLER_STEPS = 0.25   # share of the compared steps a rank must be slow in,
STRAGGLER_MIN_STEPS = 2  # and at least this many: one descheduled step is noise, not a straggler
THROTTLED_SHARE = 0.10   # throttled share above the other ranks'
CLOCK_DROP = 0.90        # mean clock below this fraction of the other ranks'
WORK_RATIO = 1.05        # tokens over the other ranks' median: imbalanced work

# The phases a slow rank can be slow in; ``comm`` holds waits, not a rank's own work.
WORK_PHASES = tuple(p for p in PHASES if p != "comm")

Steps = dict[int, dict[int, dict[str, Any]]]  # rank -> step index -> step


def _others(values: dict[int, float], rank: int) -> float:
    return statistics.median(v for r, v in values.items() if r != rank)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _clock_evidence(rank: int, slow: list[int], measured: Steps) -> dict[str, Any]:
    """Clock and throttle share of ``rank`` against the other ranks over its slow steps."""
    mine = [clock_of(measured[rank][s]) for s in slow]
    theirs = [clock_of(measured[r][s]) for r in measured if r != rank for s in slow]
    mhz, others_mhz = _mean([c[0] for c in mine if c[0]]), _mean([c[0] for c in theirs if c[0]])
    share, others_share = _mean([c[1] for c in mine if c[1] is not None]), _mean(
        [c[1] for c in theirs if c[1] is not None])
    dropped = (mhz is not None and others_mhz is not None and mhz < CLOCK_DROP * others_mhz) or (
        share is not None and others_share is not None and share - others_share >= THROTTLED_SHARE)
    return {"clock_mhz": mhz, "others_clock_mhz": others_mhz, "throttled_share": share,
            "others_throttled_share": others_share, "clock_dropped": bool(dropped)}


def _straggler(rank: int, slow: list[int], ratios: dict[int, float], excess: dict[int, float],
               measured: Steps, compared: int) -> Finding:
    others = [r for r in measured if r != rank]
    phase_excess = {p: statistics.median(
        measured[rank][s]["phases"].get(p, 0.0) - statistics.median(measured[r][s]["phases"].get(p, 0.0)
                                                                    for r in others) for s in slow)
        for p in WORK_PHASES}
    phase = max(phase_excess, key=phase_excess.get)
    tokens = statistics.median(measured[rank][s]["tokens"] for s in slow)
    others_tokens = statistics.median(measured[r][s]["tokens"] for r in others for s in slow)
    tokens_ratio = tokens / others_tokens if others_tokens else 1.0
    waits = [measured[r][s].get("comm_wait") for r in others for s in slow]
    evidence: dict[str, Any] = {
        "rank": rank, "ratio": statistics.median(ratios[s] for s in slow),
        "excess_s": statistics.median(excess[s] for s in slow), "phase": phase,
        "phase_excess_s": phase_excess[phase], "slow_steps": slow, "slow_steps_share": len(slow) / compared,
        "others_comm_wait_s": _mean([w for w in waits if w is not None]), "tokens_ratio": tokens_ratio,
        **_clock_evidence(rank, slow, measured),
    }
    causes = []
    if evidence["clock_dropped"]:
        causes.append(("clock", "cooling"))
    if phase == "data_wait":
        causes.append(("data wait", "data_workers"))
    if tokens_ratio >= WORK_RATIO:
        causes.append(("imbalanced work", "balance"))
    if not causes:
        causes.append(("slow device", "slow_device"))
    evidence["cause"] = "conflicting: " + " vs ".join(c for c, _ in causes) if len(causes) > 1 else causes[0][0]
    step_time = statistics.median(max(measured[r][s]["time_s"] for r in measured) for s in slow)
    return _finding(f"straggler: rank {rank}", evidence["excess_s"] / step_time if step_time else 0.0,
                    evidence, [lever for _, lever in causes])


def stragglers(job: dict[str, Any], measured: Steps) -> list[Finding]:
    """One finding per straggling rank (see the module docstring), strongest first."""
    ranks, steps = job["ranks"], job["steps"]
    ratios: dict[int, dict[int, float]] = {r: {} for r in ranks}
    excess: dict[int, dict[int, float]] = {r: {} for r in ranks}
    slow: dict[int, list[int]] = {r: [] for r in ranks}
    for s in steps:
        work = {r: step_work(measured[r][s]) for r in ranks}
        step_time = max(measured[r][s]["time_s"] for r in ranks)
        for r in ranks:
            base = _others(work, r)
            ratios[r][s] = work[r] / base if base > 0 else float("inf")
            excess[r][s] = work[r] - base
            if ratios[r][s] >= STRAGGLER_RATIO and excess[r][s] >= STRAGGLER_SHARE * step_time:
                slow[r].append(s)
    found = [_straggler(r, slow[r], ratios[r], excess[r], measured, len(steps))
             for r in ranks if len(slow[r]) >= max(STRAGGLER_MIN_STEPS, STRAGGLER_STEPS * len(steps))]
    return sorted(found, key=lambda f: f.score, reverse=True)


JOB_RULES: list[Callable[[dict[str, Any], Steps], list[Finding]]] = [stragglers]


def job_verdict(job: dict[str, Any], measured: Steps) -> Verdict:
    """The job's verdict: "straggler" (one finding per slow rank), "conflicting" when a
    straggler's evidence points at more than one cause, "balanced", or "unknown" with one rank."""
    if len(job["ranks"]) < 2:
        return Verdict("unknown", [Finding("one rank present: no other rank to compare with", 0.0,
                                           {"ranks": job["ranks"], "missing_ranks": job["missing_ranks"]},
                                           "merge the other ranks' documents")])
    findings = [f for rule in JOB_RULES for f in rule(job, measured)]
    if not findings:
        spread = [s["spread_s"] for s in job["spread"]]
        evidence = {"ranks": len(job["ranks"]), "median_spread_s": statistics.median(spread) if spread else 0.0}
        return Verdict("balanced", [Finding("no straggler", 0.0, evidence, "none needed")])
    conflicting = any(f.evidence["cause"].startswith("conflicting") for f in findings)
    return Verdict("conflicting" if conflicting else "straggler", findings)

