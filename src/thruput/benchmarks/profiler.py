"""Overhead of profiling the demo model's training step, against its peers.

In one process, interleaved round by round (the arm that goes first alternates): no profiler,
``thruput run``'s hooks (installed and removed each round, with their clock sampler),
the explicit ``StepProfiler``, and ``torch.profiler`` with ``schedule(wait=1, warmup=1,
active=steps-2)`` and CPU activities, as users run it (no trace export). TraceML cannot be
switched off again in a process (``traceml_ai.init`` patches ``nn.Module.__call__`` and starts
a runtime that needs its aggregator), so it is measured in whole processes, alternating
``python`` / ``thruput run`` / ``traceml run`` on the same loop (``_profiler_workload``).
Every arm is timed the same way, around the step: wall time (``perf_counter``) and process CPU
time (``process_time``, all threads: the clock sampler's and TraceML's runtime included, TraceML's
aggregator process not), each the median over the arm's steps. On a shared machine the CPU-time
ratio is the steadier one: being descheduled adds wall time, not CPU time.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

from thruput.benchmarks import _profiler_workload as workload
from thruput.console import make_console
from thruput.profile import ClockSampler, StepProfiler
from thruput.run import ExitInfo, Recorder, RunOptions, Session, TorchHooks

CONTROL = "A/A control"  # unprofiled again
DESCRIPTION = ("profiler overhead on the demo GPT: thruput run, StepProfiler, torch.profiler and "
               "TraceML against no profiler (goal: thruput run <= 1.01)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=20, help="interleaved in-process rounds")
    parser.add_argument("--steps-per-round", type=int, default=4, help="steps per arm per round")
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
    def __init__(self, train: Callable[[], None], name: str = "unprofiled") -> None:
        self.train = train
        self.name = name

    def step(self) -> None:
        self.train()


class _ThruputRun(_Plain):
    """What ``thruput run`` installs: the session's hooks, recorder, profiler and clock sampler."""

    def __init__(self, train: Callable[[], None], out: str) -> None:
        super().__init__(train, "thruput run")
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
    def __init__(self, train: Callable[[], None]) -> None:
        super().__init__(train, "torch.profiler")

    def begin(self, steps: int) -> None:
        schedule = torch.profiler.schedule(wait=1, warmup=1, active=max(1, steps - 2))
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], schedule=schedule)
        self.prof.__enter__()

    def step(self) -> None:
        self.train()
        self.prof.step()

    def end(self) -> None:
        self.prof.__exit__(None, None, None)


Times = dict[str, dict[str, list[float]]]  # arm -> {"wall": [...], "cpu": [...]} seconds per step


def _in_process(rounds: int, per_round: int, out: str) -> tuple[Times, dict | None]:
    model, opt, batches = workload.make_workload()

    def train() -> None:
        workload.train_step(model, opt, batches)

    thruput_run = _ThruputRun(train, out)
    # The A/A control runs the unprofiled step as a separate arm: its ratio is the noise floor.
    arms = [_Plain(train), _Plain(train, CONTROL), thruput_run, _StepProfiler(model, opt, batches),
            _TorchProfiler(train)]
    for _ in range(3):  # warm-up: allocator, thread pool, first optimizer step
        train()
    times: Times = {arm.name: {"wall": [], "cpu": []} for arm in arms}
    for r in range(rounds):
        # Rotate the order so drift in machine state hits every arm alike.
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            arm.begin(per_round)
            for _ in range(per_round):
                wall, cpu = workload.timed(arm.step)
                times[arm.name]["wall"].append(wall)
                times[arm.name]["cpu"].append(cpu)
            arm.end()
    return times, thruput_run.document


def _cost_per_step(repeats: int = 5, steps: int = 300) -> dict[str, float]:
    """What ``thruput run`` costs, apart from any model: CPU seconds its hooks and bookkeeping add
    to one step of a one-weight model fed by a DataLoader (best of ``repeats``, so load on the
    machine does not count), and the CPU share of its 20 Hz clock sampler."""
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(torch.zeros(steps, 1, dtype=torch.long)), batch_size=1)

    def loop() -> float:
        c0 = time.process_time()
        for (ids,) in loader:
            model(ids.float()).sum().backward()
            opt.step()
        return time.process_time() - c0

    plain, hooked = [], []
    for _ in range(repeats):
        plain.append(loop())
        with TorchHooks(Recorder(lambda device: StepProfiler(device))):
            hooked.append(loop())
    sampler = ClockSampler(hz=20)
    c0 = time.process_time()
    for _ in range(200):
        sampler.sample()
    return {"hooks_cpu_s_per_step": (min(hooked) - min(plain)) / steps,
            "clock_sampler_cpu_share": (time.process_time() - c0) / 200 * 20}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _whole_processes(rounds: int, steps: int, folder: Path) -> tuple[Times, dict[str, str]]:
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
    times: Times = {name: {"wall": [], "cpu": []} for name in arms}
    for r in range(rounds):
        names = list(arms)
        for name in names[r % len(names):] + names[:r % len(names)]:
            result = folder / f"{name.replace(' ', '_')}-{r}.json"
            run = subprocess.run(arms[name](result), capture_output=True, text=True, timeout=900)
            if run.returncode != 0 or not result.exists():
                raise RuntimeError(f"bench profiler: the {name} process failed ({run.returncode}): "
                                   f"{run.stderr.strip()[-2000:]}")
            measured = json.loads(result.read_text())
            times[name]["wall"] += measured["step_s"][3:]
            times[name]["cpu"] += measured["cpu_s"][3:]
    return times, skipped


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def _table(title: str, times: Times) -> Table:
    table = Table(title=title, caption="medians per step; x: over the unprofiled arm")
    for col in ("arm", "steps", "wall ms", "wall p90", "wall x", "CPU ms", "CPU x"):
        table.add_column(col, justify="right")
    wall, cpu = _ratios(times, "wall"), _ratios(times, "cpu")
    for name, t in times.items():
        table.add_row(name, str(len(t["wall"])), f"{statistics.median(t['wall']) * 1e3:.2f}",
                      f"{_p90(t['wall']) * 1e3:.2f}", f"{wall[name]:.4f}",
                      f"{statistics.median(t['cpu']) * 1e3:.2f}", f"{cpu[name]:.4f}")
    return table


def _ratios(times: Times, kind: str) -> dict[str, float]:
    """Median step of each arm over the unprofiled arm's (1.0 for the unprofiled arm itself)."""
    base = statistics.median(times["unprofiled"][kind])
    return {name: statistics.median(t[kind]) / base for name, t in times.items()}


def run(args: argparse.Namespace) -> dict:
    rounds, per_round = (2, 2) if args.quick else (args.rounds, args.steps_per_round)
    process_rounds = 0 if args.quick else args.process_rounds
    threads = 1 if args.quick else args.threads
    if threads:
        torch.set_num_threads(threads)
    console = make_console()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        times, document = _in_process(rounds, per_round, tmp)
        console.print(_table("profiler overhead, in one process (interleaved, demo GPT, 8x256 tokens)", times))
        if process_rounds:
            process_times, not_run = _whole_processes(process_rounds, args.process_steps, Path(tmp))
            console.print(_table("profiler overhead, whole processes (alternating)", process_times))
        else:
            process_times, not_run = {}, {"traceml": "whole-process runs skipped (--quick or --process-rounds 0)"}
    for name, reason in not_run.items():
        console.print(f"{name}: not run: {reason}")
    cost = _cost_per_step(repeats=2 if args.quick else 5)
    step_cpu = statistics.median(times["unprofiled"]["cpu"])
    step_wall = statistics.median(times["unprofiled"]["wall"])
    # The same cost on the demo step: hooks once per step, the sampler for the step's wall time.
    estimate = 1 + (cost["hooks_cpu_s_per_step"] + cost["clock_sampler_cpu_share"] * step_wall) / step_cpu
    console.print(f"thruput run's own cost: {cost['hooks_cpu_s_per_step'] * 1e6:.1f} us CPU per step (hooks and "
                  f"bookkeeping), clock sampler {cost['clock_sampler_cpu_share']:.3%} of a CPU; on the demo "
                  f"step ({step_cpu * 1e3:.1f} ms CPU): {estimate:.4f}")
    wall = _ratios(times, "wall")
    process_wall = _ratios(process_times, "wall") if process_times else {}
    figures = {
        "overhead_ratio": wall["thruput run"],
        "overhead_ratio_step_profiler": wall["StepProfiler"],
        "overhead_ratio_torch_profiler": wall["torch.profiler"],
        "overhead_ratio_traceml": process_wall.get("traceml"),
        "overhead_ratio_thruput_run_process": process_wall.get("thruput run"),
        "control_ratio": wall[CONTROL],
        "cpu_time_ratio": _ratios(times, "cpu"),
        "thruput_run_cost": {**cost, "overhead_ratio_estimate": estimate},
        "cpu_time_ratio_process": _ratios(process_times, "cpu") if process_times else {},
        "median_step_s": {k: statistics.median(t["wall"]) for k, t in times.items()},
        "median_step_s_process": {k: statistics.median(t["wall"]) for k, t in process_times.items()},
        "steps_per_arm": len(times["unprofiled"]["wall"]),
        "steps_per_arm_process": len(process_times["unprofiled"]["wall"]) if process_times else 0,
        "not_run": not_run,
        "thruput_run_verdict": document["verdict"]["bottleneck"] if document else None,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    console.print(f"overhead_ratio (thruput run, median step / unprofiled): {figures['overhead_ratio']:.4f}  "
                  f"(goal <= 1.01); load average {load_before[0]:.1f} -> {figures['load_average']['after'][0]:.1f} "
                  f"on {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    return figures
