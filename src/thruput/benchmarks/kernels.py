"""Fused linear cross-entropy against torch's native op and the naive loss; bucketed compile against eager.

Cross-entropy, forward + backward, fp32, ``tokens x hidden`` for every vocabulary and hidden
size. The peers: torch's native ``F.linear_cross_entropy`` chunked at thruput's chunk rows
(``native``: the same memory bound, the strongest peer), the same op with
``LinearCrossEntropyOptions()`` as it comes (``native_default``), and
``F.cross_entropy(hidden @ W.T, labels)`` (``naive``; torch's op with ``options=None`` runs this
same reference path). With CUDA, also thruput's Triton rows, Liger-Kernel and cut-cross-entropy
where installed (on CPU they are recorded as not run). ``thruput`` is
``linear_cross_entropy(impl="auto")``: the implementation its measured rule picks for the shape.
Every variant runs in its own fresh process (``_kernels_ce_worker``), so one variant's peak
cannot hide inside another's, and the variants alternate in ABBA order so that drift in machine
load hits them alike. Time is the median over all timed passes (the per-round ratio range is the
spread); peak memory the largest growth seen; the load average is recorded per shape.

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
import os
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

from thruput.console import make_console

DESCRIPTION = ("fused CE vs torch's native F.linear_cross_entropy and the naive loss at 32k/128k vocab "
               "(goal: time and peak <= 1.0 of native); bucketed compile: recompiles (goal <= buckets) and step time")

GIB = 2**30


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per cross-entropy call")
    parser.add_argument("--hiddens", type=_ints, default=(1024, 2048), help="comma-separated LM-head hidden sizes")
    parser.add_argument("--vocabs", type=_ints, default=(32768, 131072), help="comma-separated vocab sizes")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds of fresh worker processes per shape")
    parser.add_argument("--variants", type=lambda t: tuple(t.split(",")), default=None,
                        help="comma-separated cross-entropy variants to run (default: all; native is always run)")
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


def auto_resolves_to(device: str, vocab: int, hidden: int) -> str:
    """The variant ``linear_cross_entropy(impl="auto")`` runs for this benchmark's inputs (fp32,
    int64 labels, no smoothing or z-loss, some labels kept)."""
    from thruput.kernels._ce_auto import auto_impl, triton_rows

    has_triton = True
    if device == "cuda":
        try:
            triton_rows()
        except ImportError:
            has_triton = False
    choice = auto_impl(device_type=device, vocab=vocab, hidden_size=hidden, native_ok=True, has_triton=has_triton)
    return {"native": "native", "torch": "thruput_kernel", "triton": "thruput_triton"}[choice]


def ce_figures(device: str, tokens: int, hidden: int, vocab: int, rounds: int, reps: int,
               variants: list[str]) -> dict[str, Any]:
    """Median time and largest peak growth per variant, from ``rounds`` ABBA rounds of fresh processes.

    ``thruput`` (``impl="auto"``) is not run separately: it is the variant the rule resolves to,
    so its row is that variant's, and its ratio to that variant is 1 by construction.
    """
    auto = auto_resolves_to(device, vocab, hidden)
    variants = variants if auto in variants else [*variants, auto]
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, list[int]] = {v: [] for v in variants}
    per_round: dict[str, list[float]] = {v: [] for v in variants}  # median time of each round
    losses: dict[str, float] = {}  # same inputs in every process: the losses must agree
    errors: dict[str, str] = {}
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            if v in errors:
                continue
            res = _worker(v, device, tokens, hidden, vocab, reps)
            if "error" in res:
                errors[v] = res["error"]
                continue
            times[v] += res["times_s"]
            cpu[v] += res["cpu_times_s"]
            per_round[v].append(statistics.median(res["times_s"]))
            peaks[v].append(res["peak_delta_bytes"])
            losses[v] = res["loss"]
        load.append(os.getloadavg()[0])
    out: dict[str, Any] = {"device": device, "tokens": tokens, "hidden": hidden, "vocab": vocab,
                           "rounds": rounds, "reps_per_process": reps, "load_average_1min": load,
                           "auto_resolves_to": auto, "variants": {}}
    for v in variants:
        if v in errors:
            out["variants"][v] = {"error": errors[v]}
        else:
            out["variants"][v] = {"median_time_s": statistics.median(times[v]), "times_s": times[v],
                                  "median_cpu_time_s": statistics.median(cpu[v]), "round_times_s": per_round[v],
                                  "peak_delta_bytes": max(peaks[v]), "loss": losses[v]}
    out["variants"]["thruput"] = {**out["variants"][out["auto_resolves_to"]], "same_as": out["auto_resolves_to"]}
    return out


def _ratio(fig: dict, num: str, den: str, key: str) -> float | None:
    a, b = fig["variants"].get(num, {}), fig["variants"].get(den, {})
    if num == "thruput" and a.get("same_as") == den:
        return 1.0  # the same implementation: auto chose the peer
    return a[key] / b[key] if key in a and key in b else None


def _round_spread(fig: dict, num: str, den: str) -> list[float] | None:
    """Smallest and largest per-round time ratio (ABBA rounds pair the two arms in time)."""
    a, b = fig["variants"].get(num, {}), fig["variants"].get(den, {})
    if num == "thruput" and a.get("same_as") == den:
        return [1.0, 1.0]
    if "round_times_s" not in a or "round_times_s" not in b:
        return None
    ratios = [x / y for x, y in zip(a["round_times_s"], b["round_times_s"])]
    return [min(ratios), max(ratios)] if ratios else None


# Row order of the table: the strongest peer first, then thruput, then the rest.
_ROW_ORDER = ("native", "cce", "liger", "thruput", "thruput_triton", "thruput_kernel", "native_default", "naive")
_NEEDS_CUDA = {"thruput_triton": "thruput's Triton row kernel", "liger": "Liger-Kernel", "cce": "cut-cross-entropy"}


def _cuda_peers() -> list[str]:
    peers = ["thruput_triton"]
    if importlib.util.find_spec("liger_kernel") is not None:
        peers.append("liger")
    if importlib.util.find_spec("cut_cross_entropy") is not None:
        peers.append("cce")
    return peers


def run_ce(args: argparse.Namespace, console: Console) -> dict[str, Any]:
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise SystemExit(f"bench kernels: torch {torch.__version__} has no native F.linear_cross_entropy "
                         "(the peer); it needs torch 2.13 or later")
    tokens, hiddens = (1024, (128, 256)) if args.quick else (args.tokens, args.hiddens)
    rounds = 2 if args.quick else args.rounds
    devices = [("cpu", "")]
    if torch.cuda.is_available():
        devices.append(("cuda", "cuda_"))
    result: dict[str, Any] = {"ce": {}, "ce_uptime_before": _uptime()}
    if not torch.cuda.is_available():
        result["ce_not_run"] = {v: f"not run: needs CUDA ({name})" for v, name in _NEEDS_CUDA.items()}
    table = Table(title=f"linear cross-entropy, fwd+bwd fp32, {tokens} tokens; time and peak relative to "
                        "torch's native F.linear_cross_entropy at the same chunk rows")
    for col in ("device", "vocab", "hidden", "variant", "median s", "peak GiB", "time / native",
                "round spread", "peak / native", "time / naive", "peak / naive"):
        table.add_column(col, justify="right")
    for device, prefix in devices:
        variants = ["native", "native_default", "thruput_kernel", "naive"]
        if device == "cuda":
            variants[3:3] = _cuda_peers()
        if args.variants:
            variants = [v for v in variants if v in args.variants or v == "native"]
        for vocab in args.vocabs:
            label = _label(vocab)
            worst: dict[str, float] = {}
            for hidden in hiddens:
                # one timed pass per process where a pass takes a minute on CPU, two otherwise
                reps = 1 if device == "cpu" and tokens * hidden * vocab >= 2**40 else 2
                fig = ce_figures(device, tokens, hidden, vocab, rounds, reps, variants)
                shape = f"{label}_d{hidden}"
                result["ce"][f"{prefix}{shape}"] = fig
                figures = {
                    "ce_time_vs_native": _ratio(fig, "thruput", "native", "median_time_s"),
                    "ce_peak_memory_vs_native": _ratio(fig, "thruput", "native", "peak_delta_bytes"),
                    "ce_time_vs_native_default": _ratio(fig, "thruput", "native_default", "median_time_s"),
                    "ce_peak_memory_vs_native_default": _ratio(fig, "thruput", "native_default", "peak_delta_bytes"),
                    "ce_time_ratio": _ratio(fig, "thruput", "naive", "median_time_s"),
                    "ce_peak_memory_ratio": _ratio(fig, "thruput", "naive", "peak_delta_bytes"),
                    "ce_kernel_time_vs_native": _ratio(fig, "thruput_kernel", "native", "median_time_s"),
                }
                for peer in variants:
                    if peer in _NEEDS_CUDA and peer != "thruput_triton":
                        figures[f"ce_time_vs_{peer}"] = _ratio(fig, "thruput", peer, "median_time_s")
                        figures[f"ce_peak_memory_vs_{peer}"] = _ratio(fig, "thruput", peer, "peak_delta_bytes")
                result[f"{prefix}ce_time_vs_native_round_spread_{shape}"] = _round_spread(fig, "thruput", "native")
                for key, value in figures.items():
                    result[f"{prefix}{key}_{shape}"] = value
                    if value is not None:
                        worst[key] = max(worst.get(key, value), value)
                _add_rows(table, device, label, hidden, fig)
                done = ", ".join(f"{v} {e['median_time_s']:.2f} s" for v, e in fig["variants"].items()
                                 if "median_time_s" in e and v != "thruput")
                console.print(f"{device} {shape}: {done} (load {fig['load_average_1min'][-1]:.1f})")
            for key, value in worst.items():  # the headline: the worst hidden size of this vocabulary
                result[f"{prefix}{key}_{label}"] = value
    result["ce_uptime_after"] = _uptime()
    console.print(table)
    console.print("thruput = linear_cross_entropy(impl='auto'): its row is the implementation the rule picks "
                  "(\"= native\": torch's op, ratio 1 by construction); thruput_kernel = thruput's own chunked kernel")
    for v, why in result.get("ce_not_run", {}).items():
        console.print(f"{v}: {why}")
    console.print(f"load: {result['ce_uptime_before']} -> {result['ce_uptime_after']}")
    return result


def _add_rows(table: Table, device: str, label: str, hidden: int, fig: dict) -> None:
    for v in _ROW_ORDER:
        entry = fig["variants"].get(v)
        if entry is None:
            continue
        name = f"{v} (= {entry['same_as']})" if "same_as" in entry else v
        if "error" in entry:
            table.add_row(device, label, str(hidden), name, entry["error"][:40], *[""] * 6)
            continue
        cells = []
        for den, key in (("native", "median_time_s"), (None, None), ("native", "peak_delta_bytes"),
                         ("naive", "median_time_s"), ("naive", "peak_delta_bytes")):
            if den is None:
                spread = _round_spread(fig, v, "native")
                cells.append("-" if spread is None else f"{spread[0]:.2f}-{spread[1]:.2f}")
                continue
            r = _ratio(fig, v, den, key)
            cells.append("-" if r is None else f"{r:.3f}")
        table.add_row(device, label, str(hidden), name, f"{entry['median_time_s']:.3f}",
                      f"{entry['peak_delta_bytes'] / GIB:.3f}", *cells)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


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
                out.append(tuple(batch[k][:, :t].contiguous() for k in ("input_ids", "position_ids", "shift_labels")))
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
    console = make_console()
    result: dict[str, Any] = {"quick": bool(args.quick), "torch": torch.__version__,
                              "threads": torch.get_num_threads()}
    if not args.skip_ce:
        result.update(run_ce(args, console))
    if not args.skip_compile:
        result.update(run_compile(args, console))
    return result
