"""End to end on the demo workload: the baseline, thruput with every lever, and each lever alone.

Every variant trains the demo's GPT on the same number of labelled tokens (see ``thruput.demo``)
in this one process, one after the other. ``speedup`` is thruput's useful tokens/s over the
baseline's (steady state: the profiler leaves the first step, compilation included, out);
``wall_speedup`` is the same ratio over whole-run wall time per labelled token, set-up and
compilation included. ``loss_rel_diff`` compares the held-out loss of the two models.
``levers`` gives each lever's speedup switched on alone over the baseline.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from tempfile import TemporaryDirectory

from rich.console import Console

from thruput.demo import (LEVERS, SOURCES, DemoSetup, DemoWorkload, compare, comparison_table, display_rows,
                          outcome_figures, setup_figures)

DESCRIPTION = "demo workload: thruput vs baseline useful tokens/s (goal >= 2) and loss (goal <= 2%), per lever"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help="baseline steps (default: the demo's)")
    parser.add_argument("--no-levers", action="store_true", help="skip the one-lever-at-a-time runs")
    parser.add_argument("--out", help="folder for the per-run reports (default: a temporary folder)")
    parser.add_argument("--mix", help="baseline sample shares, e.g. code=0.1,functions=0.45,docstrings=0.45")


def _mix(text: str) -> dict[str, float]:
    try:
        mix = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise SystemExit(f"thruput bench e2e: --mix: expected name=share,..., got {text!r}") from None
    if set(mix) != set(SOURCES) or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise SystemExit(f"thruput bench e2e: --mix: give a non-negative share for each of {', '.join(SOURCES)}")
    return mix


def run(args: argparse.Namespace) -> dict:
    console = Console()
    setup = DemoSetup.tiny() if args.quick else DemoSetup()
    if args.steps:
        setup.steps = args.steps
    if args.mix:
        setup.sample_mix = _mix(args.mix)
    with TemporaryDirectory() as tmp:
        workload = DemoWorkload(setup, Path(args.out or tmp))
        baseline = workload.run((), "baseline", show_progress=False)
        full = workload.run(LEVERS, "thruput", show_progress=False)
        runs = [baseline, full]
        if not args.no_levers:
            runs += [workload.run((lever,), f"+{lever}", show_progress=False) for lever in LEVERS]
    console.print(comparison_table(display_rows(runs), "bench e2e: same labelled tokens per run"))
    figures = {
        **compare(baseline, full),
        "levers": {r.name.removeprefix("+"): compare(baseline, r)["speedup"] for r in runs[2:]},
        "runs": {r.name: outcome_figures(r) for r in runs},
        "setup": setup_figures(workload),
    }
    console.print(f"speedup {figures['speedup']:.2f}x (wall {figures['wall_speedup']:.2f}x), held-out loss "
                  f"difference {figures['loss_rel_diff']:.2%}; alone: "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in figures["levers"].items()), markup=False)
    return figures
