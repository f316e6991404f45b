"""Peak FLOP/s of known accelerators, and a measured CPU peak, for MFU.

MFU = achieved model FLOP/s / peak FLOP/s. The table holds dense (no sparsity) tensor-core
peaks from vendor data sheets, per dtype; unknown devices get no MFU rather than a guess.
"""
from __future__ import annotations

import time

import torch

# name fragment (lower case, matched against torch.cuda.get_device_name) -> {dtype: FLOP/s}
KNOWN_PEAKS: dict[str, dict[str, float]] = {
    "h200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494e12},
    "h100 sxm": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494e12},
    "h100 nvl": {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12, "tf32": 418e12},
    "h100 pcie": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12, "tf32": 378e12},
    "h100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "tf32": 494e12},
    "a100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "tf32": 156e12},
    "l40s": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12, "tf32": 183e12},
    "a10g": {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12, "tf32": 35e12},
    "l4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12, "tf32": 60e12},
    "v100": {"fp16": 125e12, "fp32": 15.7e12},
    "rtx 4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
    "mi300x": {"bf16": 1307e12, "fp16": 1307e12, "fp32": 163e12},
}

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def lookup_peak(device_name: str, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s for a device name and compute dtype, or None if the device is unknown."""
    name = device_name.lower()
    key = _DTYPE_KEYS.get(dtype, "fp32")
    for fragment in sorted(KNOWN_PEAKS, key=len, reverse=True):
        if fragment in name:
            return KNOWN_PEAKS[fragment].get(key)
    return None


def measure_cpu_peak(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.3) -> float:
    """Achieved FLOP/s of a square matmul on this CPU with torch's threads: a practical peak.

    It is what the BLAS reaches on a large, cache-friendly GEMM; model MFU against it says how
    close training gets to what this CPU can do for matmuls.
    """
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm the BLAS thread pool
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 3:
        torch.mm(a, b)
        n += 1
    return 2.0 * size**3 * n / elapsed
