"""OffloadAdamW against torch AdamW on the small GPT: memory and step time, same run.

Each arm runs in a fresh spawned process (so peak RSS and the CUDA allocator's peak belong to
that arm alone) on the same model, batch and seed:

* ``torch_adamw``: torch.optim.AdamW; on CUDA fp32 parameters under bf16 autocast (the usual
  mixed-precision setup, 16 B/param of model states), on CPU fp32.
* ``offload_fp32`` / ``offload_bf16`` / ``offload_int8``: OffloadAdamW with those state
  dtypes; on CUDA the model is bf16 on the device.

Reported per arm: median step time (forward + backward + step), process RSS growth and peak RSS
growth over the model's own footprint, the optimizer's measured host bytes against the
planner's prediction, and on CUDA the peak device bytes per parameter. From the planner: the
largest model that fits ``--device-memory`` with plain AdamW and with offload (their ratio).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time
from typing import Any

import psutil
import torch
import torch.nn.functional as F

DESCRIPTION = "small GPT: OffloadAdamW vs torch AdamW, step time, host/device bytes, largest model that fits"

ARMS = ("torch_adamw", "offload_fp32", "offload_bf16", "offload_int8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--d-model", type=int, default=512, help="GPT width")
    parser.add_argument("--n-layers", type=int, default=8, help="GPT layers")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per arm (after 2 warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every arm, alternating order")
    parser.add_argument("--device-memory", default="80GiB", help="GPU memory for the largest-model figure")


def _arm(name: str, shape: dict[str, int], steps: int) -> dict[str, Any]:
    from thruput.memory import OffloadAdamW, plan
    from thruput.models import GPT, GPTConfig

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=shape["vocab"], d_model=shape["d_model"], n_layers=shape["n_layers"],
                          n_heads=max(1, shape["d_model"] // 64), max_seq_len=shape["seq_len"]))
    offload = name.startswith("offload")
    model = model.to(device, torch.bfloat16 if cuda and offload else torch.float32)
    n = sum(p.numel() for p in model.parameters())
    batch = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq_len"] + 1), device=device)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if offload:
        opt = OffloadAdamW(model.parameters(), lr=1e-4, state_dtype=name.removeprefix("offload_"))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(2 + steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=cuda and not offload):
            logits = model(batch[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    out: dict[str, Any] = {
        "params": n, "step_s_median": statistics.median(times),
        "rss_growth_bytes": proc.memory_info().rss - rss0,
        "peak_rss_growth_bytes": max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0),
    }
    if offload:
        out["host_bytes_measured"] = opt.host_bytes()
        out["host_bytes_planned"] = plan(model, device_memory=2**40, host_memory=2**50,
                                         dtype="bf16" if cuda else "fp32", state_dtype=name.removeprefix("offload_"),
                                         device_type=device.type)["offload"].host_bytes
        out["last_timings"] = dict(opt.last_timings)
    else:
        out["state_bytes"] = sum(t.nbytes for s in opt.state.values() for t in s.values()
                                 if torch.is_tensor(t) and t.dim() > 0)
    if cuda:
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated()
        out["device_peak_bytes_per_param"] = out["device_peak_bytes"] / n
        out["device_model_state_bytes_per_param"] = torch.cuda.memory_allocated() / n
    return out


def _run_arm(name: str, shape: dict[str, int], steps: int) -> dict[str, Any]:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_arm, (name, shape, steps))


def _largest(strategy: str, device_memory: int, shape: dict[str, int]) -> int:
    """Largest parameter count (to 1%) whose ``strategy`` fits, by bisection on the planner."""
    from thruput.memory import plan

    def fits(n: float) -> bool:
        return plan(int(n), device_memory=device_memory, host_memory=2**50, dtype="bf16",
                    batch_size=shape["batch"], seq_len=shape["seq_len"])[strategy].fits

    lo, hi = 1e6, 1e13
    if not fits(lo):
        return 0
    while hi / lo > 1.01:
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return int(lo)


def run(args: argparse.Namespace) -> dict:
    from rich.console import Console
    from rich.table import Table

    from thruput.memory import parse_bytes
    from thruput.memory.plan import format_bytes

    shape = {"d_model": args.d_model, "n_layers": args.n_layers, "vocab": args.vocab, "batch": args.batch,
             "seq_len": args.seq_len}
    steps = args.steps
    if args.quick:
        shape.update(d_model=256, n_layers=4, vocab=4096, batch=2, seq_len=128)
        steps = 3
    # Several rounds in alternating order; an arm's step time is its best round's median, so a
    # burst of load from elsewhere on the machine does not decide the ratio. Memory: round one.
    rounds = 1 if args.quick else max(1, args.rounds)
    arms: dict[str, dict[str, Any]] = {}
    for r in range(rounds):
        for name in ARMS if r % 2 == 0 else ARMS[::-1]:
            result = _run_arm(name, shape, steps)
            if name not in arms:
                arms[name] = result
                arms[name]["step_s_rounds"] = []
            arms[name]["step_s_rounds"].append(result["step_s_median"])
    for result in arms.values():
        result["step_s_median"] = min(result["step_s_rounds"])
    ref = arms["torch_adamw"]
    table = Table(title=f"small GPT {ref['params'] / 1e6:.1f}M params, batch {shape['batch']}x{shape['seq_len']}, "
                        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}")
    for col in ("arm", "step ms", "/AdamW", "RSS+", "peak RSS+", "opt. host", "planned", "dev B/p"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for name, r in arms.items():
        r["step_time_vs_adamw"] = r["step_s_median"] / ref["step_s_median"]
        measured = r.get("host_bytes_measured", r.get("state_bytes"))
        table.add_row(name, f"{r['step_s_median'] * 1e3:.1f}", f"{r['step_time_vs_adamw']:.2f}",
                      format_bytes(r["rss_growth_bytes"]), format_bytes(r["peak_rss_growth_bytes"]),
                      format_bytes(measured) + ("" if "host_bytes_measured" in r else " st"),
                      format_bytes(r["host_bytes_planned"]) if "host_bytes_planned" in r else "-",
                      f"{r['device_model_state_bytes_per_param']:.2f}" if "device_peak_bytes" in r else "-")
    device_memory = parse_bytes(args.device_memory)
    largest = {s: _largest(s, device_memory, shape) for s in ("none", "offload")}
    ratio = largest["offload"] / max(1, largest["none"])
    console = Console(width=max(Console().width, 120))  # the table needs the columns
    console.print(table)
    console.print("opt. host: OffloadAdamW.host_bytes() (torch AdamW: its states, 'st'); planned: "
                  "thruput.memory.plan's offload host prediction")
    console.print(f"planner, {args.device_memory} device: largest model with AdamW {largest['none'] / 1e9:.2f}B, "
                  f"with offload {largest['offload'] / 1e9:.2f}B params (ratio {ratio:.1f}x, goal >= 8)")
    return {"arms": arms, "shape": shape, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "offload_fp32_step_time_vs_adamw": arms["offload_fp32"]["step_time_vs_adamw"],
            "host_bytes_planned_vs_measured": {k: (v["host_bytes_planned"], v["host_bytes_measured"])
                                              for k, v in arms.items() if "host_bytes_planned" in v},
            "planner_largest_params": largest, "planner_largest_model_ratio": ratio,
            "device_memory_for_planner": device_memory}
