"""The offload optimizer update on the CPU: thruput's one-pass AdamW kernel against the peers.

The job, per step: take bf16 gradients, update an fp32 master with AdamW, and produce the bf16
parameters to copy back to the device. Peers do whatever they need for the same job in the same
run: torch AdamW ``fused=True`` and ``foreach=True`` (cast the gradient to fp32, step, cast the
parameter to bf16, all inside the timed step) and DeepSpeedCPUAdam when deepspeed is installed
(``pip install deepspeed``; it JIT-builds its CPU Adam on first use).

Bandwidth: bytes a one-pass update must move per parameter (fp32 states: grad 2 + master 4+4 +
m 4+4 + v 4+4 + bf16 param 2 = 28 B; bf16 states 20 B; 8-bit states 16 B + block scales) times
the update rate, over the machine's copy bandwidth measured in the same run: bytes read +
written per second by a large ``dst.copy_(src)`` and by an in-place ``x.mul_(1.0)``, whichever
is higher (copy_ also pays a read for ownership of dst that it does not count, so on some
machines the in-place pass is the better estimate of what the memory system can do).

The implementations are built together and step in turn, so that each sees the same machine:
on the 2-core development VM the memory bandwidth moves by up to 50% for tens of seconds at a
time, and the peers (three passes, partly compute-bound) gain more from a fast spell than the
one-pass kernel does. That needs ~15 GB of memory at 200M parameters.

On a machine shared with other work, wall-clock step times move in scheduler ticks, so the run
also reports a load-robust check: each implementation on one thread, timed in that thread's CPU
seconds (``cpu_1thread``; work per parameter, memory stalls included, other tenants excluded).
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.table import Table

from thruput.console import make_console
from thruput.memory.adam import BLOCK, AdamState, adamw_step, kernel_available, kernel_build_error

DESCRIPTION = ("offload AdamW update (bf16 grads -> fp32 master -> bf16 params): Mparam/s vs torch fused/"
               "foreach and DeepSpeedCPUAdam (goals: fp32 >= 1.5x, low-precision states >= 2x best peer)")

HP = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
STATE_BYTES = {"fp32": 16.0, "bf16": 8.0, "int8": 4.0 + 16.0 / BLOCK}  # m and v, read and written
ONE_PASS_BYTES = 2 + 8 + 2  # bf16 grad in, fp32 master read + written, bf16 param out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="10,50,200", help="parameter counts in millions, comma-separated")
    parser.add_argument("--steps", type=int, default=12,
                        help="timed steps per implementation per size (the implementations take turns)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per implementation per size")
    parser.add_argument("--cpu-check", type=float, default=20,
                        help="millions of params for the one-thread CPU-time check (0: skip it)")


@dataclass
class Arm:
    name: str
    peer: bool                 # a peer (the best of these is the baseline) or thruput
    bytes_per_param: float     # what a one-pass update with this arm's state format must move
    make: Callable[[torch.Tensor, torch.Tensor], Callable[[], None]]  # (master0, grad) -> step


def _ours(state_dtype: str) -> Arm:
    def make(master0: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
        master, out = master0.clone(), torch.empty(master0.numel(), dtype=torch.bfloat16)
        state, t = AdamState.create(master.numel(), state_dtype), [0]

        def step() -> None:
            t[0] += 1
            adamw_step(master, grad, state, out, step=t[0], impl="cpp", **HP)
        return step
    return Arm(f"thruput {state_dtype}", False, ONE_PASS_BYTES + STATE_BYTES[state_dtype], make)


def _torch_peer(kind: str) -> Arm:
    def make(master0: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
        p = torch.nn.Parameter(master0.clone())
        p.grad = torch.empty_like(p)
        opt = torch.optim.AdamW([p], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                                weight_decay=HP["weight_decay"], **{kind: True})
        out = torch.empty(p.numel(), dtype=torch.bfloat16)

        def step() -> None:
            p.grad.copy_(grad)
            opt.step()
            out.copy_(p.detach())
        return step
    return Arm(f"torch {kind}", True, ONE_PASS_BYTES + STATE_BYTES["fp32"], make)


def _deepspeed_peer() -> Arm | str:
    """DeepSpeedCPUAdam, or why it is absent."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception as e:  # ImportError, or deepspeed failing its own import-time checks
        return f"absent ({type(e).__name__}: {e})".splitlines()[0][:200]

    def make(master0: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
        p = torch.nn.Parameter(master0.clone())
        p.grad = torch.empty_like(p)
        opt = DeepSpeedCPUAdam([p], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                               weight_decay=HP["weight_decay"], adamw_mode=True)
        out = torch.empty(p.numel(), dtype=torch.bfloat16)

        def step() -> None:
            p.grad.copy_(grad)  # its kernel takes the gradient in the parameter's dtype
            opt.step()
            out.copy_(p.detach())
        return step
    return Arm("DeepSpeed CPUAdam", True, ONE_PASS_BYTES + STATE_BYTES["fp32"], make)


class CopyBandwidth:
    """Bytes read + written per second over ``nbytes`` fp32 buffers by ``dst.copy_(src)``
    ("copy") and ``x.mul_(1.0)`` ("inplace"), sampled by :meth:`sample` between the arms' steps."""

    def __init__(self, nbytes: int) -> None:
        self.src = torch.full((nbytes // 4,), 1.0)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)  # fault the pages in
        self.samples: dict[str, list[float]] = {"copy": [], "inplace": []}

    def sample(self) -> None:
        for name, fn in (("copy", lambda: self.dst.copy_(self.src)), ("inplace", lambda: self.src.mul_(1.0))):
            t0 = time.perf_counter()
            fn()
            self.samples[name].append(2 * self.src.nbytes / (time.perf_counter() - t0))

    def medians(self) -> dict[str, float]:
        return {k: statistics.median(v) for k, v in self.samples.items()}


def _interleaved_times(arms: list[Arm], master0: torch.Tensor, grad: torch.Tensor, warmup: int, steps: int,
                       between: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per step of ``arms``, all built at once and stepped in turn (ABBA order): on a
    shared VM the memory bandwidth moves by up to 50% for tens of seconds at a time, and
    stepping in turn puts every arm under the same conditions. ``between`` runs after each turn."""
    fns = {arm.name: arm.make(master0, grad) for arm in arms}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(steps):
        for name in fns if i % 2 == 0 else list(fns)[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        between()
    del fns
    gc.collect()
    return times


def cpu_time_check(arms: list[Arm], n: int, reps: int) -> dict:
    """Median thread CPU seconds per step of each arm on one thread, as ns/param, and the ratios."""
    gen = torch.Generator().manual_seed(0)
    master0 = torch.randn(n, generator=gen)
    grad = (torch.randn(n, generator=gen) * 1e-2).to(torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        samples: dict[str, list[float]] = {arm.name: [] for arm in arms}
        for r in range(2):
            for arm in arms if r % 2 == 0 else arms[::-1]:
                step = arm.make(master0, grad)
                step()
                for _ in range(reps):
                    t0 = time.thread_time()
                    step()
                    samples[arm.name].append(time.thread_time() - t0)
                del step
                gc.collect()
    finally:
        torch.set_num_threads(threads)
    ns = {arm.name: 1e9 * statistics.median(samples[arm.name]) / n for arm in arms}
    peer = min(ns[arm.name] for arm in arms if arm.peer)
    return {"params": n, "ns_per_param": ns,
            "fp32_vs_best_peer": peer / ns["thruput fp32"],
            "lowp_vs_best_peer": peer / min(ns["thruput bf16"], ns["thruput int8"])}


def run(args: argparse.Namespace) -> dict:
    if not kernel_available():
        raise SystemExit(f"thruput bench adam: the C++ kernel did not build: {kernel_build_error()}")
    sizes = [10, 50] if args.quick else [int(float(s)) for s in args.sizes.split(",")]
    steps, warmup = (4, 1) if args.quick else (args.steps, args.warmup)
    arms = [_ours("fp32"), _ours("bf16"), _ours("int8"), _torch_peer("fused"), _torch_peer("foreach")]
    ds = _deepspeed_peer()
    if isinstance(ds, Arm):
        arms.append(ds)
    load_before = os.getloadavg()
    bandwidth_probe = CopyBandwidth(1 << 29 if not args.quick else 1 << 27)
    result: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "workload": "bf16 grad in, fp32 AdamW master step, bf16 param out; median of "
                    f"{steps} steps per implementation (after {warmup} warm-up), the implementations "
                    "stepped in turn (torch foreach in a pass of its own)",
        "deepspeed": "present" if isinstance(ds, Arm) else ds,
        "sizes": {},
    }
    per_size_rows = {}
    for millions in sizes:
        n = millions * 1_000_000
        gen = torch.Generator().manual_seed(0)
        master0 = torch.randn(n, generator=gen)
        grad = (torch.randn(n, generator=gen) * 1e-2).to(torch.bfloat16)
        # Every arm but foreach (4x slower than the others, never the best peer) is alive at
        # once: ~15 GB at 200M parameters. foreach then runs alone.
        alone = [arm for arm in arms if arm.name == "torch foreach"]
        together = [arm for arm in arms if arm not in alone]
        samples = _interleaved_times(together, master0, grad, warmup, steps, bandwidth_probe.sample)
        samples.update(_interleaved_times(alone, master0, grad, warmup, max(2, steps // 3), lambda: None))
        per_size_rows[millions] = {arm.name: (arm, statistics.median(samples[arm.name])) for arm in arms}
        del master0, grad
        gc.collect()
    cpu_millions = 10 if args.quick else args.cpu_check
    if cpu_millions > 0:
        result["cpu_1thread"] = cpu_time_check(arms, int(cpu_millions * 1e6), 3)
    measured = bandwidth_probe.medians()
    del bandwidth_probe
    bandwidth = max(measured.values())
    result["machine"].update({"copy_bandwidth_GBps": bandwidth / 1e9,
                              **{f"{k}_bandwidth_GBps": v / 1e9 for k, v in measured.items()}})
    table = Table(title=f"offload AdamW update (bf16 grads, fp32 master, bf16 params); copy bandwidth "
                        f"{bandwidth / 1e9:.1f} GB/s read+write")
    for col in ("params", "impl", "ms/step", "Mparam/s", "B/param", "GB/s", "% bw", "vs peer"):
        table.add_column(col, justify="right", no_wrap=True)
    for millions, arm_times in per_size_rows.items():
        n = millions * 1_000_000
        rows = {}
        for name, (arm, sec) in arm_times.items():
            rate = n / sec
            rows[name] = {"peer": arm.peer, "ms_per_step": 1e3 * sec, "Mparam_per_s": rate / 1e6,
                          "bytes_per_param": arm.bytes_per_param, "GBps": rate * arm.bytes_per_param / 1e9,
                          "bandwidth_fraction": rate * arm.bytes_per_param / bandwidth}
        best_peer = max((k for k, v in rows.items() if v["peer"]), key=lambda k: rows[k]["Mparam_per_s"])
        peer_rate = rows[best_peer]["Mparam_per_s"]
        for v in rows.values():
            v["vs_best_peer"] = v["Mparam_per_s"] / peer_rate
        lowp = max(("thruput bf16", "thruput int8"), key=lambda k: rows[k]["Mparam_per_s"])
        result["sizes"][f"{millions}M"] = {
            "arms": rows, "best_peer": best_peer, "best_lowp": lowp,
            "fp32_vs_best_peer": rows["thruput fp32"]["vs_best_peer"],
            "lowp_vs_best_peer": rows[lowp]["vs_best_peer"],
        }
        for name, v in rows.items():
            table.add_row(f"{millions}M", name, f"{v['ms_per_step']:.1f}", f"{v['Mparam_per_s']:.0f}",
                          f"{v['bytes_per_param']:.1f}", f"{v['GBps']:.1f}", f"{100 * v['bandwidth_fraction']:.0f}",
                          f"{v['vs_best_peer']:.2f}x")
    per_size = result["sizes"].values()
    # Headline figures: the worst size, so no size is hidden behind an average.
    result["thruput_fp32_vs_best_peer"] = min(s["fp32_vs_best_peer"] for s in per_size)
    result["thruput_lowp_vs_best_peer"] = min(s["lowp_vs_best_peer"] for s in per_size)
    result["thruput_fp32_bandwidth_fraction"] = min(s["arms"]["thruput fp32"]["bandwidth_fraction"]
                                                    for s in per_size)
    result["machine"]["loadavg_before_after"] = [load_before[0], os.getloadavg()[0]]
    console = make_console(min_width=100)
    console.print(table)
    console.print(f"fp32 states vs best peer {result['thruput_fp32_vs_best_peer']:.2f}x (goal 1.5), "
                    f"low-precision states {result['thruput_lowp_vs_best_peer']:.2f}x (goal 2.0), "
                    f"fp32 at {100 * result['thruput_fp32_bandwidth_fraction']:.0f}% of copy bandwidth (goal 85%); "
                    f"DeepSpeedCPUAdam {result['deepspeed']}; load average {load_before[0]:.1f} before")
    if "cpu_1thread" in result:
        cpu = result["cpu_1thread"]
        console.print(f"one thread, CPU time ({cpu['params'] / 1e6:.0f}M params): " + ", ".join(
            f"{k} {v:.2f}" for k, v in cpu["ns_per_param"].items()) + " ns/param; fp32 vs best peer "
            f"{cpu['fp32_vs_best_peer']:.2f}x, low-precision {cpu['lowp_vs_best_peer']:.2f}x")
    return result
