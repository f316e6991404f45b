"""The verdict: which bottleneck the numbers point at, and which thruput lever to pull.

Rules run in a fixed order over a profiler summary. Each rule that fires yields a Finding with
the numbers behind it. One finding is the verdict; several that point at different levers are
reported as conflicting, all of them listed, strongest first. If no limiting rule fires the
run is compute-bound, which is where a training run should be.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

# Thresholds, as shares of step time unless stated otherwise.
DATA_SHARE = 0.10
COMM_SHARE = 0.15
OPTIMIZER_SHARE = 0.25
TRANSFER_SHARE = 0.15
HOST_SHARE = 0.20
THROTTLED_SHARE = 0.10
CLOCK_CORRELATION = 0.5
MEMORY_FRACTION = 0.90


@dataclass
class Finding:
    """One bottleneck signal: its name, how strong (0..1, share of step time it explains),
    the evidence, and the lever to pull."""

    bottleneck: str
    score: float
    evidence: dict[str, Any]
    lever: str


@dataclass
class Verdict:
    """``bottleneck`` is a finding's name, or "conflicting" when several disagree."""

    bottleneck: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def conflicting(self) -> bool:
        return self.bottleneck == "conflicting"

    @property
    def lever(self) -> str:
        return " / ".join(f.lever for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {"bottleneck": self.bottleneck, "conflicting": self.conflicting,
                "findings": [asdict(f) for f in self.findings]}

    def headline(self) -> str:
        if not self.findings:
            return "no measured steps"
        if self.conflicting:
            names = ", ".join(f.bottleneck for f in self.findings)
            return f"conflicting signals: {names}"
        f = self.findings[0]
        return f"{f.bottleneck}: {f.lever}"


def _share(summary: dict, phase: str) -> float:
    return summary["phase_share"].get(phase, 0.0)


def _data(summary: dict) -> Finding | None:
    share = _share(summary, "data_wait")
    if share < DATA_SHARE:
        return None
    return Finding("data-bound", share, {"data_wait_share": share},
                   "thruput.data: more source-loader workers and deeper prefetch; packing removes padding")


def _comm(summary: dict) -> Finding | None:
    share = _share(summary, "comm")
    if share < COMM_SHARE:
        return None
    return Finding("communication-bound", share, {"comm_share": share},
                   "thruput.comm/kernels: overlap gradient buckets with backward; larger buckets")


def _optimizer(summary: dict) -> Finding | None:
    share = _share(summary, "optimizer")
    if share < OPTIMIZER_SHARE:
        return None
    return Finding("optimizer-bound", share, {"optimizer_share": share},
                   "thruput.memory: fused CPU Adam, low-precision states, delayed parameter update")


def _transfer(summary: dict) -> Finding | None:
    share = _share(summary, "h2d")
    if share < TRANSFER_SHARE:
        return None
    return Finding("host/launch-bound", share, {"h2d_share": share},
                   "pinned memory and non-blocking copies (thruput.data.Loader); overlap offload copies per bucket")


def _host(summary: dict) -> Finding | None:
    share = _share(summary, "other")
    if share < HOST_SHARE:
        return None
    return Finding("host/launch-bound", share, {"other_share": share},
                   "thruput.kernels.compile: fewer kernel launches and less Python per step")


def _clock(summary: dict) -> Finding | None:
    best: Finding | None = None
    for name, c in (summary.get("clocks") or {}).items():
        if not c.get("available") or not c.get("samples"):
            continue
        corr = c.get("corr_step_time_inv_clock")
        dropped = c.get("dropped_steps", [])
        throttled = c.get("throttled_share", 0.0)
        correlated = corr is not None and corr >= CLOCK_CORRELATION and dropped
        if throttled < THROTTLED_SHARE and not correlated:
            continue
        steps = max(1, summary["steps"])
        score = max(throttled, len(dropped) / steps)
        finding = Finding(
            "clock/throttle-bound", score,
            {"source": name, "throttled_share": throttled, "reasons": c.get("reasons", []),
             "dropped_steps": dropped, "corr_step_time_inv_clock": corr,
             "mean_mhz": c.get("mean_mhz"), "max_mhz": c.get("max_mhz")},
            "cooling, power limits or clock settings (nvidia-smi -q -d PERFORMANCE); "
            "the dropped steps are listed",
        )
        if best is None or finding.score > best.score:
            best = finding
    return best


def _memory(summary: dict) -> Finding | None:
    capacity = summary.get("memory_capacity_bytes")
    peak = summary.get("peak_memory_bytes")
    if not capacity or not peak or peak < MEMORY_FRACTION * capacity:
        return None
    fraction = peak / capacity
    return Finding("memory-bound", fraction, {"peak_memory_bytes": peak, "capacity_bytes": capacity},
                   "thruput.memory: OffloadAdamW (2 B/param on device), activation checkpointing; "
                   "thruput.kernels.linear_cross_entropy (no full logits)")


RULES: list[Callable[[dict], Finding | None]] = [
    _data, _comm, _optimizer, _transfer, _host, _clock, _memory,
]


def verdict(summary: dict) -> Verdict:
    """Apply the rules to a ``StepProfiler.summary()`` (optionally with
    ``memory_capacity_bytes`` added) and name the bottleneck."""
    if not summary.get("steps"):
        return Verdict("unknown")
    findings: list[Finding] = []
    for rule in RULES:
        finding = rule(summary)
        if finding is not None and all(f.bottleneck != finding.bottleneck for f in findings):
            findings.append(finding)
    findings.sort(key=lambda f: f.score, reverse=True)
    if not findings:
        compute = _share(summary, "forward") + _share(summary, "backward")
        lever = "thruput.kernels: fused linear cross-entropy and compile; a larger batch raises MFU"
        evidence = {"forward_backward_share": compute, "mfu": summary.get("mfu")}
        return Verdict("compute-bound", [Finding("compute-bound", compute, evidence, lever)])
    if len(findings) == 1:
        return Verdict(findings[0].bottleneck, findings)
    return Verdict("conflicting", findings)
