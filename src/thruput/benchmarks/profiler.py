"""Overhead of the step profiler on the demo model: interleaved A/B runs, same process."""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from thruput.models import GPT, GPTConfig
from thruput.profile import ClockSampler, StepProfiler

DESCRIPTION = "profiler overhead: median step time with / without StepProfiler (goal <= 1.01)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=10, help="A/B rounds")
    parser.add_argument("--steps-per-round", type=int, default=8, help="steps per arm per round")


def _step(model: GPT, opt: torch.optim.Optimizer, batch: torch.Tensor, prof: StepProfiler) -> float:
    """One training step, timed from outside the profiler so both arms are timed alike."""
    t0 = time.perf_counter()
    with prof.step(tokens=batch.numel(), samples=batch.shape[0]):
        with prof.phase("data_wait"):
            x, y = batch[:, :-1], batch[:, 1:]
        with prof.phase("forward"):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        with prof.phase("backward"):
            loss.backward()
        with prof.phase("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    rounds, per_round = (3, 4) if args.quick else (args.rounds, args.steps_per_round)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 256, (8, 257))
    on = StepProfiler(flops_per_token=model.flops_per_token(), clocks=ClockSampler(hz=20))
    off = StepProfiler(enabled=False)
    for _ in range(3):  # warm-up: allocator, thread pool
        _step(model, opt, batch, off)
    times: dict[str, list[float]] = {"profiled": [], "unprofiled": []}
    for r in range(rounds):
        # Alternate which arm goes first so drift in machine state hits both equally.
        arms = [("profiled", on), ("unprofiled", off)]
        for name, prof in arms if r % 2 == 0 else arms[::-1]:
            times[name] += [_step(model, opt, batch, prof) for _ in range(per_round)]
    on.finish()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["profiled"] / med["unprofiled"]
    table = Table(title="profiler overhead (interleaved A/B, demo GPT, 8x256 tokens)")
    for col in ("arm", "steps", "median ms", "p90 ms"):
        table.add_column(col, justify="right")
    for name, values in times.items():
        p90 = sorted(values)[int(0.9 * (len(values) - 1))]
        table.add_row(name, str(len(values)), f"{med[name] * 1e3:.2f}", f"{p90 * 1e3:.2f}")
    Console().print(table)
    Console().print(f"overhead_ratio (median profiled / unprofiled): {ratio:.4f}  (goal <= 1.01)")
    return {"overhead_ratio": ratio, "median_step_s": med, "steps_per_arm": len(times["profiled"]),
            "clock_sources": on.clocks.sources_info() if on.clocks else {}}
