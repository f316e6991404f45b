"""Overhead of profiling the demo model's training step, against its peers.

In one process, interleaved round by round (the arm that goes first alternates): no profiler,
``thruput run``'s hooks (installed and removed each round, with their clock sampler),
the explicit ``StepProfiler``, and ``torch.profiler`` with ``schedule(wait=1, warmup=1,
active=steps-2)`` and CPU activities, as users run it (no trace export). TraceML cannot be
switched off again in a process (``traceml_ai.init`` patches ``nn.Module.__call__`` and starts
a runtime that needs its aggregator), so it is measured in whole processes, alternating
``python`` / ``thruput run`` / ``traceml run`` on the same loop (``_profiler_workload``).
Every arm is timed the same way: ``perf_counter`` around the step, median over its steps.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from thruput.benchmarks import _profiler_workload as workload
from thruput.profile import ClockSampler, StepProfiler
from thruput.run import ExitInfo, RunOptions, Session

DESCRIPTION = ("profiler overhead on the demo GPT: thruput run, StepProfiler, torch.profiler and "
               "TraceML against no profiler (goal: thruput run <= 1.01)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=10, help="interleaved in-process rounds")
    parser.add_argument("--steps-per-round", type=int, default=8, help="steps per arm per round")
    parser.add_argument("--process-rounds", type=int, default=3,
                        help="whole-process rounds (python, thruput run, traceml run); 0 skips them")
    parser.add_argument("--process-steps", type=int, default=30, help="steps per whole process")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default: torch's; --quick uses 1). On a shared, "
                             "loaded machine a spinning thread pool makes step times swing tenfold")


class _Arm:
    """One way of running the step: ``begin``/``end`` around a round, ``step`` timed."""

    name = ""

    def begin(self, steps: int) -> None: ...

    def step(self) -> None: ...

    def end(self) -> None: ...


class _Plain(_Arm):
    name = "unprofiled"

    def __init__(self, train: Callable[[], None]) -> None:
        self.train = train

    def step(self) -> None:
        self.train()


class _ThruputRun(_Plain):
    """What ``thruput run`` installs: the session's hooks, recorder, profiler and clock sampler."""

    name = "thruput run"

    def __init__(self, train: Callable[[], None], out: str) -> None:
        super().__init__(train)
        self.out = out
        self.document: dict | None = None

    def begin(self, steps: int) -> None:
        self.session = Session(RunOptions(out=self.out, name="bench", status=False), ["bench"])
        self.session.start()

    def end(self) -> None:
        self.document = self.session.finish(ExitInfo(0)).document


class _StepProfiler(_Arm):
    name = "StepProfiler"

    def __init__(self, model, opt, batches) -> None:
        self.model, self.opt, self.batches = model, opt, batches
        self.prof = StepProfiler(flops_per_token=model.flops_per_token(), clocks=ClockSampler(hz=20))
        self.prof.clocks.stop()  # the sampler runs during this arm's rounds only

    def begin(self, steps: int) -> None:
        self.prof.clocks.start()

    def end(self) -> None:
        self.prof.clocks.stop()

    def step(self) -> None:
        prof, model = self.prof, self.model
        with prof.step(tokens=workload.BATCH * workload.SEQ, samples=workload.BATCH):
            with prof.phase("data_wait"):
                batch = next(self.batches)
            with prof.phase("forward"):
                loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            with prof.phase("backward"):
                loss.backward()
            with prof.phase("optimizer"):
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)


class _TorchProfiler(_Plain):
    name = "torch.profiler"

    def begin(self, steps: int) -> None:
        schedule = torch.profiler.schedule(wait=1, warmup=1, active=max(1, steps - 2))
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule)
        self.prof.__enter__()

    def step(self) -> None:
        self.train()
        self.prof.step()

    def end(self) -> None:
        self.prof.__exit__(None, None, None)


def _in_process(rounds: int, per_round: int, out: str) -> tuple[dict[str, list[float]], dict | None]:
    model, opt, batches = workload.make_workload()

    def train() -> None:
        workload.train_step(model, opt, batches)

    thruput_run = _ThruputRun(train, out)
    arms = [_Plain(train), thruput_run, _StepProfiler(model, opt, batches), _TorchProfiler(train)]
    for _ in range(3):  # warm-up: allocator, thread pool, first optimizer step
        train()
    times: dict[str, list[float]] = {arm.name: [] for arm in arms}
    for r in range(rounds):
        # Rotate the order so drift in machine state hits every arm alike.
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            arm.begin(per_round)
            times[arm.name] += [workload.timed(arm.step) for _ in range(per_round)]
            arm.end()
    return times, thruput_run.document


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _whole_processes(rounds: int, steps: int, folder: Path) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Alternate whole-process runs; per arm, each step's time after the first three."""
    loop = ["--steps", str(steps), "--threads", str(torch.get_num_threads())]
    base = [sys.executable, "-m", "thruput.benchmarks._profiler_workload"]
    arms: dict[str, Callable[[Path], list[str]]] = {
        "unprofiled": lambda result: [*base, str(result), *loop],
        "thruput run": lambda result: [sys.executable, "-m", "thruput.cli", "run", "--no-status", "--out",
                                       str(folder), "--", "-m", "thruput.benchmarks._profiler_workload",
                                       str(result), *loop],
    }
    skipped: dict[str, str] = {}
    if importlib.util.find_spec("traceml_ai") is None:
        skipped["traceml"] = "traceml-ai is not installed (pip install 'thruput[bench]')"
    else:
        arms["traceml"] = lambda result: [
            sys.executable, "-m", "traceml_ai.launcher.cli", "run", "--logs-dir", str(folder / "traceml"),
            "--aggregator-port", str(_free_port()), workload.__file__,
            "--args", str(result), *loop, "--traceml"]
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(rounds):
        names = list(arms)
        for name in names[r % len(names):] + names[:r % len(names)]:
            result = folder / f"{name.replace(' ', '_')}-{r}.json"
            run = subprocess.run(arms[name](result), capture_output=True, text=True, timeout=900)
            if run.returncode != 0 or not result.exists():
                raise RuntimeError(f"bench profiler: the {name} process failed ({run.returncode}): "
                                   f"{run.stderr.strip()[-2000:]}")
            times[name] += json.loads(result.read_text())["step_s"][3:]
    return times, skipped


def _table(title: str, times: dict[str, list[float]]) -> Table:
    table = Table(title=title)
    for col in ("arm", "steps", "median ms", "p90 ms", "ratio"):
        table.add_column(col, justify="right")
    base = statistics.median(times["unprofiled"])
    for name, values in times.items():
        med = statistics.median(values)
        p90 = sorted(values)[int(0.9 * (len(values) - 1))]
        table.add_row(name, str(len(values)), f"{med * 1e3:.2f}", f"{p90 * 1e3:.2f}", f"{med / base:.4f}")
    return table


def _ratios(times: dict[str, list[float]]) -> dict[str, float]:
    base = statistics.median(times["unprofiled"])
    return {name: statistics.median(v) / base for name, v in times.items() if name != "unprofiled"}


def run(args: argparse.Namespace) -> dict:
    rounds, per_round = (2, 2) if args.quick else (args.rounds, args.steps_per_round)
    process_rounds = 0 if args.quick else args.process_rounds
    threads = 1 if args.quick else args.threads
    if threads:
        torch.set_num_threads(threads)
    console = Console()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        times, document = _in_process(rounds, per_round, tmp)
        console.print(_table("profiler overhead, in one process (interleaved, demo GPT, 8x256 tokens)", times))
        ratios = _ratios(times)
        process_times, skipped = ({}, {"traceml": "whole-process runs skipped (--quick or --process-rounds 0)"}) \
            if process_rounds == 0 else _whole_processes(process_rounds, args.process_steps, Path(tmp))
    process_ratios = _ratios(process_times) if process_times else {}
    if process_times:
        console.print(_table("profiler overhead, whole processes (alternating)", process_times))
    for name, reason in skipped.items():
        console.print(f"{name}: not run: {reason}")
    figures = {
        "overhead_ratio": ratios["thruput run"],
        "overhead_ratio_step_profiler": ratios["StepProfiler"],
        "overhead_ratio_torch_profiler": ratios["torch.profiler"],
        "overhead_ratio_traceml": process_ratios.get("traceml"),
        "overhead_ratio_thruput_run_process": process_ratios.get("thruput run"),
        "median_step_s": {k: statistics.median(v) for k, v in times.items()},
        "median_step_s_process": {k: statistics.median(v) for k, v in process_times.items()},
        "steps_per_arm": len(times["unprofiled"]),
        "not_run": skipped,
        "thruput_run_verdict": document["verdict"]["bottleneck"] if document else None,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    console.print(f"overhead_ratio (thruput run, median step / unprofiled): {figures['overhead_ratio']:.4f}  "
                  f"(goal <= 1.01); load average {load_before[0]:.1f} -> {figures['load_average']['after'][0]:.1f} "
                  f"on {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    return figures
