"""Memory readings for the profiler: process RSS and its peak window, device capacity."""
from __future__ import annotations

import resource

import torch


def memory_capacity(device: torch.device | None) -> int:
    """Total memory of the CUDA ``device``, or of the host when None."""
    if device is not None:
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

    return psutil.virtual_memory().total


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window, so a profiler reports its own run's peak rather than the
    process lifetime's (Linux: writing 5 to clear_refs resets VmHWM). False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last reset (VmHWM), else over the process lifetime (ru_maxrss, KiB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
