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
import statistics
from pathlib import Path
from tempfile import TemporaryDirectory

from rich.console import Console

from thruput.demo import (LEVERS, SOURCES, DemoSetup, DemoWorkload, RunOutcome, compare, comparison_table, display_rows,
                          outcome_figures, setup_figures)

DESCRIPTION = "demo workload: thruput vs baseline useful tokens/s (goal >= 2) and loss (goal <= 2%), per lever"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help="baseline steps (default: the demo's)")
    parser.add_argument("--no-levers", action="store_true", help="skip the one-lever-at-a-time runs")
    parser.add_argument("--out", help="folder for the per-run reports (default: a temporary folder)")
    parser.add_argument("--seq-len", type=int, help="row length in tokens (default: the demo's)")
    parser.add_argument("--rows", type=int, help="baseline rows per step (default: the demo's)")
    parser.add_argument("--seed", type=int, help="seed of the data order and the model init (default: the demo's)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run baseline and thruput N times each in ABBA order (cancels drift in machine load)")
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
    if args.seq_len:
        setup.seq_len = args.seq_len
    if args.rows:
        setup.baseline_rows = args.rows
    if args.seed is not None:
        setup.seed = args.seed
    if args.mix:
        setup.sample_mix = _mix(args.mix)
    if args.repeats < 1:
        raise SystemExit("thruput bench e2e: --repeats must be at least 1")
    with TemporaryDirectory() as tmp:
        workload = DemoWorkload(setup, Path(args.out or tmp))
        repeats: dict[str, list[RunOutcome]] = {"baseline": [], "thruput": []}
        for i in range(args.repeats):
            for name in ("baseline", "thruput") if i % 2 == 0 else ("thruput", "baseline"):
                repeats[name].append(workload.run(LEVERS if name == "thruput" else (), name, show_progress=False))
        baseline, full = repeats["baseline"][0], repeats["thruput"][0]
        runs = [baseline, full]
        if not args.no_levers:
            runs += [workload.run((lever,), f"+{lever}", show_progress=False) for lever in LEVERS]
    console.print(comparison_table(display_rows(runs), "bench e2e: same labelled tokens per run"))
    rates = {name: [r.summary["useful_tokens_per_s"] for r in rs] for name, rs in repeats.items()}
    figures = {
        **compare(baseline, full),
        # Mean over the repeats of each side: with ABBA order, a linear drift in load cancels.
        "speedup": statistics.mean(rates["thruput"]) / statistics.mean(rates["baseline"]),
        "repeats": {name: {"useful_tokens_per_s": r} for name, r in rates.items()},
        "levers": {r.name.removeprefix("+"): compare(baseline, r)["speedup"] for r in runs[2:]},
        "runs": {r.name: outcome_figures(r) for r in runs},
        "setup": setup_figures(workload),
    }
    console.print(f"speedup {figures['speedup']:.2f}x (wall {figures['wall_speedup']:.2f}x), held-out loss "
                  f"difference {figures['loss_rel_diff']:.2%}; alone: "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in figures["levers"].items()), markup=False)
    return figures
