"""OffloadAdamW against torch AdamW on the small GPT: memory and step time, same run.

Arms, on the same model, batch and seed:

* ``torch_adamw``: torch.optim.AdamW; on CUDA fp32 parameters under bf16 autocast (the usual
  mixed-precision setup, 16 B/param of model states), on CPU fp32.
* ``offload_fp32`` / ``offload_bf16`` / ``offload_int8``: OffloadAdamW with those state
  dtypes; on CUDA the model is bf16 on the device.

Memory is measured per arm in a fresh spawned process (so peak RSS and the CUDA allocator's
peak belong to that arm alone). Times come from one process holding all arms, interleaved step
by step in rotating order: on a shared machine, load from elsewhere stalls torch's OpenMP
threads (a forward of the quick model swings between 35 and 750 ms), and separate processes
per arm let such bursts land on one arm only.

Reported per arm: median step time and its phases (forward, backward, optimizer step), the CPU
kernel that ran (``--impl cpp``, the default, fails rather than time the pure-torch fallback,
which is two orders of magnitude slower for bf16/int8 states), process RSS growth, the
optimizer's measured host bytes against the planner's prediction, and on CUDA the device bytes
measured by the allocator (``torch.cuda.memory_allocated`` after a step: the resident model
states; ``max_memory_allocated``: the peak with activations) against the planner's prediction.

From the planner: the largest model that fits ``--device-memory`` with plain AdamW and with
offload, bf16 training, at the benchmark's batch and sequence length, with activation
checkpointing off and on (both arms always with the same activation assumption). The model
states alone bound the ratio at 16 / 2 = 8; activations, which grow with the model's width and
depth, and the gradient bucket in flight are device memory both arms need, so the ratio is
below 8 and approaches it as activations shrink (checkpointing, smaller batches).
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
PHASES = ("forward", "backward", "optimizer")
MODEL_STATE_BOUND = 16 / 2  # B/param of mixed-precision AdamW on the device / with offload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--d-model", type=int, default=384, help="GPT width")
    parser.add_argument("--n-layers", type=int, default=6, help="GPT layers")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size")
    parser.add_argument("--batch", type=int, default=4, help="rows per step (also the planner's batch)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row (also the planner's)")
    parser.add_argument("--steps", type=int, default=8, help="measured steps per arm (after 2 warm-up)")
    parser.add_argument("--impl", choices=("cpp", "auto", "torch"), default="cpp",
                        help="OffloadAdamW's CPU kernel; cpp fails if the extension cannot be built")
    parser.add_argument("--device-memory", default="80GiB", help="GPU memory for the largest-model figure")


def _sync(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()


def _build(name: str, shape: dict[str, int], impl: str) -> tuple[Any, Any, torch.Tensor]:
    """(model, optimizer, batch) of one arm, seeded identically for every arm."""
    from thruput.memory import OffloadAdamW
    from thruput.models import GPT, GPTConfig

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=shape["vocab"], d_model=shape["d_model"], n_layers=shape["n_layers"],
                          n_heads=max(1, shape["d_model"] // 64), max_seq_len=shape["seq_len"]))
    offload = name.startswith("offload")
    model = model.to("cuda" if cuda else "cpu", torch.bfloat16 if cuda and offload else torch.float32)
    batch = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq_len"] + 1),
                          device=next(model.parameters()).device)
    if offload:
        opt = OffloadAdamW(model.parameters(), lr=1e-4, state_dtype=name.removeprefix("offload_"), impl=impl)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt, batch


def _step(model: Any, opt: Any, batch: torch.Tensor, offload: bool) -> tuple[float, float, float]:
    """One training step; seconds of (forward, backward, optimizer step + zero_grad)."""
    cuda = batch.is_cuda
    t0 = _sync(cuda)
    with torch.autocast(batch.device.type, torch.bfloat16, enabled=cuda and not offload):
        logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
    t1 = _sync(cuda)
    loss.backward()
    del logits, loss
    t2 = _sync(cuda)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, _sync(cuda) - t2


def _arm_memory(name: str, shape: dict[str, int], impl: str) -> dict[str, Any]:
    """Memory of one arm over three steps, in its own process: RSS, host bytes, device bytes."""
    from thruput.memory import plan

    cuda = torch.cuda.is_available()
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model, opt, batch = _build(name, shape, impl)
    offload = name.startswith("offload")
    for _ in range(3):
        _step(model, opt, batch, offload)
    n = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"params": n, "rss_growth_bytes": proc.memory_info().rss - rss0,
                           "peak_rss_growth_bytes": max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                                                        - rss0)}
    state_dtype = name.removeprefix("offload_") if offload else "fp32"
    predicted = plan(model, device_memory=2**40, host_memory=2**50, dtype="bf16" if cuda else "fp32",
                     state_dtype=state_dtype, batch_size=shape["batch"], seq_len=shape["seq_len"],
                     device_type=batch.device.type)["offload" if offload else "no_offload"]
    if offload:
        out["kernel"] = opt.kernel
        out["host_bytes_measured"] = opt.host_bytes()
        out["host_bytes_planned"] = predicted.host_bytes
    else:
        out["state_bytes"] = sum(t.nbytes for s in opt.state.values() for t in s.values()
                                 if torch.is_tensor(t) and t.dim() > 0)
    if cuda:
        # After a step and zero_grad the device holds the model states (and the batch): 2 B/param
        # with offload, 12 with torch AdamW (fp32 params + 2 states; the 4 B grad is freed).
        out["device_resident_bytes_per_param"] = (torch.cuda.memory_allocated() - batch.nbytes) / n
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated()
        out["device_peak_bytes_planned"] = predicted.device_bytes
    return out


def _times(shape: dict[str, int], steps: int, impl: str) -> dict[str, dict[str, float]]:
    """Median seconds per phase of every arm, all arms in this process, interleaved step by step
    (the order rotates), so load from elsewhere on the machine hits every arm alike."""
    arms = {name: _build(name, shape, impl) for name in ARMS}
    samples: dict[str, dict[str, list[float]]] = {n: {k: [] for k in ("step", *PHASES)} for n in ARMS}
    for i in range(2 + steps):
        for j in range(len(ARMS)):
            name = ARMS[(i + j) % len(ARMS)]
            fwd, bwd, opt = _step(*arms[name], name.startswith("offload"))
            if i >= 2:
                for key, dt in zip(("step", *PHASES), (fwd + bwd + opt, fwd, bwd, opt)):
                    samples[name][key].append(dt)
    out = {n: {f"{k}_s_median": statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
    for name, (_, opt, _) in arms.items():
        if name.startswith("offload"):
            out[name]["last_timings"] = dict(opt.last_timings)
    return out


def _in_process(fn: Any, *args: Any) -> Any:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def largest_models(device_memory: int, batch: int, seq_len: int) -> dict[str, dict[str, Any]]:
    """Per activation setting (``ckpt_off`` / ``ckpt_on``): the largest bf16 model with plain
    AdamW and with offload, their ratio, and the activation bytes each has at that size."""
    from thruput.memory import plan
    from thruput.memory.plan import largest_model

    out = {}
    for key, suffix in (("ckpt_off", ""), ("ckpt_on", "+ckpt")):
        row: dict[str, Any] = {}
        for arm in ("no_offload", "offload"):
            n = largest_model(arm + suffix, device_memory=device_memory, batch_size=batch, seq_len=seq_len)
            est = plan(max(n, 1), device_memory=device_memory, host_memory=2**50, dtype="bf16",
                       batch_size=batch, seq_len=seq_len)[arm + suffix]
            row[arm] = n
            row[f"{arm}_activation_bytes"] = est.device_parts["activations"]
        row["ratio"] = row["offload"] / max(1, row["no_offload"])
        out[key] = row
    return out


def run(args: argparse.Namespace) -> dict:
    from rich.table import Table

    from thruput.console import make_console
    from thruput.memory import parse_bytes
    from thruput.memory.plan import format_bytes

    shape = {"d_model": args.d_model, "n_layers": args.n_layers, "vocab": args.vocab, "batch": args.batch,
             "seq_len": args.seq_len}
    steps = args.steps
    if args.quick:
        shape.update(d_model=256, n_layers=4, vocab=4096, batch=2, seq_len=128)
        steps = 3
    cuda = torch.cuda.is_available()
    load = [psutil.getloadavg()[0]]
    arms: dict[str, dict[str, Any]] = {}
    for name in ARMS:
        arms[name] = _in_process(_arm_memory, name, shape, args.impl)
        load.append(psutil.getloadavg()[0])
    for name, times in _in_process(_times, shape, steps, args.impl).items():
        arms[name].update(times)
    load.append(psutil.getloadavg()[0])
    ref = arms["torch_adamw"]
    table = Table(title=f"small GPT {ref['params'] / 1e6:.1f}M params, batch {shape['batch']}x{shape['seq_len']}, "
                        f"{'CUDA' if cuda else 'CPU'}, load {min(load):.1f}-{max(load):.1f}")
    cols = ("arm", "kernel", "step ms", "/AdamW", "fwd ms", "bwd ms", "opt ms", "RSS+", "opt. host", "planned")
    for col in cols + (("dev B/p", "dev peak", "planned peak") if cuda else ()):
        table.add_column(col, justify="left" if col in ("arm", "kernel") else "right")
    for name, r in arms.items():
        r["step_time_vs_adamw"] = r["step_s_median"] / ref["step_s_median"]
        measured = r.get("host_bytes_measured", r.get("state_bytes"))
        row = [name, r.get("kernel", "torch.optim"), f"{r['step_s_median'] * 1e3:.1f}",
               f"{r['step_time_vs_adamw']:.2f}",
               *(f"{r[f'{k}_s_median'] * 1e3:.1f}" for k in PHASES), format_bytes(r["rss_growth_bytes"]),
               format_bytes(measured) + ("" if "host_bytes_measured" in r else " st"),
               format_bytes(r["host_bytes_planned"]) if "host_bytes_planned" in r else "-"]
        if cuda:
            row += [f"{r['device_resident_bytes_per_param']:.2f}", format_bytes(r["device_peak_bytes"]),
                    format_bytes(r["device_peak_bytes_planned"])]
        table.add_row(*row)
    device_memory = parse_bytes(args.device_memory)
    largest = largest_models(device_memory, shape["batch"], shape["seq_len"])
    console = make_console(min_width=140)  # the table needs the columns
    console.print(table)
    console.print("opt. host: OffloadAdamW.host_bytes() (torch AdamW: its states, 'st'); planned: "
                  "thruput.memory.plan's offload host prediction")
    console.print(f"planner: largest bf16 model on a {args.device_memory} device at batch {shape['batch']} x "
                  f"seq {shape['seq_len']} (goal >= 8x; model states alone bound it at {MODEL_STATE_BOUND:.0f}x):")
    for key, row in largest.items():
        console.print(f"  activation checkpointing {key.removeprefix('ckpt_')}: AdamW {row['no_offload'] / 1e9:.2f}B "
                      f"(activations {format_bytes(row['no_offload_activation_bytes'])}), offload "
                      f"{row['offload'] / 1e9:.2f}B (activations {format_bytes(row['offload_activation_bytes'])}): "
                      f"{row['ratio']:.2f}x")
    console.print("  below 8x: activations grow with width x depth and, like the gradient bucket, are device "
                  "memory both arms need")
    return {"arms": arms, "shape": shape, "device": "cuda" if cuda else "cpu", "impl": args.impl,
            "load_1min": {"min": min(load), "max": max(load)},
            "offload_fp32_step_time_vs_adamw": arms["offload_fp32"]["step_time_vs_adamw"],
            "offload_int8_step_time_vs_adamw": arms["offload_int8"]["step_time_vs_adamw"],
            "host_bytes_planned_vs_measured": {k: (v["host_bytes_planned"], v["host_bytes_measured"])
                                              for k, v in arms.items() if "host_bytes_planned" in v},
            "planner_setting": {"device_memory": device_memory, "dtype": "bf16", "batch": shape["batch"],
                                "seq_len": shape["seq_len"], "model_state_bound": MODEL_STATE_BOUND},
            "planner_largest": largest,
            "planner_largest_model_ratio": largest["ckpt_off"]["ratio"],
            "planner_largest_model_ratio_ckpt": largest["ckpt_on"]["ratio"]}
