"""End to end on the demo workload: two peers, thruput with every lever, and each lever alone.

Every variant trains the demo's GPT on the same number of labelled tokens (see
``thruput.demo.workload``) in this one process, one after the other:

* ``packed_peer`` (the strongest): padding-free packed rows with position ids per document
  (transformers' ``DataCollatorWithFlattening``), as many rows and tokens per source as thruput's
  plan, a dense document mask (what such a peer gets on CPU), torch AdamW, the naive loss.
* ``baseline`` (the naive one): pad-to-longest ``DataLoader``, torch AdamW, the naive loss.

``speedup_vs_packed_peer`` and ``speedup`` are thruput's useful tokens/s over each peer's
(steady state: the profiler leaves the first step, compilation included, out); ``wall_speedup``
is the ratio to the baseline over whole-run wall time per labelled token, set-up and compilation
included. ``loss_rel_diff`` compares the held-out loss of thruput's and the baseline's models.
``levers`` gives each lever's speedup switched on alone over the baseline. ``attention_scores``:
the attention scores per step that the packed peer's dense mask computes over those its
documents need (thruput's per-document attention computes the latter, padded to its groups).
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from tempfile import TemporaryDirectory

from thruput.console import make_console
from thruput.demo.packed_peer import PackedRows, attention_scores
from thruput.demo.present import comparison_table, display_rows
from thruput.demo.workload import (LEVERS, SOURCES, DemoSetup, DemoWorkload, RunOutcome, compare, outcome_figures,
                                   setup_figures)

DESCRIPTION = ("demo workload: thruput vs a packed peer (goal >= 1.15) and the pad-to-longest baseline (goal >= 2) "
               "in useful tokens/s, held-out loss (goal <= 2%), per lever")
GOALS = {"speedup_vs_packed_peer_min": 1.15, "speedup_min": 2.0, "loss_rel_diff_max": 0.02}
ARMS = ("packed_peer", "baseline", "thruput")  # run order of a repeat (and the table's)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, help="baseline steps (default: the demo's)")
    parser.add_argument("--no-levers", action="store_true", help="skip the one-lever-at-a-time runs")
    parser.add_argument("--out", help="folder for the per-run reports (default: a temporary folder)")
    parser.add_argument("--seq-len", type=int, help="row length in tokens (default: the demo's)")
    parser.add_argument("--rows", type=int, help="baseline rows per step (default: the demo's)")
    parser.add_argument("--seed", type=int, help="seed of the data order and the model init (default: the demo's)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each peer and thruput N times in ABBA order (cancels drift in machine load)")
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
    console = make_console()
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
        repeats: dict[str, list[RunOutcome]] = {name: [] for name in ARMS}
        for i in range(args.repeats):
            for name in ARMS if i % 2 == 0 else ARMS[::-1]:
                repeats[name].append(_run_arm(workload, name))
        packed, baseline, full = (repeats[name][0] for name in ARMS)
        runs = [packed, baseline, full]
        if not args.no_levers:
            runs += [workload.run((lever,), f"+{lever}", show_progress=False) for lever in LEVERS]
        scores = attention_scores(PackedRows(workload.dataset.document_lengths,
                                             [workload.token_shares[n] for n in workload.dataset.names],
                                             workload.packed_rows, setup.seq_len, workload.packed_steps, setup.seed))
    rows = display_rows(runs, {"x packed peer": "packed_peer", "x baseline": "baseline"})
    console.print(comparison_table(rows, "bench e2e: same labelled tokens per run"))
    # Mean over the repeats of each arm: with ABBA order, a linear drift in load cancels.
    rates = {name: statistics.mean(r.summary["useful_tokens_per_s"] for r in rs) for name, rs in repeats.items()}
    figures = {
        **compare(baseline, full),
        "speedup_vs_packed_peer": rates["thruput"] / rates["packed_peer"],
        "speedup": rates["thruput"] / rates["baseline"],
        "attention_scores": {**scores, "dense_over_per_document": scores["dense"] / scores["per_document"]},
        "repeats": {name: {"useful_tokens_per_s": [r.summary["useful_tokens_per_s"] for r in rs]}
                    for name, rs in repeats.items()},
        "levers": {r.name.removeprefix("+"): compare(baseline, r)["speedup"] for r in runs[3:]},
        "runs": {r.name: outcome_figures(r) for r in runs},
        "setup": setup_figures(workload),
        "goals": GOALS,
    }
    figures["goals_met"] = {
        "speedup_vs_packed_peer": figures["speedup_vs_packed_peer"] >= GOALS["speedup_vs_packed_peer_min"],
        "speedup": figures["speedup"] >= GOALS["speedup_min"],
        "loss_rel_diff": figures["loss_rel_diff"] <= GOALS["loss_rel_diff_max"]}
    console.print(f"speedup_vs_packed_peer {figures['speedup_vs_packed_peer']:.2f}x (goal >= "
                  f"{GOALS['speedup_vs_packed_peer_min']}), speedup vs baseline {figures['speedup']:.2f}x "
                  f"(wall {figures['wall_speedup']:.2f}x), held-out loss difference {figures['loss_rel_diff']:.2%}"
                  + ("; alone: " + ", ".join(f"{k} {v:.2f}x" for k, v in figures["levers"].items())
                     if figures["levers"] else ""), markup=False)
    if not figures["goals_met"]["speedup_vs_packed_peer"]:
        console.print(packed_peer_note(figures), markup=False)
    return figures


def _run_arm(workload: DemoWorkload, name: str) -> RunOutcome:
    if name == "thruput":
        return workload.run(LEVERS, name, show_progress=False)
    return workload.run((), name, show_progress=False, peer=name)


def packed_peer_note(figures: dict) -> str:
    """Why thruput is not ahead of the packed peer by the goal, from this run's own figures."""
    peer, ours, setup = figures["runs"]["packed_peer"], figures["runs"]["thruput"], figures["setup"]
    ratio = figures["attention_scores"]["dense_over_per_document"]
    where = "behind" if figures["speedup_vs_packed_peer"] < 1 else "ahead of, but short of the goal against,"
    alone = ", ".join(f"{k} {v:.2f}x" for k, v in figures["levers"].items())
    return (f"note: thruput is {where} the packed peer ({figures['speedup_vs_packed_peer']:.2f}x, goal >= "
            f"{GOALS['speedup_vs_packed_peer_min']}). Both train on full rows without padding, so over this peer "
            f"thruput has only per-document attention, the fused loss, compile and offload. On rows of "
            f"{setup['seq_len']} tokens the peer's dense mask computes {ratio:.1f}x the attention scores the "
            f"documents need, a saving bounded by attention's share of a step. Median step: peer "
            f"{peer['step_time_s'] * 1e3:,.0f} ms, thruput {ours['step_time_s'] * 1e3:,.0f} ms; data wait: peer "
            f"{peer['stall_fraction']:.1%}, thruput {ours['stall_fraction']:.1%}."
            + (f" Each lever alone against the baseline: {alone}." if alone else ""))
