"""One cross-entropy variant in a fresh process: forward+backward time and peak memory growth.

Run as ``python -m thruput.benchmarks._kernels_ce_worker VARIANT DEVICE TOKENS HIDDEN VOCAB REPS``;
prints one JSON line. A fresh process per variant keeps one variant's peak from hiding inside
another's and its freed memory from lowering the next one's page faults.

Peak memory is the growth over the memory held once the inputs exist: on CPU ``ru_maxrss``
minus the RSS at that point (torch's CPU tensors come from malloc/mmap, which RSS sees and
tracemalloc does not); on CUDA ``torch.cuda.max_memory_allocated`` minus the allocated bytes.
The weight gradient (vocab x hidden) counts in every variant, as in training.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from typing import Callable

import psutil
import torch
import torch.nn.functional as F

from thruput.kernels import default_chunk_size, linear_cross_entropy
from thruput.labels import IGNORE_INDEX

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


NATIVE_VARIANTS = ("native", "native_default")
CUDA_ONLY = ("thruput_triton", "liger", "cce")


def loss_fn(variant: str, device: torch.device, vocab: int) -> LossFn:
    """The loss of ``variant``; ``ValueError`` for an unknown one, ``ImportError`` if its package is missing.

    ``thruput``: ``linear_cross_entropy(impl="auto")``; ``thruput_kernel``/``thruput_triton``:
    thruput's own chunked kernel with the torch/Triton row operation; ``native``: torch's
    ``F.linear_cross_entropy`` chunked at thruput's chunk rows (the same memory bound);
    ``native_default``: the same op with ``LinearCrossEntropyOptions()`` as it comes.
    """
    if variant == "naive":
        return lambda h, w, y: F.cross_entropy(h @ w.T, y, ignore_index=IGNORE_INDEX)
    if variant in ("thruput", "thruput_kernel", "thruput_triton"):
        impl = {"thruput": "auto", "thruput_kernel": "torch", "thruput_triton": "triton"}[variant]
        return lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, impl=impl)
    if variant in NATIVE_VARIANTS:  # torch >= 2.13
        options = torch.nn.LinearCrossEntropyOptions(
            batch_chunk_size=default_chunk_size(vocab) if variant == "native" else None)
        return lambda h, w, y: F.linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, options=options)
    if variant == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX)
    if variant == "cce":
        from cut_cross_entropy import linear_cross_entropy as cce

        return lambda h, w, y: cce(h, w, y, ignore_index=IGNORE_INDEX)
    raise ValueError(f"unknown cross-entropy variant {variant!r}")


def _memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return psutil.Process().memory_info().rss


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant: str, device: str, tokens: int, hidden: int, vocab: int, reps: int) -> dict:
    """Time ``reps`` forward+backward passes of ``variant`` after a small warm-up."""
    dev = torch.device(device)
    fn = loss_fn(variant, dev, vocab)
    # warm-up at a tiny size: thread pools, lazy library init, Triton autotune/compile caches
    small = (torch.randn(64, 16, device=dev, requires_grad=True), torch.randn(97, 16, device=dev, requires_grad=True))
    fn(*small, torch.randint(0, 97, (64,), device=dev)).backward()
    del small
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=dev, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=dev) / hidden**0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=dev)
    labels[torch.rand(tokens, device=dev) < 0.1] = IGNORE_INDEX
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    baseline = _memory_now(dev)
    times, cpu_times = [], []
    loss = torch.zeros(())
    for _ in range(reps):
        h.grad = w.grad = None
        _sync(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = fn(h, w, labels)
        loss.backward()
        _sync(dev)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {"variant": variant, "device": device, "times_s": times, "cpu_times_s": cpu_times,
            "peak_delta_bytes": _peak(dev) - baseline, "loss": float(loss.detach())}


if __name__ == "__main__":
    name, dev_name, *nums = sys.argv[1:]
    print(json.dumps(measure(name, dev_name, *(int(n) for n in nums))))
