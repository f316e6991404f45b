"""Stragglers found and named: a slowdown planted on one rank of a CPU job under torchrun (gloo).

One torchrun launch per world size (2 and 4 ranks) runs every case in one process group
(``_stragglers_workload``): ``clean`` (nothing planted), ``sleep`` (extra seconds in the slow
rank's forward in some steps), ``clock`` (the same while its clock source reports a frequency
drop) and ``data`` (the extra seconds in its loader). Each case's rank documents are merged
with ``thruput.profile.job`` as ``thruput report DIR/`` does, and the verdict is checked: the
planted rank, the planted phase (forward, forward, data_wait) and the cause (slow device,
clock, data wait) named, no other rank named, nothing on the clean run.

The peer is the per-rank view, each rank's own report: its step time, which collectives make
equal on every rank (``per_rank_step_time_ratio``, the slow rank's median step time over the
others': about 1), so it cannot tell which rank is slow.

``overhead_ratio`` (2 ranks): median step time with the per-rank recorder over without it
(``StepProfiler(collectives=True/False)``), steps interleaved in the same launch (the arm that
goes first alternates per pair), on a model with no sleep; the median over rounds of the
per-round ratio, of wall time (``overhead_ratio``) and of process CPU time (``overhead_cpu_ratio``, the
steadier on a shared machine: being descheduled adds wall time, not CPU time). Goal <= 1.01.
``recorder_us_per_step`` is the recorder's own cost, measured in-process on empty spans.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.table import Table

from thruput.benchmarks import _stragglers_workload as workload
from thruput.console import make_console
from thruput.profile import StepProfiler
from thruput.profile.collectives import collective
from thruput.profile.job import load_job, step_work

DESCRIPTION = ("stragglers across CPU ranks under torchrun: a planted slow rank (sleep, clock drop, data wait) "
               "named with its phase and cause; false positives on a clean run; recorder overhead (goal <= 1.01)")

# case -> (phase, cause) the verdict must name for the planted rank
EXPECTED = {"sleep": ("forward", "slow device"), "clock": ("forward", "clock"), "data": ("data_wait", "data wait")}
LAUNCH_TIMEOUT_S = 600
COLLECTIVES_PER_STEP = 2  # the workload's: the loss all-reduce and one gradient bucket


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=12, help="steps per case (the first is warm-up)")
    parser.add_argument("--extra", type=float, default=0.2, help="planted seconds")
    parser.add_argument("--base", type=float, default=0.05, help="seconds of every rank's forward")
    parser.add_argument("--overhead-rounds", type=int, default=20)
    parser.add_argument("--steps-per-round", type=int, default=10)
    parser.add_argument("--keep", metavar="DIR", help="keep the rank documents in DIR/worldN/CASE/ "
                                                      "(thruput report DIR/world2/sleep renders one)")


def launch(world: int, out: Path, argv: list[str], timeout_s: float = LAUNCH_TIMEOUT_S) -> None:
    """Run the workload on ``world`` CPU ranks under torchrun; a failure or a timeout (the
    launcher's process group is killed) is a RuntimeError with the output's tail."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           workload.__file__, "--out", str(out), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RuntimeError(f"torchrun with {world} ranks ran past {timeout_s} s: {output[-2000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun with {world} ranks failed ({proc.returncode}): {output[-2000:]}")


def judge(job: dict, case: str, slow_rank: int, extra: float) -> dict:
    """The figures of one case: who was named, whether it is the planted rank, phase and cause."""
    findings = [f for f in job["verdict"]["findings"] if "rank" in f["evidence"]]
    named = sorted(f["evidence"]["rank"] for f in findings)
    row: dict = {"verdict": job["verdict"]["bottleneck"], "named_ranks": named}
    docs = job["documents"]
    times = {r: statistics.median(s["time_s"] for s in docs[r]["steps"][1:]) for r in job["ranks"]}
    row["per_rank_step_time_ratio"] = times[slow_rank] / statistics.median(
        t for r, t in times.items() if r != slow_rank)
    if case == "clean":
        row["found"] = not named
        return row
    planted = next((f for f in findings if f["evidence"]["rank"] == slow_rank), None)
    phase, cause = EXPECTED[case]
    row["found"] = (planted is not None and named == [slow_rank] and planted["evidence"]["phase"] == phase
                    and planted["evidence"]["cause"] == cause)
    if planted is not None:
        e = planted["evidence"]
        others = statistics.median(step_work(s) for r in job["ranks"] if r != slow_rank
                                   for s in docs[r]["steps"] if s["step"] in e["slow_steps"])
        row.update({"phase": e["phase"], "cause": e["cause"], "ratio": e["ratio"], "excess_s": e["excess_s"],
                    "planted_ratio": (others + extra) / others, "slow_steps": e["slow_steps"],
                    "lever": planted["levers"]})
        row["ratio_error"] = abs(row["ratio"] / row["planted_ratio"] - 1)
    return row


def recorder_cost_us(collectives_per_step: int, steps: int = 2000) -> float:
    """Microseconds the per-rank recorder adds to a step with ``collectives_per_step``
    collectives: a profiled step with empty ``collective()`` spans, with the recorder on less
    off (min of 5 repeats each, interleaved), in this process."""
    def cost(on: bool) -> float:
        prof = StepProfiler(warmup_steps=0, collectives=on)
        t0 = time.perf_counter()
        for _ in range(steps):
            with prof.step(tokens=1, samples=1):
                for _ in range(collectives_per_step):
                    with collective():
                        pass
        return (time.perf_counter() - t0) / steps

    on, off = [], []
    for _ in range(7):
        on.append(cost(True))
        off.append(cost(False))
    return max(0.0, min(on) - min(off)) * 1e6


def run(args: argparse.Namespace) -> dict:
    worlds = {2: ["clean", "sleep", "clock", "data"], 4: ["clean", "sleep", "clock", "data"]}
    steps, rounds, per_round = (7, 4, 5) if args.quick else (args.steps, args.overhead_rounds, args.steps_per_round)
    if args.quick:
        worlds[4] = ["clean", "sleep"]
    result: dict = {"steps": steps, "extra_s": args.extra, "base_s": args.base, "every": 2, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="thruput-stragglers-") as tmp:
        tmp = getattr(args, "keep", None) or tmp
        for world, cases in worlds.items():
            out = Path(tmp) / f"world{world}"
            slow_rank = world // 2
            argv = ["--cases", ",".join(cases), "--steps", str(steps), "--slow-rank", str(slow_rank), "--every", "2",
                    "--extra", str(args.extra), "--base", str(args.base)]
            if world == 2:
                argv += ["--overhead-rounds", str(rounds), "--steps-per-round", str(per_round)]
            launch(world, out, argv)
            for case in cases:
                result["cases"][f"{world} ranks: {case}"] = judge(load_job(out / case), case, slow_rank, args.extra)
            if world == 2:
                arms = json.loads((out / "overhead.json").read_text())
                result["overhead"] = arms
                for clock, key in (("wall_s", "overhead_ratio"), ("cpu_s", "overhead_cpu_ratio")):
                    ratios = [a / b for a, b in zip(arms[f"with_recorder_{clock}"], arms[f"without_recorder_{clock}"])]
                    result["overhead"][f"round_ratios_{clock}"] = ratios
                    result[key] = statistics.median(ratios)
    result["recorder_us_per_step"] = recorder_cost_us(collectives_per_step=COLLECTIVES_PER_STEP)
    cases = result["cases"].values()
    result["found"] = all(c["found"] for c in cases)
    result["false_positives"] = sum(len(c["named_ranks"]) for k, c in result["cases"].items() if k.endswith("clean"))
    _print(result)
    return result


def _print(result: dict) -> None:
    table = Table(title="thruput bench stragglers", title_justify="left")
    for col in ("case", "named", "phase", "cause", "ratio (planted)", "per-rank step-time ratio", "found"):
        table.add_column(col)
    for name, c in result["cases"].items():
        ratio = f"{c['ratio']:.2f} ({c['planted_ratio']:.2f})" if "ratio" in c else "-"
        table.add_row(name, str(c["named_ranks"]), c.get("phase", "-"), c.get("cause", "-"), ratio,
                      f"{c['per_rank_step_time_ratio']:.2f}", "yes" if c["found"] else "NO")
    console = make_console()
    console.print(table)
    console.print(f"found {result['found']}  false positives {result['false_positives']}  overhead ratio "
                  f"(2 ranks) wall {result['overhead_ratio']:.4f}, CPU {result['overhead_cpu_ratio']:.4f}; the "
                  f"recorder's own cost {result['recorder_us_per_step']:.1f} us per step", markup=False)
