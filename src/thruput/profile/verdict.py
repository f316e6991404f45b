"""The verdict: which bottleneck the numbers point at, and which thruput lever to pull.

Rules run in a fixed order over a profiler summary. Each rule that fires yields a Finding with
the numbers behind it and the levers (names in ``LEVERS``) that address it. One finding is the
verdict; several that point at different levers are reported as conflicting, all of them listed,
strongest first. If no limiting rule fires the run is compute-bound, which is where a training
run should be.

Levers already on are not recommended: ``verdict(summary, levers_on=...)`` takes their names,
and ``run_document`` passes ``meta["levers"]`` (``thruput train`` declares the ones its config
turns on; a loop of one's own may set ``prof.meta["levers"]``).
"""
from __future__ import annotations

from collections.abc import Iterable
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
PADDING_RATIO = 0.10  # share of the positions fed to the model that are padding

# Lever name -> what to do. The names are what ``levers_on`` / ``meta["levers"]`` hold.
LEVERS = {
    "data_workers": "thruput.data: more source-loader workers (data.workers) and deeper prefetch",
    "packing": "thruput.data packing (data.pack = true): whole documents fill each row instead of padding",
    "comm_overlap": "thruput.comm.GradientBuckets: all-reduce gradient buckets during backward",
    "larger_buckets": "larger gradient buckets: fewer, bigger collectives",
    "offload": "thruput.memory.OffloadAdamW (optimizer.kind = 'offload_adamw'): the fused SIMD CPU Adam, "
               "states in host memory (2 B/param on the device)",
    "low_precision_states": "bf16 or int8 Adam states (optimizer.state_dtype)",
    "delayed_update": "delayed parameter update: the CPU step overlaps the next step (optimizer.delayed_update_after)",
    "pinned_memory": "pinned memory and non-blocking copies (thruput.data.Loader); offload copies overlapped "
                     "per bucket",
    "compile": "thruput.kernels.compile (kernels.compile): fewer kernel launches, less Python per step",
    "larger_batch": "a larger batch per step (data.batch_size): per-step overhead amortised, higher MFU",
    "fused_cross_entropy": "thruput.kernels.linear_cross_entropy (kernels.fused_cross_entropy): no full logits",
    "activation_checkpointing": "activation checkpointing: keep each layer's input, recompute the rest",
    "cooling": "cooling, power limits or clock settings (nvidia-smi -q -d PERFORMANCE); the dropped steps are listed",
    "balance": "thruput.data.Loader(plan, rank=, world_size=): rows assigned to ranks by attention cost "
               "(thruput.data.balance; calibrate its cost model on this hardware)",
    "slow_device": "inspect or replace the slow rank's device or host (same work at the same clock, computed "
                   "slower: nvidia-smi -q, dcgmi diag, its CPU load)",
}


@dataclass
class Finding:
    """One bottleneck signal: its name, how strong (0..1, share of step time it explains), the
    evidence, the advice (``lever``, from the names in ``levers`` that are not on), and the
    levers that would address it but are on already (``already_on``)."""

    bottleneck: str
    score: float
    evidence: dict[str, Any]
    lever: str
    levers: list[str] = field(default_factory=list)
    already_on: list[str] = field(default_factory=list)


def _finding(bottleneck: str, score: float, evidence: dict[str, Any], levers: list[str]) -> Finding:
    return Finding(bottleneck, score, evidence, "; ".join(LEVERS[name] for name in levers), list(levers))


def _without(finding: Finding, on: frozenset[str]) -> Finding:
    """``finding`` with the levers in ``on`` moved to ``already_on``."""
    todo = [name for name in finding.levers if name not in on]
    done = [name for name in finding.levers if name in on]
    lever = ("; ".join(LEVERS[name] for name in todo) if todo
             else f"no further thruput lever: {', '.join(done)} already on")
    return Finding(finding.bottleneck, finding.score, finding.evidence, lever, todo, done)


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
    return _finding("data-bound", share, {"data_wait_share": share}, ["data_workers"])


def _padding(summary: dict) -> Finding | None:
    ratio = summary.get("padding_ratio") or 0.0
    if ratio < PADDING_RATIO:
        return None
    return _finding("padding-bound", ratio, {"padding_ratio": ratio}, ["packing"])


def _comm(summary: dict) -> Finding | None:
    share = _share(summary, "comm")
    if share < COMM_SHARE:
        return None
    return _finding("communication-bound", share, {"comm_share": share}, ["comm_overlap", "larger_buckets"])


def _optimizer(summary: dict) -> Finding | None:
    share = _share(summary, "optimizer")
    if share < OPTIMIZER_SHARE:
        return None
    return _finding("optimizer-bound", share, {"optimizer_share": share},
                    ["offload", "low_precision_states", "delayed_update"])


def _transfer(summary: dict) -> Finding | None:
    share = _share(summary, "h2d")
    if share < TRANSFER_SHARE:
        return None
    return _finding("host/launch-bound", share, {"h2d_share": share}, ["pinned_memory"])


def _host(summary: dict) -> Finding | None:
    share = _share(summary, "other")
    if share < HOST_SHARE:
        return None
    return _finding("host/launch-bound", share, {"other_share": share}, ["compile", "larger_batch"])


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
        finding = _finding(
            "clock/throttle-bound", score,
            {"source": name, "throttled_share": throttled, "reasons": c.get("reasons", []),
             "dropped_steps": dropped, "corr_step_time_inv_clock": corr,
             "mean_mhz": c.get("mean_mhz"), "max_mhz": c.get("max_mhz")},
            ["cooling"])
        if best is None or finding.score > best.score:
            best = finding
    return best


def _memory(summary: dict) -> Finding | None:
    capacity = summary.get("memory_capacity_bytes")
    peak = summary.get("peak_memory_bytes")
    if not capacity or not peak or peak < MEMORY_FRACTION * capacity:
        return None
    fraction = peak / capacity
    return _finding("memory-bound", fraction, {"peak_memory_bytes": peak, "capacity_bytes": capacity},
                    ["offload", "activation_checkpointing", "fused_cross_entropy"])


RULES: list[Callable[[dict], Finding | None]] = [
    _data, _padding, _comm, _optimizer, _transfer, _host, _clock, _memory,
]


def verdict(summary: dict, levers_on: Iterable[str] = ()) -> Verdict:
    """Apply the rules to a ``StepProfiler.summary()`` (optionally with
    ``memory_capacity_bytes`` added) and name the bottleneck. ``levers_on``: names from
    ``LEVERS`` the run has on already, which are then not recommended (other names match no
    lever and change nothing)."""
    on = frozenset(levers_on)
    if not summary.get("steps"):
        return Verdict("unknown")
    findings: list[Finding] = []
    for rule in RULES:
        finding = rule(summary)
        if finding is not None and all(f.bottleneck != finding.bottleneck for f in findings):
            findings.append(_without(finding, on))
    findings.sort(key=lambda f: f.score, reverse=True)
    if not findings:
        compute = _share(summary, "forward") + _share(summary, "backward")
        evidence = {"forward_backward_share": compute, "mfu": summary.get("mfu")}
        finding = _finding("compute-bound", compute, evidence, ["fused_cross_entropy", "compile", "larger_batch"])
        return Verdict("compute-bound", [_without(finding, on)])
    if len(findings) == 1:
        return Verdict(findings[0].bottleneck, findings)
    return Verdict("conflicting", findings)
