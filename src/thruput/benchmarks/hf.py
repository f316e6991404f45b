"""A transformers Llama on packed rows: ``thruput.hf.patch`` against the unpatched model.

One forward+backward step of a small Llama (4 layers x 256 hidden, vocab 32k) on ``--rows`` x
``--seq-len`` packed rows of documents (median ~200 tokens, see ``_hf_worker.packed_batch``).
The peers are the unpatched model with ``sdpa`` and with ``eager`` attention, both given the
batch through ``hf_batch`` so that transformers' own packed-sequence handling keeps attention
inside documents (a dense block-diagonal mask) and its loss sees every target. ``thruput`` is
``patch(model)``; ``thruput_loss`` and ``thruput_attention`` have one lever each. Every variant
runs in a fresh process, in ABBA order over ``--rounds``; time is the median over all timed
passes, peak memory the largest growth seen. All variants compute the same loss.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

import torch
from rich.table import Table

from thruput.console import make_console

DESCRIPTION = "transformers Llama on packed rows: patch(model) vs unpatched sdpa and eager (time, peak memory)"
VARIANTS = ("sdpa", "eager", "thruput", "thruput_loss", "thruput_attention")
MIB = 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=4, help="packed rows per batch")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds of fresh processes")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per process")


def _worker(variant: str, device: str, rows: int, seq_len: int, reps: int) -> dict:
    cmd = [sys.executable, "-m", "thruput.benchmarks._hf_worker", variant, device, str(rows), str(seq_len),
           str(reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"variant": variant, "error": f"exit status {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def figures(device: str, rows: int, seq_len: int, rounds: int, reps: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    peaks: dict[str, list[int]] = {v: [] for v in VARIANTS}
    found: dict[str, dict] = {}
    for r in range(rounds):
        for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            res = _worker(v, device, rows, seq_len, reps)
            if "error" in res:
                found[v] = res
                continue
            times[v] += res["times_s"]
            cpu_times[v] += res["cpu_times_s"]
            peaks[v].append(res["peak_delta_bytes"])
            found.setdefault(v, res)
    out: dict[str, Any] = {"device": device, "rows": rows, "seq_len": seq_len, "rounds": rounds, "reps": reps,
                           "variants": {}}
    for v in VARIANTS:
        if "error" in found.get(v, {"error": "not run"}):
            out["variants"][v] = {"error": found.get(v, {}).get("error", "not run")}
            continue
        out["variants"][v] = {"median_time_s": statistics.median(times[v]), "times_s": times[v],
                              "median_cpu_time_s": statistics.median(cpu_times[v]),
                              "peak_delta_bytes": max(peaks[v]), "loss": found[v]["loss"],
                              "documents": found[v]["documents"]}
    return out


def run(args: argparse.Namespace) -> dict:
    rows, seq_len, rounds, reps = (2, 512, 1, 1) if args.quick else (args.rows, args.seq_len, args.rounds, args.reps)
    console = make_console()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    result: dict[str, Any] = {"quick": bool(args.quick), "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "runs": {}}
    table = Table(title=f"Llama 4x256, vocab 32k, fwd+bwd fp32, {rows} packed rows x {seq_len}")
    for col in ("device", "variant", "median s", "cpu s", "peak MiB", "time / sdpa", "cpu / sdpa", "peak / sdpa",
                "loss"):
        table.add_column(col, justify="right")
    for device in devices:
        fig = figures(device, rows, seq_len, rounds, reps)
        result["runs"][device] = fig
        base = fig["variants"]["sdpa"]
        for v, entry in fig["variants"].items():
            if "error" in entry:
                table.add_row(device, v, entry["error"][:40], *[""] * 7)
                continue
            ratios = {k: entry[k] / base[k] if k in base else None
                      for k in ("median_time_s", "median_cpu_time_s", "peak_delta_bytes")}
            result[f"{device}_{v}_time_ratio_vs_sdpa"] = ratios["median_time_s"]
            result[f"{device}_{v}_cpu_time_ratio_vs_sdpa"] = ratios["median_cpu_time_s"]
            result[f"{device}_{v}_peak_ratio_vs_sdpa"] = ratios["peak_delta_bytes"]
            table.add_row(device, v, f"{entry['median_time_s']:.3f}", f"{entry['median_cpu_time_s']:.3f}",
                          f"{entry['peak_delta_bytes'] / MIB:.0f}",
                          *("-" if r is None else f"{r:.3f}" for r in ratios.values()), f"{entry['loss']:.4f}")
    console.print(table)
    return result
