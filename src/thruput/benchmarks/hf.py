"""Fine-tuning a transformers Llama on instruction data: Trainer as it comes, the best HF stack, thruput.

The workload (``_hf_setup``): a random-init Llama (4 layers x 256 hidden; ``--quick`` 2 x 64), a
byte-level BPE vocabulary (16k; ``--quick`` 1k) trained at set-up on the Python standard
library, and two sources of instruction-like documents made from it (explain a function from
its docstring, write it from its summary), long-tailed (median ~70 tokens, rows of 1024).
The arms (``_hf_arms``): ``hf_default`` (Trainer, padding collator, torch AdamW),
``hf_best`` (Trainer, ``DataCollatorWithFlattening``, fused AdamW, torch's fused
``F.linear_cross_entropy``) and ``thruput`` (``patch(model)``, the Loader, a plain loop). All
train the same initial weights on the same labelled tokens, with Trainer's hyper-parameters and
about the same number of optimizer steps (an HF batch holds the documents of a thruput step, on
average), then score the same held-out documents.

Each arm runs in its own process (its own peak memory); with ``--rounds`` > 1 the order
alternates (ABC, CBA, ...) and an arm's figures are the medians over its rounds. Useful
tokens/s is labelled targets over the time from the end of the first step to the end of the
last (the first step, with its warm-up and data start-up, is left out of every arm); step time
is the median step.

Not compiled, in any arm: ``torch.compile(dynamic=True)`` on hf_best's step (this CPU, load
average ~10 on 2 cores, 2026-12-02) took 237 s for its first step, then 5.6 s a step against
10.5 s eager (median of 9): it pays per step, but a run of this length gives the compile time back.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from thruput.benchmarks._hf_setup import (Workload, build_data, held_out_documents, hf_batch_for,
                                          save_documents, training_set)
from thruput.console import make_console

DESCRIPTION = "fine-tuning a transformers Llama on instruction data: Trainer defaults, the best HF stack, thruput"
ARMS = ("hf_default", "hf_best", "thruput")
MIB = 2**20
NOT_RUN = {"liger": "needs CUDA (Triton kernels)", "cut_cross_entropy": "needs CUDA (Triton kernels)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=2, help="runs of every arm, in alternating order (ABC, CBA)")
    parser.add_argument("--steps", type=int, default=None, help="thruput steps (the HF arms train on the same tokens)")


def _run_arm(arm: str, spec_path: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "thruput.benchmarks._hf_worker", arm, str(spec_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"arm": arm, "error": f"exit status {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def arm_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's figures from its runs (medians over runs), steps after the first."""
    rates, steps = [], []
    for r in runs:
        ends, targets = r["step_ends_s"], r["step_targets"]
        rates.append(sum(targets[1:]) / (ends[-1] - ends[0]))
        steps += [b - a for a, b in zip(ends[:-1], ends[1:])]
    first = runs[0]
    return {"useful_tokens_per_s": statistics.median(rates), "median_step_s": statistics.median(steps),
            "steps": len(first["step_targets"]), "labelled_tokens": sum(first["step_targets"]),
            "padding_ratio": first["padding_ratio"], "peak_delta_bytes": max(r["peak_delta_bytes"] for r in runs),
            "held_out_loss": first["held_out_loss"], "data_wait_s": first["data_wait_s"], "rounds": len(runs),
            "rates": rates}


def _note(result: dict[str, Any]) -> str:
    """Where thruput is not ahead of an arm, and why."""
    arms = result["arms"]
    notes = []
    behind = [f"{peer} ({result[f'speedup_vs_{peer}']:.2f}x)" for peer in ("hf_default", "hf_best")
              if result.get(f"speedup_vs_{peer}", 2.0) <= 1.0]
    if behind:
        why = []
        if result["quick"]:
            why.append("--quick is a smoke test: its steps of a few hundred tokens are fixed per-step costs "
                       "(Python, Trainer and Loader bookkeeping) more than work that packing and attention could save")
        load, cpus = max(result["load_average"]), result["cpus"]
        if load > cpus:
            why.append(f"the machine was loaded (load average up to {load:.1f} on {cpus} CPUs): the arms' "
                       "times are not comparable")
        notes.append(f"thruput is not faster than {' and '.join(behind)}: "
                     + ("; ".join(why) if why else "no cause found in the figures"))
    if "thruput" in arms and "hf_best" in arms and "error" not in arms["hf_best"]:
        if arms["thruput"]["peak_delta_bytes"] > arms["hf_best"]["peak_delta_bytes"]:
            notes.append("thruput's peak memory growth is above hf_best's: its rows hold "
                         f"{result['workload']['rows'] * result['workload']['seq_len']} tokens, "
                         "hf_best's one batch of documents")
    diff = result.get("loss_rel_diff_vs_hf_default")
    if diff is not None and diff > 0.02:
        notes.append(f"held-out loss differs from hf_default by {diff:.1%}: batches differ in their documents "
                     "(HF shuffles them, thruput mixes the sources)")
    return "; ".join(notes)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Workload.quick() if args.quick else Workload()
    if args.steps:
        work = Workload(**{**work.as_dict(), "steps": args.steps})
    rounds = 1 if args.quick else args.rounds
    console = make_console()
    load_before = os.getloadavg()[0]
    data = build_data(work)
    documents, labelled = training_set(work, data)
    work = Workload(**{**work.as_dict(), "hf_batch": hf_batch_for(work, documents)})
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(data.tokenizer)).get_vocab_size()
    runs: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="thruput-bench-hf-") as tmp:
        spec = {"work": work.as_dict(), "vocab_size": vocab, "tokenizer": str(data.tokenizer),
                "sources": {k: str(v) for k, v in data.sources.items()}, "held_out_text": str(data.held_out),
                "train": str(Path(tmp) / "train.npz"), "held_out": str(Path(tmp) / "held_out.npz")}
        save_documents(Path(spec["train"]), documents)
        save_documents(Path(spec["held_out"]), held_out_documents(work, data))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        for r in range(rounds):
            for arm in ARMS if r % 2 == 0 else ARMS[::-1]:
                res = _run_arm(arm, spec_path)
                if "error" in res:
                    errors[arm] = res["error"]
                else:
                    runs[arm].append(res)
    result: dict[str, Any] = {
        "quick": bool(args.quick), "torch": torch.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpus": os.cpu_count(), "load_average": [load_before, os.getloadavg()[0]],
        "workload": {**work.as_dict(), "vocab_size": vocab, "documents": len(documents),
                     "labelled_tokens": labelled},
        "hf_best_loss_kernel": "torch F.linear_cross_entropy, "
                               "LinearCrossEntropyOptions(batch_chunk_size=thruput's chunk rows)",
        "not_run": NOT_RUN, "compiled": False, "arms": {}}
    for arm in ARMS:
        result["arms"][arm] = {"error": errors[arm]} if arm in errors or not runs[arm] else arm_figures(runs[arm])
    arms = result["arms"]
    if "error" not in arms["thruput"]:
        for peer in ("hf_default", "hf_best"):
            if "error" not in arms[peer]:
                rate = arms[peer]["useful_tokens_per_s"]
                result[f"speedup_vs_{peer}"] = arms["thruput"]["useful_tokens_per_s"] / rate
        if "error" not in arms["hf_default"]:
            base = arms["hf_default"]["held_out_loss"]
            result["loss_rel_diff_vs_hf_default"] = abs(arms["thruput"]["held_out_loss"] - base) / base
    result["note"] = _note(result)
    console.print(_table(result))
    if result["note"]:
        console.print(f"note: {result['note']}")
    return result


def _table(result: dict[str, Any]) -> Table:
    w = result["workload"]
    shape = f"{w['model']['num_hidden_layers']}x{w['model']['hidden_size']}"
    table = Table(title=f"Llama {shape}, vocab {w['vocab_size']}, "
                        f"{w['documents']} documents, {w['labelled_tokens']} labelled tokens per arm, "
                        f"{result['device']}, torch {result['torch']}")
    for col in ("arm", "useful tok/s", "step s", "steps", "padding", "peak MiB", "held-out loss", "thruput speedup"):
        table.add_column(col, justify="right")
    thruput = result["arms"]["thruput"]
    for arm, entry in result["arms"].items():
        if "error" in entry:
            table.add_row(arm, entry["error"][:60], *[""] * 6)
            continue
        speedup = (f"{thruput['useful_tokens_per_s'] / entry['useful_tokens_per_s']:.2f}x"
                   if "error" not in thruput else "-")
        table.add_row(arm, f"{entry['useful_tokens_per_s']:,.0f}", f"{entry['median_step_s']:.3f}", str(entry["steps"]),
                      f"{entry['padding_ratio']:.1%}", f"{entry['peak_delta_bytes'] / MIB:.0f}",
                      f"{entry['held_out_loss']:.4f}", speedup)
    return table
