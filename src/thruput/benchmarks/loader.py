"""The data plane against a packed torch DataLoader, the pad-to-longest DataLoader and torchdata.

Four JSONL sources whose preprocessing costs 1x, 3x, 7x and 20x per token, with long-tailed
document lengths, feed a consumer that simulates a fixed accelerator time per token (padding
included: a padded token costs the same compute). Every loader gets the same ``--workers``
processes. The peers:

* ``packed_peer`` (the strongest): torch ``DataLoader`` with transformers'
  ``DataCollatorWithFlattening`` (padding-free ``[1, tokens]`` rows, ``position_ids`` per
  document) and a batch sampler that gives every source its weight's share of each step's
  tokens, as thruput's plan does (same sources, same weights, same tokens per step);
* ``torch_dataloader``: ``WeightedRandomSampler`` for the mixture and a pad-to-longest collate;
* ``torchdata``: ``StatefulDataLoader`` with the same dataset and collate.

thruput packs rows and autoscales its per-source workers within the same process budget.

The compute time per token is chosen so that a well-fed consumer is compute-bound: a probe first
measures how many mixture tokens/s ``--workers`` always-busy processes preprocess on this machine
now (wall clock, so it sees what other load leaves over), and the consumer is made ``--headroom``
times slower than that (default 3: the workers need a third of what they can get to keep up a
packed stream). On an idle machine this is about ``headroom * mixture CPU s/token / CPUs``;
with less headroom the benchmark drifts toward measuring how the peers share a CPU shortage.
Each peer runs in a fresh process, measured after ``--warmup`` batches (worker start-up and
autoscaling; ``startup_s`` reports the time to the first batch); a sampler in this process records
the peak summed PSS of it and its children.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import psutil
from rich.table import Table

from thruput.benchmarks._loader_workload import (
    SOURCES,
    make_sources,
    preprocessing_capacity,
    seconds_per_token,
    write_corpus,
)
from thruput.console import make_console

DESCRIPTION = ("useful tokens/s, stall, padding, memory: thruput vs a packed DataLoader (goal >= 1.0x), "
               "pad-to-longest DataLoader (goal >= 1.5x) and torchdata")
PEERS = ("packed_peer", "thruput", "torch_dataloader", "torchdata")  # run (and table) order
GOALS = {"stall_fraction_max": 0.02, "speedup_min": 1.5, "speedup_vs_packed_peer_min": 1.0,
         "padding_ratio_max": 0.01}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=25.0, help="measured seconds per peer")
    parser.add_argument("--workers", type=int, default=6, help="worker processes per peer (thruput: its budget)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per row")
    parser.add_argument("--rows", type=int, default=16, help="rows per batch")
    parser.add_argument("--docs", type=int, default=3000, help="documents per source")
    parser.add_argument("--unit-rounds", type=int, default=128, help="case-folding passes of the 1x source")
    parser.add_argument("--headroom", type=float, default=3.0, help="probed preprocessing capacity over consumer demand")
    parser.add_argument("--warmup", type=int, default=10, help="batches consumed before measuring")
    parser.add_argument("--compute-us-per-token", type=float, default=None, help="override the chosen compute time")
    parser.add_argument("--seed", type=int, default=0)


class PeakMemory:
    """Peak summed PSS (RSS where PSS is unreadable) of process ``pid`` and all its descendants."""

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)
        self._thread.start()

    @staticmethod
    def _bytes(proc: psutil.Process) -> int:
        try:
            return int(proc.memory_full_info().pss)
        except (psutil.AccessDenied, AttributeError):
            return int(proc.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for proc in procs:
                try:
                    total += self._bytes(proc)
                except psutil.NoSuchProcess:
                    continue  # a worker that exited between listing and reading
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _run_peer(cfg: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Measure one peer in a fresh interpreter; raises ``RuntimeError`` with its stderr on failure."""
    cfg_path, out_path = folder / f"{cfg['peer']}.cfg.json", folder / f"{cfg['peer']}.out.json"
    cfg_path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "thruput.benchmarks._loader_workload", str(cfg_path), str(out_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    memory = PeakMemory(proc.pid)
    try:
        _, err = proc.communicate(timeout=cfg["seconds"] + 300)
    finally:
        if proc.poll() is None:
            proc.kill()
        peak = memory.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"loader benchmark: peer {cfg['peer']} failed (exit {proc.returncode}):\n{err[-4000:]}")
    raw = json.loads(out_path.read_text())
    raw["peak_memory_bytes"] = peak
    return raw


def _figures(raw: dict[str, Any]) -> dict[str, Any]:
    out = {
        "useful_tokens_per_s": raw["useful_tokens"] / raw["seconds"],
        "stall_fraction": raw["wait_s"] / raw["seconds"],
        "padding_ratio": 1.0 - raw["useful_tokens"] / raw["total_tokens"],
        "peak_memory_bytes": raw["peak_memory_bytes"],
    }
    extra = ("batches", "seconds", "startup_s", "worker_processes", "workers_per_source", "cpu_s_per_token")
    return {**out, **{k: raw[k] for k in extra if k in raw}}


def run(args: argparse.Namespace) -> dict:
    seconds, docs, warmup = (3.0, 400, 3) if args.quick else (args.seconds, args.docs, max(args.warmup, 1))
    if args.workers < len(SOURCES):
        raise SystemExit(f"bench loader: --workers must be >= {len(SOURCES)} (one per source), got {args.workers}")
    if args.headroom <= 0 or seconds <= 0:
        raise SystemExit("bench loader: --headroom and --seconds must be > 0")
    weights = [1.0 / len(SOURCES)] * len(SOURCES)
    cpus = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
               args.workers)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="thruput-bench-loader-") as tmp:
        folder = Path(tmp)
        write_corpus(folder, docs, max_len=16 * args.seq_len, seed=args.seed)
        sources = make_sources(folder, args.unit_rounds, weights)
        budget = 20_000 if args.quick else 100_000
        cost = {s.name: seconds_per_token(s, budget) for s in sources}
        mix_cost = sum(w * cost[s.name] for w, s in zip(weights, sources))
        capacity = preprocessing_capacity(folder, args.unit_rounds, weights, args.workers, 1.5 if args.quick else 3.0)
        if args.compute_us_per_token is not None:
            s_per_token = args.compute_us_per_token * 1e-6
        else:
            s_per_token = args.headroom / capacity
        base = {"dir": tmp, "unit_rounds": args.unit_rounds, "weights": weights, "seq_len": args.seq_len,
                "rows": args.rows, "workers": args.workers, "s_per_token": s_per_token, "warmup": warmup,
                "seconds": seconds, "seed": args.seed}
        results = {peer: _figures(_run_peer({**base, "peer": peer}, folder)) for peer in PEERS}
    thr = results["thruput"]
    speedup = thr["useful_tokens_per_s"] / results["torch_dataloader"]["useful_tokens_per_s"]
    speedup_packed = thr["useful_tokens_per_s"] / results["packed_peer"]["useful_tokens_per_s"]
    met = {
        "stall_fraction": thr["stall_fraction"] <= GOALS["stall_fraction_max"],
        "speedup": speedup >= GOALS["speedup_min"],
        "speedup_vs_packed_peer": speedup_packed >= GOALS["speedup_vs_packed_peer_min"],
        "padding_ratio": thr["padding_ratio"] <= GOALS["padding_ratio_max"],
    }
    workload = {
        "sources": {name: {"cost_factor": f, "preprocess_cpu_s_per_token": cost[name]} for name, f in SOURCES},
        "mixture_preprocess_cpu_s_per_token": mix_cost, "cpus": cpus,
        "idle_capacity_tokens_per_s": cpus / mix_cost, "probed_capacity_tokens_per_s": capacity,
        "headroom": args.headroom,
        "compute_s_per_token": s_per_token, "seq_len": args.seq_len, "rows_per_batch": args.rows,
        "worker_processes": args.workers, "docs_per_source": docs, "measured_seconds": seconds,
        "warmup_batches": warmup, "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }
    _print(results, speedup, speedup_packed, workload)
    return {"speedup_vs_packed_peer": speedup_packed, "speedup_vs_torch": speedup, **results, "goals": GOALS,
            "goals_met": met, "workload": workload}


def _print(results: dict[str, dict[str, Any]], speedup: float, speedup_packed: float, workload: dict[str, Any]) -> None:
    table = Table(title=(f"loader: {workload['rows_per_batch']}x{workload['seq_len']} tokens/batch, "
                         f"{workload['worker_processes']} workers, "
                         f"{workload['compute_s_per_token'] * 1e6:.2f} us compute/token"))
    table.add_column("peer", no_wrap=True)
    for col in ("useful tok/s", "stall", "padding", "peak MiB", "batches", "startup s"):
        table.add_column(col, justify="right")
    for peer, r in results.items():
        table.add_row(peer, f"{r['useful_tokens_per_s']:,.0f}", f"{r['stall_fraction']:.3f}",
                      f"{r['padding_ratio']:.3f}", f"{r['peak_memory_bytes'] / 2**20:,.0f}",
                      str(r["batches"]), f"{r['startup_s']:.1f}")
    console = make_console()
    console.print(table)
    costs = ", ".join(f"{n} {v['preprocess_cpu_s_per_token'] * 1e6:.2f}" for n, v in workload["sources"].items())
    console.print(f"preprocessing CPU us/token: {costs}")
    console.print(f"thruput workers per source: {results['thruput'].get('workers_per_source')}")
    console.print(f"load average before/after: {workload['load_average_before'][0]:.1f} / "
                  f"{workload['load_average_after'][0]:.1f} on {os.cpu_count()} CPUs")
    console.print(f"speedup_vs_packed_peer (useful tokens/s): {speedup_packed:.3f}x  "
                  f"(goal >= {GOALS['speedup_vs_packed_peer_min']})")
    console.print(f"speedup_vs_torch (useful tokens/s): {speedup:.2f}x  (goal >= {GOALS['speedup_min']})")
