"""Fused linear cross-entropy against the naive loss, and shape-bucketed compilation against eager.

Cross-entropy: ``thruput.kernels.linear_cross_entropy`` against
``F.cross_entropy(hidden @ W.T, labels)`` at ``tokens x hidden`` with each vocabulary size,
forward+backward, fp32. Every variant runs in its own fresh process (``_kernels_ce_worker``),
so one variant's peak cannot hide inside another's, and the variants alternate in ABBA order
so that drift in machine load hits them alike. Time is the median over all timed passes;
peak memory the largest growth seen. With CUDA the same runs again on the GPU, with
Liger-Kernel as a peer when it is installed; ``--torch-chunked`` adds torch's own chunked
``F.linear_cross_entropy`` (slow on CPU, so opt-in there).

Compilation: a small GPT trained for ``--steps`` steps on the data plane's variable shapes
(stdlib function definitions, packing off, each batch trimmed to its longest row, as a
non-packing trainer does). ``thruput.kernels.compile`` pads to ``--buckets``; eager runs the
trimmed shapes. Both arms start from the same weights, see the same batches and alternate step
by step. ``compile_step_time_ratio`` compares steps that did not compile.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

DESCRIPTION = ("fused CE vs F.cross_entropy(h @ W.T) at 32k/128k vocab (memory goal <= 0.25, time <= 1.1); "
               "bucketed compile: recompiles (goal <= buckets) and step time vs eager")

GIB = 2**30


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per cross-entropy call")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the LM head")
    parser.add_argument("--vocabs", type=_ints, default=(32768, 131072), help="comma-separated vocab sizes")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds of fresh worker processes per vocab")
    parser.add_argument("--torch-chunked", action="store_true",
                        help="also run torch's chunked F.linear_cross_entropy on CPU (minutes at full size)")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the compile comparison")
    parser.add_argument("--seq-len", type=int, default=1024, help="longest row of the compile comparison")
    parser.add_argument("--rows", type=int, default=4, help="rows per batch of the compile comparison")
    parser.add_argument("--buckets", type=_ints, default=(256, 512, 768, 1024), help="sequence-length buckets")
    parser.add_argument("--skip-ce", action="store_true", help="skip the cross-entropy part")
    parser.add_argument("--skip-compile", action="store_true", help="skip the compile part")


# ---------------------------------------------------------------- cross-entropy

def _worker(variant: str, device: str, tokens: int, hidden: int, vocab: int, reps: int) -> dict:
    cmd = [sys.executable, "-m", "thruput.benchmarks._kernels_ce_worker", variant, device,
           str(tokens), str(hidden), str(vocab), str(reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        # e.g. the naive loss killed for memory: report it instead of losing the other figures
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"variant": variant, "error": f"exit status {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _label(vocab: int) -> str:
    return f"{vocab // 1024}k" if vocab % 1024 == 0 else str(vocab)


def ce_figures(device: str, tokens: int, hidden: int, vocab: int, rounds: int, reps: int,
               peers: list[str]) -> dict[str, Any]:
    """Median time and largest peak growth per variant, from ``rounds`` ABBA rounds of fresh processes."""
    variants = ["naive", "thruput", *peers]
    times: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, list[int]] = {v: [] for v in variants}
    losses: dict[str, float] = {}  # same inputs in every process: the losses must agree
    errors: dict[str, str] = {}
    for r in range(rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            if v in errors:
                continue
            res = _worker(v, device, tokens, hidden, vocab, reps)
            if "error" in res:
                errors[v] = res["error"]
                continue
            times[v] += res["times_s"]
            peaks[v].append(res["peak_delta_bytes"])
            losses[v] = res["loss"]
    out: dict[str, Any] = {"device": device, "tokens": tokens, "hidden": hidden, "vocab": vocab,
                           "rounds": rounds, "reps_per_process": reps, "variants": {}}
    for v in variants:
        if v in errors:
            out["variants"][v] = {"error": errors[v]}
        else:
            out["variants"][v] = {"median_time_s": statistics.median(times[v]), "times_s": times[v],
                                  "peak_delta_bytes": max(peaks[v]), "loss": losses[v]}
    return out


def _ratio(fig: dict, num: str, den: str, key: str) -> float | None:
    a, b = fig["variants"].get(num, {}), fig["variants"].get(den, {})
    return a[key] / b[key] if key in a and key in b else None


def run_ce(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    tokens, hidden = (1024, 256) if args.quick else (args.tokens, args.hidden)
    rounds = 2 if args.quick else args.rounds
    devices = [("cpu", "")]
    if torch.cuda.is_available():
        devices.append(("cuda", "cuda_"))
    result: dict[str, Any] = {"ce": {}}
    table = Table(title=f"linear cross-entropy, fwd+bwd fp32, {tokens} tokens x hidden {hidden}")
    for col in ("device", "vocab", "variant", "median s", "peak GiB", "time / naive", "peak / naive"):
        table.add_column(col, justify="right")
    for device, prefix in devices:
        peers = []
        if device == "cuda" and importlib.util.find_spec("liger_kernel") is not None:
            peers.append("liger")
        if hasattr(torch.nn, "LinearCrossEntropyOptions") and (device == "cuda" or args.torch_chunked):
            peers.append("torch_chunked")
        for vocab in args.vocabs:
            # one timed pass per process where a pass takes a minute (128k on CPU), two otherwise
            reps = 1 if device == "cpu" and tokens * hidden * vocab >= 2**40 else 2
            fig = ce_figures(device, tokens, hidden, vocab, rounds, reps, peers)
            label = _label(vocab)
            result["ce"][f"{prefix}{label}"] = fig
            result[f"{prefix}ce_peak_memory_ratio_{label}"] = _ratio(fig, "thruput", "naive", "peak_delta_bytes")
            result[f"{prefix}ce_time_ratio_{label}"] = _ratio(fig, "thruput", "naive", "median_time_s")
            for peer in peers:
                result[f"{prefix}ce_time_ratio_vs_{peer}_{label}"] = _ratio(fig, "thruput", peer, "median_time_s")
                result[f"{prefix}ce_peak_memory_ratio_vs_{peer}_{label}"] = _ratio(
                    fig, "thruput", peer, "peak_delta_bytes")
            for v, entry in fig["variants"].items():
                if "error" in entry:
                    table.add_row(device, label, v, entry["error"][:40], "", "", "")
                    continue
                t, p = _ratio(fig, v, "naive", "median_time_s"), _ratio(fig, v, "naive", "peak_delta_bytes")
                table.add_row(device, label, v, f"{entry['median_time_s']:.3f}", f"{entry['peak_delta_bytes'] / GIB:.3f}",
                              "-" if t is None else f"{t:.3f}", "-" if p is None else f"{p:.3f}")
    console.print(table)
    return result


# ---------------------------------------------------------------- compilation

def _batches(steps: int, seq_len: int, rows: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``steps`` batches of stdlib function definitions, packing off, trimmed to the longest row."""
    from thruput.data import JsonlSource, Loader, Plan
    from thruput.data.corpus import stdlib_definitions

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = stdlib_definitions(400, directory=Path(tmp))
        plan = Plan([JsonlSource("functions", paths["functions"])], seq_len=seq_len,
                    tokens_per_batch=seq_len * rows, packing=False, seed=0)
        with Loader(plan, backend="inline", steps=steps) as loader:
            for batch in loader:
                # packing off: one document piece per row, left-aligned, padding after it
                t = max(doc[4] for doc in batch["documents"])
                out.append(tuple(batch[k][:, :t].contiguous() for k in ("input_ids", "position_ids", "labels")))
    return out


def run_compile(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    from thruput.kernels import compile as bucketed_compile
    from thruput.models import GPT, GPTConfig

    steps = 40 if args.quick else args.steps
    seq_len, buckets = (512, (128, 256, 512)) if args.quick else (args.seq_len, args.buckets)
    batches = _batches(steps, seq_len, args.rows)
    torch._dynamo.reset()
    torch.manual_seed(0)
    width, layers = (64, 2) if args.quick else (128, 4)
    eager_model = GPT(GPTConfig(vocab_size=256, d_model=width, n_layers=layers, n_heads=4, max_seq_len=seq_len))
    compiled_model = copy.deepcopy(eager_model)

    def loss_of(model: GPT):
        def loss(input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids, position_ids)
            return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return loss

    arms = {"eager": (loss_of(eager_model), torch.optim.AdamW(eager_model.parameters(), lr=1e-3)),
            "compiled": (bucketed_compile(loss_of(compiled_model), buckets=buckets),
                         torch.optim.AdamW(compiled_model.parameters(), lr=1e-3))}
    compiled = arms["compiled"][0]
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    losses: dict[str, list[float]] = {"eager": [], "compiled": []}
    compiling_steps: set[int] = set()
    for i, batch in enumerate(batches):
        for name in ("eager", "compiled") if i % 2 == 0 else ("compiled", "eager"):
            fn, opt = arms[name]
            before = compiled.stats()["compiles"]
            t0 = time.perf_counter()
            loss = fn(*batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
            losses[name].append(loss.item())
            if name == "compiled" and compiled.stats()["compiles"] > before:
                compiling_steps.add(i)
    stats = compiled.stats()
    steady = [i for i in range(len(batches)) if i not in compiling_steps]
    med = {k: statistics.median(times[k][i] for i in steady) for k in times}
    lengths = [b[0].shape[1] for b in batches]
    result = {
        "recompiles": stats["recompiles"],
        "buckets": len(buckets),
        "bucket_lengths": list(buckets),
        "compile_steps": len(batches),
        "distinct_sequence_lengths": len(set(lengths)),
        "compile_step_time_ratio": med["compiled"] / med["eager"],
        "compile_total_time_ratio": sum(times["compiled"]) / sum(times["eager"]),
        "compile_median_step_s": med,
        "compile_time_s": stats["compile_time_s"],
        "compile_graphs": stats["graphs"],
        "compile_padding_fraction": stats["padding_fraction"],
        "compile_fallback": stats["fallback"],
        "compile_final_loss": {k: v[-1] for k, v in losses.items()},
        "compile_model": {"d_model": width, "n_layers": layers, "rows": args.rows, "seq_len": seq_len},
    }
    table = Table(title=f"small GPT ({width}x{layers}), {len(batches)} steps, {len(set(lengths))} distinct lengths, "
                        f"buckets {list(buckets)}")
    for col in ("arm", "median step ms", "total s", "final loss"):
        table.add_column(col, justify="right")
    for k in times:
        table.add_row(k, f"{med[k] * 1e3:.1f}", f"{sum(times[k]):.1f}", f"{losses[k][-1]:.4f}")
    console.print(table)
    console.print(f"recompiles {stats['recompiles']} (goal <= {len(buckets)} buckets), compile time "
                  f"{stats['compile_time_s']:.1f} s, padding {stats['padding_fraction']:.1%}, "
                  f"step time compiled/eager {result['compile_step_time_ratio']:.3f}"
                  + (f", FELL BACK TO EAGER: {stats['fallback']}" if stats["fallback"] else ""))
    return result


def run(args: argparse.Namespace) -> dict:
    console = Console()
    result: dict[str, Any] = {"quick": bool(args.quick), "torch": torch.__version__,
                              "threads": torch.get_num_threads()}
    if not args.skip_ce:
        result.update(run_ce(args, console))
    if not args.skip_compile:
        result.update(run_compile(args, console))
    return result
